"""The output formats of ``comoto predict --format``, registered by name: the one place that says how a format
writes its file.

A format is a *writer*, ``writer(path, records)``: it writes ``records`` (one dict per detected box, DBTex
columns then ``path``, best first within each input: :func:`comoto_cli.inference.predict.records`) into the file
``path``. :func:`write_output` hands it a temporary file next to ``--out`` and renames that over ``--out`` once the
writer returns, so no writer can leave a half-written output (:func:`comoto_cli.utils.atomic.atomic_path`).
``comoto predict``, the ``--format`` help and the validation of ``PredictConfig.format`` all read this registry,
so adding a format (a DICOM SR, say) is one module with its writer and one :func:`register_format` call, in a
module imported before the config is read.

No torch here: the CLI reads this module for its help.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from comoto_cli.config import PredictConfig
from comoto_cli.data.tables import PREDICT_COLUMNS
from comoto_cli.utils.atomic import atomic_path
from comoto_cli.utils.registry import Registry

Writer = Callable[[Path, list[dict]], None]


@dataclass(frozen=True)
class OutputFormat:
    """One format: ``name`` (the value of ``--format``), ``writer`` and ``description`` (one line of help)."""

    name: str
    writer: Writer
    description: str = ""


_FORMATS: Registry[OutputFormat] = Registry("output format", "format", PredictConfig.format_names)


def register_format(name: str, writer: Writer, *, description: str = "") -> OutputFormat:
    """Make format ``name`` known to ``comoto predict``, ``--format`` and the config's validation."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name):
        raise ValueError(f"format name {name!r}: lower-case letters, digits, '_', '.' and '-' only")
    if name in _FORMATS:
        raise ValueError(f"an output format {name!r} is already registered")
    if not callable(writer):
        raise ValueError(f"format {name!r}: writer must be a callable writer(path, records)")
    return _FORMATS.add(name, OutputFormat(name=name, writer=writer, description=description))


def get_format(name: str) -> OutputFormat:
    return _FORMATS.lookup(name)


def registered_formats() -> list[OutputFormat]:
    """Every format, in registration order."""
    return list(_FORMATS.values())


def formats_help() -> str:
    """The formats for ``--format`` help: ``name = description`` each, the default first."""
    return "; ".join(f"{f.name} = {f.description}" if f.description else f.name for f in _FORMATS.values())


def write_output(path: Path, records: list[dict], name: str) -> None:
    """Write ``records`` to ``path`` in format ``name``, atomically: the old file or the whole new one."""
    writer = get_format(name).writer
    with atomic_path(path) as temporary:
        writer(temporary, records)


# ---------------------------------------------------------------------------------------------- built-in formats
def write_csv(path: Path, records: list[dict]) -> None:
    """DBTex columns then ``path``, one row per box, with a header (:data:`PREDICT_COLUMNS`)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(PREDICT_COLUMNS)
        writer.writerows([record[name] for name in PREDICT_COLUMNS] for record in records)


def write_json(path: Path, records: list[dict]) -> None:
    """A JSON list of the records, indented, keys in column order."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(records, indent=2, sort_keys=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


register_format("csv", write_csv, description="DBTex CSV columns then 'path' (default)")
register_format("json", write_json, description="a list of records with the same keys")
