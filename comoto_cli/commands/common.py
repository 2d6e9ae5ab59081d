"""Helpers shared by the command modules: config loading from ``--config`` + flags, console output."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel
from rich.console import Console

from comoto_cli.config import ModelConfig, load_config

M = TypeVar("M", bound=BaseModel)

console = Console(highlight=False)

CONFIG_OPTION_HELP = "JSON (or YAML) config file; flags given on the command line override it."
NUM_WORKERS_HELP = "DataLoader worker processes (default auto: none on the CPU, on a GPU the cores less one, at most 8)."
VAL_EVERY_HELP = ("Validate every N epochs (and after the last); default auto: every epoch, every 5th on more than 200 "
                  "validation volumes (images).")


def resolve_config(model: type[M], config_file: Path | None, **flags: Any) -> M:
    """Defaults <- ``config_file`` <- flags that were given (``None`` = not given). Dotted names use ``__``:
    ``optim__lr=0.1`` sets ``optim.lr``."""
    overrides = {key.replace("__", "."): value for key, value in flags.items()}
    return load_config(model, config_file, overrides)

# The Field's own text: one home for what the option means.
_DISTILL_FEATURE = ModelConfig.model_fields["distill_feature"].description
DISTILL_FEATURE_HELP = _DISTILL_FEATURE[0].upper() + _DISTILL_FEATURE[1:] + "."
