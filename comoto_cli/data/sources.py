"""What the dataset adapters (:mod:`comoto_cli.data.adapters`) share: the records they produce
(:class:`ImageRecord`, :class:`LesionBox`) and the helpers that read their CSVs with row-precise errors.

Only CSVs and the file system are read here (no pixel decoding). Geometry of boxes against the image size needs
the DICOM header and is checked later with :func:`check_box_in_image`.

Error policy: with ``skipped=None`` the first bad row raises InputDataError naming the CSV and row; with a list,
the bad row is recorded there (``{"path", "row", "reason"}``; ``path`` is the file the problem is in, ``reason``
the full one-line message) and the image it belongs to is left out with all its boxes, so no image is ever kept
with part of its lesions missing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from comoto_cli.data.dicom_io import MAX_SIDE
from comoto_cli.errors import InputDataError, UsageError
from comoto_cli.transforms.geometry import box_problem
from comoto_cli.utils.csvio import CsvTable, read_header
from comoto_cli.utils.split_names import SPLITS, release_name, split_csvs, split_of_file_name

_SPLITS = {"train": "train", "training": "train", "test": "test", "testing": "test"}


@dataclass
class LesionBox:
    slice: int  # central slice (0 for mammograms)
    x: float
    y: float
    width: float
    height: float  # official frame (DBT) / stored frame (mammo), full resolution
    cls: str  # e.g. 'cancer', 'benign', 'Mass'
    csv: Path
    row: int  # where it came from (file row number, header = row 1)


@dataclass
class ImageRecord:  # one DBT volume or one mammogram
    patient_id: str
    study_uid: str
    view: str  # lower-case 'lcc'...; mammo: '' if unknown
    path: Path  # absolute, resolved, inside the data root
    source: str  # path relative to the data root as written in the CSV
    label: str  # DBT: cancer|benign|actionable|normal; mammo: lesion|normal
    boxes: list[LesionBox] = field(default_factory=list)
    volume_slices: int | None = None  # DBT: VolumeSlices of the view's first box row (DBTex rule)
    split: str | None = None  # the dataset's own split mapped to train|val|test (None: it has none)
    csv: Path = Path()
    row: int = 0  # the file-path / image row that produced this record
    labels_csv: Path | None = None  # DBT: the labels CSV its label came from (an input of the cache too)
    # Other files it was built from (e.g. ROI masks, header JSONs): stamped (size, mtime) into the cache's input
    # fingerprint like the images, so replacing one rebuilds the cache.
    extra_inputs: list[Path] = field(default_factory=list)


Skipped = list[dict]


class BadRow(Exception):
    """A row-level problem; becomes an InputDataError or a skipped entry."""


def report(skipped: Skipped | None, error: InputDataError, path: Path | str, row: int | None) -> None:
    """Raise ``error`` (fail mode, ``skipped`` None) or list it in ``skipped`` and go on."""
    if skipped is None:
        raise error
    skipped.append({"path": str(path), "row": row, "reason": str(error)})


def row_error(message: str, csv: Path, row: int | None) -> InputDataError:
    return InputDataError(message, path=csv, row=row)


# -------------------------------------------------------------------------------------------- paths
def safe_join(root: Path, relative: str, *, csv: Path, row: int) -> Path:
    """``root / relative`` resolved, refusing absolute paths, '..' and symlinks that leave ``root``."""
    text = (relative or "").strip().replace("\\", "/")
    if not text:
        raise row_error("empty file path", csv, row)
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).drive:
        raise row_error(
            f"file path {relative!r} is absolute; paths must be relative to the data root", csv, row
        )
    if ".." in PurePosixPath(text).parts:
        raise row_error(f"file path {relative!r} contains '..' (would leave the data root)", csv, row)
    base = Path(root).resolve()
    try:
        target = (base / text).resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise row_error(f"file path {relative!r} cannot be resolved: {exc}", csv, row) from None
    if not target.is_relative_to(base):
        raise row_error(f"file path {relative!r} resolves outside the data root {base} (symlink?)", csv, row)
    return target


def _csvs_with_columns(root: Path, required: Sequence[str]) -> list[Path]:
    """Every CSV under ``root`` (recursively, hidden folders left out) whose header has all ``required`` columns."""
    root = Path(root)
    if not root.is_dir():
        raise InputDataError("data root is not a directory", path=root)
    matches: list[Path] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if name.lower().endswith(".csv"):
                candidate = Path(directory) / name
                header = read_header(candidate)
                if all(column in header for column in required):
                    matches.append(candidate)
    return matches


def none_found(root: Path, required: Sequence[str], flag: str | None) -> InputDataError:
    """The error for no CSV with the ``required`` columns under ``root``."""
    hint = f"; pass it with {flag}" if flag else ""
    return InputDataError(f"no CSV file with the columns {', '.join(required)} found under it{hint}", path=root)


def find_csv_by_columns(root: Path, required: Sequence[str], *, flag: str | None = None) -> Path:
    """The one CSV under ``root`` (recursively) whose header has all ``required`` columns."""
    matches = _csvs_with_columns(root, required)
    if not matches:
        raise none_found(root, required, flag)
    if len(matches) > 1:
        listed = ", ".join(str(m) for m in matches)
        raise InputDataError(
            f"several CSV files have the columns {', '.join(required)}: {listed}; "
            f"choose one{' with ' + flag if flag else ''}",
            path=root,
        )
    return matches[0]


def find_split_csvs(root: Path, required: Sequence[str], *, flag: str) -> Path | dict[str, Path] | None:
    """The CSVs under ``root`` with the ``required`` columns, the way BCS-DBT ships them: None when there is none;
    the path when there is one (no split of its own, whatever its name); ``{split: path}`` (in
    :data:`~comoto_cli.data.splits.SPLITS` order) when there are several and the file names carry
    different splits, as the release names them (``BCS-DBT-file-paths-validation-v2.csv`` -> ``val``). Several
    CSVs of which one names no split, or two the same split, are an error listing them."""
    matches = _csvs_with_columns(root, required)
    if not matches:
        return None
    if len(matches) == 1:
        return matches[0]
    columns = ", ".join(required)
    listed = ", ".join(str(m) for m in matches)
    plain = [m.name for m in matches if split_of_file_name(m.name) is None]
    if plain:
        raise InputDataError(
            f"several CSV files have the columns {columns}: {listed} ({', '.join(plain)} names no split); choose "
            f"one with {flag}, or name each after its split (train, validation, test) as the BCS-DBT release does",
            path=root,
        )
    by_split: dict[str, list[Path]] = {}
    for match in matches:
        by_split.setdefault(split_of_file_name(match.name), []).append(match)
    for split, files in by_split.items():
        if len(files) > 1:
            raise InputDataError(
                f"several CSV files with the columns {columns} are for the {release_name(split)} split: "
                f"{', '.join(str(f) for f in files)}; choose one with {flag} {release_name(split)}=PATH",
                path=root,
            )
    return {split: by_split[split][0] for split in SPLITS if split in by_split}


def csv_paths(value: Path | str | Mapping | Sequence | None) -> list[Path]:
    """Every path of a CSV input (None, one path, ``{split: path}``, or a list of paths / 'SPLIT=PATH')."""
    try:
        normal = split_csvs(value)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if normal is None:
        return []
    return list(normal.values()) if isinstance(normal, dict) else [normal]


CsvInput = Path | str | Mapping[str, Path | str] | Sequence[Path | str] | None


def csv_input(value: CsvInput, flag: str) -> Path | dict[str, Path] | None:
    """A CSV input in its normal form (:func:`comoto_cli.utils.split_names.split_csvs`); ``flag`` names it in the
    usage error."""
    try:
        return split_csvs(value)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


# ------------------------------------------------------------------------------------------ numbers
def number(table: CsvTable, column: str, index: int, *, integer: bool = False, allow_empty: bool = False,
            limit: float | None = None):
    """The cell as a float (int with ``integer``); ``limit``: the largest magnitude that makes sense (a pixel
    coordinate, a slice count), checked here so a huge value never reaches the arithmetic that follows."""
    cell = table.columns[column][index].strip()
    if cell == "":
        if allow_empty:
            return None
        raise BadRow(f"column {column!r} is empty")
    try:
        value = float(cell)
    except ValueError:
        raise BadRow(f"column {column!r} is not a number: {cell!r}") from None
    if not math.isfinite(value):
        raise BadRow(f"column {column!r} is not finite: {cell!r}")
    if limit is not None and abs(value) > limit:
        raise BadRow(f"column {column!r} is out of range: {_short(cell)} (at most {limit:g})")
    if integer:
        if value != round(value):
            raise BadRow(f"column {column!r} is not an integer: {cell!r}")
        return int(value)
    return value


def _short(cell: str, width: int = 40) -> str:
    return repr(cell if len(cell) <= width else cell[:width] + "...")


def check_box_in_image(box: LesionBox, rows: int, cols: int, num_slices: int) -> str | None:
    """Why ``box`` does not fit an image of ``rows`` x ``cols`` with ``num_slices`` slices, or None."""
    problem = box_problem(box.x, box.y, box.width, box.height, rows, cols)
    if problem is not None:
        return problem
    if not 0 <= box.slice < num_slices:
        return f"slice {box.slice} is outside the volume's {num_slices} slice(s)"
    return None


def xyxy_box(table: CsvTable, index: int, names: Sequence[str]) -> tuple[float, float, float, float] | None:
    """(x, y, width, height) from xmin/ymin/xmax/ymax cells, None when all four are empty (no finding)."""
    cells = [table.columns[name][index].strip() for name in names]
    if all(cell == "" for cell in cells):
        return None
    if any(cell == "" for cell in cells):
        raise BadRow(f"box is partly empty ({', '.join(f'{n}={c!r}' for n, c in zip(names, cells))})")
    xmin, ymin, xmax, ymax = (number(table, name, index, limit=MAX_SIDE) for name in names)
    if xmin < 0 or ymin < 0:
        raise BadRow(f"box has a negative coordinate ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g})")
    if xmin >= xmax or ymin >= ymax:
        raise BadRow(f"box is empty or inverted: xmin {xmin:g}, xmax {xmax:g}, ymin {ymin:g}, ymax {ymax:g}")
    return xmin, ymin, xmax - xmin, ymax - ymin


def training_or_test(cell: str) -> str | None:
    """A split cell as VinDr and the manifest write it (training / test, or empty) -> train | test | None."""
    text = cell.strip().lower()
    if not text:
        return None
    if text not in _SPLITS:
        raise BadRow(f"split {cell!r} is not one of training, train, test, testing (or empty)")
    return _SPLITS[text]


# --------------------------------------------------------------------------------------- mammography
def mammo_box(box: tuple[float, float, float, float], cls: str, csv: Path, row: int) -> LesionBox:
    """A mammogram's lesion box (x, y, width, height in the stored frame; slice 0)."""
    return LesionBox(slice=0, x=box[0], y=box[1], width=box[2], height=box[3], cls=cls, csv=csv, row=row)


def mammo_records(root: Path, csv: Path, entries: list[tuple[str, dict]], skipped: Skipped | None) -> list[ImageRecord]:
    """One record per (relative source path, gathered entry) whose file exists inside the root; shared by the
    mammography adapters (an entry holds patient, study, view, split, row and its boxes)."""
    records = []
    for source, entry in entries:
        try:
            path = safe_join(root, source, csv=csv, row=entry["row"])
            if not path.is_file():
                raise row_error(f"DICOM file not found: {path}", csv, entry["row"])
        except InputDataError as exc:
            report(skipped, exc, csv, entry["row"])
            continue
        records.append(ImageRecord(
            patient_id=entry["patient"], study_uid=entry["study"], view=entry["view"], path=path, source=source,
            label="lesion" if entry["boxes"] else "normal", boxes=entry["boxes"], volume_slices=None,
            split=entry["split"], csv=csv, row=entry["row"], extra_inputs=list(entry.get("extra_inputs", [])),
        ))
    return records
