"""The output formats of ``comoto predict --format``, registered by name: the one place that says how a format
writes its file.

A format is a *writer*, ``writer(path, records)``: it writes ``records`` (one dict per detected box, DBTex
columns then ``path``, best first within each input: :func:`comoto_cli.inference.predict.records`) into the file
``path``. :func:`write_output` hands it a temporary file next to ``--out`` and renames that over ``--out`` once the
writer returns, so no writer can leave a half-written output (:func:`comoto_cli.utils.atomic.atomic_path`).

A *folder* format (``register_format(..., folder=True)``) writes several files, e.g. one per input, and needs more
than the flat records: its writer is ``writer(folder, predictions, run)``, with ``predictions`` the per-input
results (:class:`comoto_cli.inference.predict.InputPrediction`: path, kind, keys, rows in the official frame,
image shape, flipped) and ``run`` a :class:`PredictRun` (checkpoint and its SHA-256, software version). It writes
plain files into ``folder``, a temporary folder inside ``--out``; once it returns they are renamed into ``--out``,
and if it fails nothing of this run is left there (:func:`comoto_cli.utils.atomic.all_or_nothing`). The DICOM SR
writer (:mod:`comoto_cli.inference.dicom_sr`) is one.

A writer may be given as a ``"module:function"`` string, imported only when the format is used (the DICOM SR
writer needs highdicom, which the CLI's help should not load).
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
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comoto_cli import __version__
from comoto_cli.config import PredictConfig
from comoto_cli.data.tables import PREDICT_COLUMNS
from comoto_cli.errors import ComotoError
from comoto_cli.utils.atomic import all_or_nothing, atomic_path, ensure_writable_dir
from comoto_cli.utils.registry import Registry, is_code_name, resolve

Writer = Callable[[Path, list[dict]], None]
# writer(folder, predictions, run): predictions are InputPrediction objects (comoto_cli.inference.predict).
FolderWriter = Callable[[Path, Sequence[Any], "PredictRun"], None]


@dataclass(frozen=True)
class PredictRun:
    """What a folder format may record about the run that made the predictions."""

    checkpoint: Path | None = None
    checkpoint_sha256: str = ""
    software: str = "CoMoTo CLI"
    version: str = __version__


@dataclass(frozen=True)
class OutputFormat:
    """One format: ``name`` (the value of ``--format``), ``writer`` (a callable or a ``"module:function"`` string)
    and ``description`` (one line of help); ``folder``: ``--out`` is a folder and the writer is a
    :data:`FolderWriter`."""

    name: str
    writer: Writer | FolderWriter | str
    description: str = ""
    folder: bool = False

    def resolve(self) -> Callable:
        """The writer itself, importing its module when it was registered by name."""
        return resolve(self.writer)


_FORMATS: Registry[OutputFormat] = Registry("output format", "format", PredictConfig.format_names)


def register_format(name: str, writer: Writer | FolderWriter | str, *, description: str = "",
                    folder: bool = False) -> OutputFormat:
    """Make format ``name`` known to ``comoto predict``, ``--format`` and the config's validation. ``folder``:
    the format writes a folder, ``writer(folder, predictions, run)`` (see the module docstring)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name):
        raise ValueError(f"format name {name!r}: lower-case letters, digits, '_', '.' and '-' only")
    if name in _FORMATS:
        raise ValueError(f"an output format {name!r} is already registered")
    by_name = is_code_name(writer)
    if not (callable(writer) or by_name):
        signature = "writer(folder, predictions, run)" if folder else "writer(path, records)"
        raise ValueError(f"format {name!r}: writer must be a callable {signature} or a 'module:function' string")
    return _FORMATS.add(name, OutputFormat(name=name, writer=writer, description=description, folder=folder))


def get_format(name: str) -> OutputFormat:
    return _FORMATS.lookup(name)


def registered_formats() -> list[OutputFormat]:
    """Every format, in registration order."""
    return list(_FORMATS.values())


def formats_help() -> str:
    """The formats for ``--format`` help: ``name = description`` each, the default first."""
    return "; ".join(f"{f.name} = {f.description}" if f.description else f.name for f in _FORMATS.values())


def write_output(path: Path, records: list[dict], name: str, *, predictions: Sequence[Any] | None = None,
                 run: PredictRun | None = None) -> None:
    """Write ``records`` to ``path`` in format ``name``, atomically: the old file or the whole new one. A folder
    format writes ``predictions`` (required for it) into the folder ``path``: all its files or none."""
    output = get_format(name)
    writer = output.resolve()
    if not output.folder:
        with atomic_path(path) as temporary:
            writer(temporary, records)
        return
    if predictions is None:
        raise ValueError(f"output format {name!r} writes from the per-input predictions: pass predictions=")
    write_folder(path, lambda staging: writer(staging, list(predictions), run or PredictRun()))


def write_folder(folder: Path, fill: Callable[[Path], None]) -> list[Path]:
    """``fill(staging)`` writes plain files into a temporary folder inside ``folder``; then each is renamed into
    ``folder`` (replacing a file of the same name). When ``fill`` or a rename fails, no file of this call is left
    in ``folder``, nor any folder this call created, and a failing ``fill`` leaves ``folder`` as it was. Returns the
    paths written."""
    folder = Path(folder)
    with all_or_nothing(folder):
        ensure_writable_dir(folder)
        staging = Path(tempfile.mkdtemp(prefix=".comoto-", suffix=".tmp", dir=folder))
        try:
            fill(staging)
            written = sorted(staging.iterdir())
            if any(not path.is_file() or path.is_symlink() for path in written):
                raise ValueError(f"a folder format must write plain files only: {staging}")
            for path in written:
                try:
                    os.replace(path, folder / path.name)
                except OSError as exc:
                    raise ComotoError(f"cannot write: {exc.strerror or exc}", path=folder / path.name) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [folder / path.name for path in written]


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
register_format("dicom-sr", "comoto_cli.inference.dicom_sr:write_dicom_sr", folder=True,
                description="--out is a folder: one DICOM SR (TID 1500) per input, boxes in the stored pixel frame")
