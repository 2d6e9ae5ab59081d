"""Helpers shared by the command modules: config loading from ``--config`` + flags, console output."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel
from rich.console import Console

from comoto_cli.config import load_config

M = TypeVar("M", bound=BaseModel)

console = Console(highlight=False)

CONFIG_OPTION_HELP = "JSON (or YAML) config file; flags given on the command line override it."


def resolve_config(model: type[M], config_file: Path | None, **flags: Any) -> M:
    """Defaults <- ``config_file`` <- flags that were given (``None`` = not given). Dotted names use ``__``:
    ``optim__lr=0.1`` sets ``optim.lr``."""
    overrides = {key.replace("__", "."): value for key, value in flags.items()}
    return load_config(model, config_file, overrides)
