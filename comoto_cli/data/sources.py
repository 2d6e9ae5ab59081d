"""Dataset adapters: BCS-DBT, VinDr-Mammo and a generic manifest -> :class:`ImageRecord` lists.

Only CSVs and the file system are read here (no pixel decoding). Geometry of boxes against the image size needs
the DICOM header and is checked later with :func:`check_box_in_image`.

Error policy: with ``skipped=None`` the first bad row raises InputDataError naming the CSV and row; with a list,
the bad row is recorded there (``{"path", "row", "reason"}``; ``path`` is the file the problem is in, ``reason``
the full one-line message) and the image it belongs to is left out with all its boxes, so no image is ever kept
with part of its lesions missing.
"""

from __future__ import annotations

import ast
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from comoto_cli.data.dicom_io import MAX_FRAMES, MAX_SIDE
from comoto_cli.errors import InputDataError, UsageError
from comoto_cli.transforms.geometry import box_problem
from comoto_cli.utils.csvio import CsvTable, read_csv, read_header
from comoto_cli.utils.split_names import SPLITS, release_name, split_csvs, split_of_file_name

VIEWS = ("lcc", "lmlo", "rcc", "rmlo")
DBT_KEYS = ("PatientID", "StudyUID", "View")
DBT_LABELS = ("Cancer", "Benign", "Actionable", "Normal")  # most severe first
DBT_BOX_COLUMNS = ("Slice", "X", "Y", "Width", "Height", "VolumeSlices")
VINDR_COLUMNS = (
    "study_id",
    "image_id",
    "laterality",
    "view_position",
    "finding_categories",
    "xmin",
    "ymin",
    "xmax",
    "ymax",
)
MANIFEST_COLUMNS = ("path", "patient_id", "xmin", "ymin", "xmax", "ymax")
_SPLITS = {"train": "train", "training": "train", "test": "test", "testing": "test"}
_MAX_LITERAL = 2000  # longest finding_categories cell handed to ast.literal_eval


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


Skipped = list[dict]


class _BadRow(Exception):
    """A row-level problem; becomes an InputDataError or a skipped entry."""


def _report(skipped: Skipped | None, error: InputDataError, path: Path | str, row: int | None) -> None:
    if skipped is None:
        raise error
    skipped.append({"path": str(path), "row": row, "reason": str(error)})


def _row_error(message: str, csv: Path, row: int | None) -> InputDataError:
    return InputDataError(message, path=csv, row=row)


# -------------------------------------------------------------------------------------------- paths
def safe_join(root: Path, relative: str, *, csv: Path, row: int) -> Path:
    """``root / relative`` resolved, refusing absolute paths, '..' and symlinks that leave ``root``."""
    text = (relative or "").strip().replace("\\", "/")
    if not text:
        raise _row_error("empty file path", csv, row)
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).drive:
        raise _row_error(
            f"file path {relative!r} is absolute; paths must be relative to the data root", csv, row
        )
    if ".." in PurePosixPath(text).parts:
        raise _row_error(f"file path {relative!r} contains '..' (would leave the data root)", csv, row)
    base = Path(root).resolve()
    try:
        target = (base / text).resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise _row_error(f"file path {relative!r} cannot be resolved: {exc}", csv, row) from None
    if not target.is_relative_to(base):
        raise _row_error(f"file path {relative!r} resolves outside the data root {base} (symlink?)", csv, row)
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


def _none_found(root: Path, required: Sequence[str], flag: str | None) -> InputDataError:
    hint = f"; pass it with {flag}" if flag else ""
    return InputDataError(f"no CSV file with the columns {', '.join(required)} found under it{hint}", path=root)


def find_csv_by_columns(root: Path, required: Sequence[str], *, flag: str | None = None) -> Path:
    """The one CSV under ``root`` (recursively) whose header has all ``required`` columns."""
    matches = _csvs_with_columns(root, required)
    if not matches:
        raise _none_found(root, required, flag)
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


# ------------------------------------------------------------------------------------------ numbers
def _number(table: CsvTable, column: str, index: int, *, integer: bool = False, allow_empty: bool = False,
            limit: float | None = None):
    """The cell as a float (int with ``integer``); ``limit``: the largest magnitude that makes sense (a pixel
    coordinate, a slice count), checked here so a huge value never reaches the arithmetic that follows."""
    cell = table.columns[column][index].strip()
    if cell == "":
        if allow_empty:
            return None
        raise _BadRow(f"column {column!r} is empty")
    try:
        value = float(cell)
    except ValueError:
        raise _BadRow(f"column {column!r} is not a number: {cell!r}") from None
    if not math.isfinite(value):
        raise _BadRow(f"column {column!r} is not finite: {cell!r}")
    if limit is not None and abs(value) > limit:
        raise _BadRow(f"column {column!r} is out of range: {_short(cell)} (at most {limit:g})")
    if integer:
        if value != round(value):
            raise _BadRow(f"column {column!r} is not an integer: {cell!r}")
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


def _xyxy_box(table: CsvTable, index: int, names: Sequence[str]) -> tuple[float, float, float, float] | None:
    """(x, y, width, height) from xmin/ymin/xmax/ymax cells, None when all four are empty (no finding)."""
    cells = [table.columns[name][index].strip() for name in names]
    if all(cell == "" for cell in cells):
        return None
    if any(cell == "" for cell in cells):
        raise _BadRow(f"box is partly empty ({', '.join(f'{n}={c!r}' for n, c in zip(names, cells))})")
    xmin, ymin, xmax, ymax = (_number(table, name, index, limit=MAX_SIDE) for name in names)
    if xmin < 0 or ymin < 0:
        raise _BadRow(f"box has a negative coordinate ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g})")
    if xmin >= xmax or ymin >= ymax:
        raise _BadRow(f"box is empty or inverted: xmin {xmin:g}, xmax {xmax:g}, ymin {ymin:g}, ymax {ymax:g}")
    return xmin, ymin, xmax - xmin, ymax - ymin


def _split(cell: str) -> str | None:
    text = cell.strip().lower()
    if not text:
        return None
    if text not in _SPLITS:
        raise _BadRow(f"split {cell!r} is not one of training, train, test, testing (or empty)")
    return _SPLITS[text]


# ------------------------------------------------------------------------------------------- BCS-DBT
def _dbt_key(table: CsvTable, index: int) -> tuple[str, str, str]:
    pid, study, view = (table.columns[name][index].strip() for name in DBT_KEYS)
    for name, value in zip(DBT_KEYS, (pid, study, view)):
        if not value:
            raise _BadRow(f"column {name!r} is empty")
    if view.lower() not in VIEWS:
        raise _BadRow(f"View {view!r} is not one of {', '.join(VIEWS)}")
    return pid, study, view.lower()


def _locate_dbt_file(root: Path, table: CsvTable, index: int) -> tuple[Path, str]:
    """(resolved path, source as written): descriptive_path, else classic_path when that one exists."""
    csv, row = table.path, table.rows[index]
    written = [
        (name, table.columns[name][index].strip())
        for name in ("descriptive_path", "classic_path")
        if name in table.columns and table.columns[name][index].strip()
    ]
    if not written:
        raise _BadRow("no file path (descriptive_path / classic_path empty)")
    tried = []
    for _name, source in written:
        candidates = [source]
        first, _, rest = source.replace("\\", "/").partition("/")
        if rest and first == Path(root).resolve().name:
            candidates.append(rest)  # ROOT given as the 'Breast-Cancer-Screening-DBT' folder itself
        for candidate in candidates:
            path = safe_join(root, candidate, csv=csv, row=row)
            if path.is_file():
                return path, source
            tried.append(str(path))
    raise _BadRow(f"DICOM file not found: {' or '.join(tried)}")


CsvInput = Path | str | Mapping[str, Path | str] | Sequence[Path | str] | None


def _csv_input(value: CsvInput, flag: str) -> Path | dict[str, Path] | None:
    try:
        return split_csvs(value)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _by_name(found: Path | dict[str, Path]) -> Path | dict[str, Path]:
    """A lone CSV found in ROOT stands for the split its name carries (``...-labels-train-v2.csv``: train only)."""
    if isinstance(found, dict):
        return found
    split = split_of_file_name(found.name)
    return found if split is None else {split: found}


def _listed(files: Sequence[Path]) -> str:
    return ", ".join(str(f) for f in files)


def discover_bcs_dbt(
    root: Path,
    *,
    file_paths_csv: CsvInput = None,
    labels_csv: CsvInput = None,
    boxes_csv: CsvInput = None,
    skipped: Skipped | None = None,
) -> list[ImageRecord]:
    """BCS-DBT volumes with labels and boxes, in file-paths CSV order.

    Each CSV argument is one path, or one path per split (``{"train": P, "val": P, "test": P}``, or a list of
    ``SPLIT=PATH``; see :func:`comoto_cli.data.splits.split_csvs`). CSVs not given are found under ``root``
    by their columns (:func:`find_split_csvs`): the release's ``BCS-DBT-file-paths-train-v2.csv``,
    ``...-validation-v2.csv``, ``...-test-v2.csv`` are read together. A volume from a file-paths CSV of a split
    gets that split (``record.split``; None from a lone CSV); one listed under two splits is a bad row naming
    both files. Labels and boxes are matched to volumes by (PatientID, StudyUID, View) across all their CSVs;
    those of a split without a file-paths CSV are not read.

    The labels CSV is required (a volume without a labels row is a bad row; extra labels rows are ignored); with
    file-paths CSVs per split, every split needs a labels CSV of its own or one plain labels CSV for all. A split
    may have no boxes CSV (e.g. a test release) only when none of its volumes is labelled cancer or benign.
    ``volume_slices`` is the VolumeSlices of the view's first box row, as the DBTex scorer uses it.
    """
    root = Path(root)
    path_csvs = _csv_input(file_paths_csv, "--file-paths-csv")
    if path_csvs is None:
        path_csvs = find_split_csvs(root, [*DBT_KEYS, "descriptive_path"], flag="--file-paths-csv")
    if path_csvs is None:
        path_csvs = find_split_csvs(root, [*DBT_KEYS, "classic_path"], flag="--file-paths-csv")
        if path_csvs is None:
            raise _none_found(root, [*DBT_KEYS, "classic_path"], "--file-paths-csv")
    by_split = isinstance(path_csvs, dict)
    path_files: list[tuple[str | None, Path]] = list(path_csvs.items()) if by_split else [(None, path_csvs)]
    splits_given = [split for split, _ in path_files]

    def used(value: Path | dict[str, Path] | None, found: bool) -> list[tuple[str | None, Path]]:
        """The labels / boxes CSVs to read: with file paths per split, those of the same splits (a lone CSV found
        in ROOT counts for the split its name carries), else all."""
        if value is None:
            return []
        if by_split and found:
            value = _by_name(value)
        if not isinstance(value, dict):
            return [(None, value)]
        return [(split, path) for split, path in value.items() if not by_split or split in splits_given]

    labels_given = _csv_input(labels_csv, "--labels-csv")
    label_cols = [*DBT_KEYS, *DBT_LABELS]
    label_csvs = labels_given or find_split_csvs(root, label_cols, flag="--labels-csv")
    if label_csvs is None:
        raise _none_found(root, label_cols, "--labels-csv")
    label_files = used(label_csvs, labels_given is None)
    if by_split and all(split is not None for split, _ in label_files):
        have = {split for split, _ in label_files}
        for split, path_csv in path_files:
            if split not in have:
                found = label_csvs.values() if isinstance(label_csvs, dict) else [label_csvs]
                raise InputDataError(
                    f"no labels CSV for the {release_name(split)} split (labels CSVs: {_listed(list(found))}); "
                    f"pass it with --labels-csv {release_name(split)}=PATH, or choose the file-paths CSVs with "
                    f"--file-paths-csv SPLIT=PATH",
                    path=path_csv,
                )
    boxes_given = _csv_input(boxes_csv, "--boxes-csv")
    box_cols = [*DBT_KEYS, *DBT_BOX_COLUMNS]
    box_csvs = boxes_given or find_split_csvs(root, box_cols, flag="--boxes-csv")
    box_files = used(box_csvs, boxes_given is None)

    # -- file paths
    records: dict[tuple[str, str, str], ImageRecord] = {}
    first_seen: dict[tuple[str, str, str], tuple[Path, int, str | None]] = {}
    for split, path_csv in path_files:
        paths = read_csv(path_csv, DBT_KEYS, optional=("descriptive_path", "classic_path"))
        if "descriptive_path" not in paths.columns and "classic_path" not in paths.columns:
            raise InputDataError("missing column 'descriptive_path' (or 'classic_path')", path=path_csv, row=1)
        for index, row in enumerate(paths.rows):
            key = None
            try:
                key = _dbt_key(paths, index)
                if key in first_seen:
                    other_csv, other_row, other_split = first_seen[key]
                    if other_csv == paths.path:
                        raise _BadRow(f"duplicate volume {'/'.join(key)} (also in row {other_row})")
                    records.pop(key, None)  # which split is right is not known: the volume goes
                    raise _BadRow(
                        f"volume {'/'.join(key)} is in the {release_name(split)} split here and in the "
                        f"{release_name(other_split)} split in {other_csv}, row {other_row}"
                    )
                first_seen[key] = (paths.path, row, split)
                path, source = _locate_dbt_file(root, paths, index)
            except (_BadRow, InputDataError) as exc:
                error = exc if isinstance(exc, InputDataError) else _row_error(str(exc), paths.path, row)
                _report(skipped, error, paths.path, row)
                continue
            records[key] = ImageRecord(
                patient_id=key[0],
                study_uid=key[1],
                view=key[2],
                path=path,
                source=source,
                label="",
                boxes=[],
                volume_slices=None,
                split=split,
                csv=Path(path_csv),
                row=row,
            )
    # Keys that appeared in a file-paths CSV (even on a rejected row): their labels/boxes are not "foreign".
    listed = set(first_seen)

    # -- labels
    label_row: dict[tuple[str, str, str], tuple[Path, int]] = {}
    for _split, label_csv in label_files:
        labels = read_csv(label_csv, label_cols)
        for index, row in enumerate(labels.rows):
            try:
                key = _dbt_key(labels, index)
            except _BadRow:
                continue  # cannot belong to a listed volume; extra label rows are ignored
            if key not in listed:
                continue
            try:
                if key in label_row:
                    other_csv, other_row = label_row[key]
                    where = f"row {other_row}" if other_csv == labels.path else f"{other_csv}, row {other_row}"
                    raise _BadRow(f"duplicate labels for volume {'/'.join(key)} (also in {where})")
                label_row[key] = (labels.path, row)
                label = ""
                for name in DBT_LABELS:
                    value = _number(labels, name, index)
                    if value not in (0.0, 1.0):
                        raise _BadRow(f"column {name!r} must be 0 or 1, not {labels.columns[name][index]!r}")
                    if value == 1.0 and not label:
                        label = name.lower()
                if not label:
                    raise _BadRow("none of Normal, Actionable, Benign, Cancer is 1")
            except _BadRow as exc:
                if key in records:
                    _report(skipped, _row_error(str(exc), labels.path, row), labels.path, row)
                    del records[key]
                continue
            if key in records:
                records[key].label = label
                records[key].labels_csv = Path(label_csv)
    for key in list(records):
        if key not in label_row:
            record = records.pop(key)
            which = "the labels CSV" if len(label_files) == 1 else "any of the labels CSVs"
            error = _row_error(
                f"volume {'/'.join(key)} has no row in {which} {_listed([f for _, f in label_files])}",
                record.csv,
                record.row,
            )
            _report(skipped, error, record.csv, record.row)

    # -- boxes
    box_splits = {split for split, _ in box_files}
    uncovered = [r for r in records.values()
                 if not box_files or (by_split and None not in box_splits and r.split not in box_splits)]
    lesion_volumes = [r for r in uncovered if r.label in ("cancer", "benign")]
    if lesion_volumes:
        if not box_files:
            raise InputDataError(
                f"{len(lesion_volumes)} volume(s) are labelled cancer/benign but no boxes CSV with the columns "
                f"{', '.join(box_cols)} was found under it; pass it with --boxes-csv",
                path=root,
            )
        split = lesion_volumes[0].split
        count = sum(r.split == split for r in lesion_volumes)
        raise InputDataError(
            f"{count} volume(s) of the {release_name(split)} split are labelled cancer/benign but there is no "
            f"boxes CSV for that split (boxes CSVs: {_listed([f for _, f in box_files])}); pass it with "
            f"--boxes-csv {release_name(split)}=PATH",
            path=lesion_volumes[0].csv,
        )
    path_names = _listed([f for _, f in path_files])
    box_source: dict[tuple[str, str, str], Path] = {}
    for _split, box_csv in box_files:
        boxes = read_csv(box_csv, box_cols, optional=("Class",))
        for index, row in enumerate(boxes.rows):
            key = None
            try:
                key = _dbt_key(boxes, index)
                if key not in listed:
                    which = "the file-paths CSV" if len(path_files) == 1 else "any of the file-paths CSVs"
                    raise _BadRow(f"box for volume {'/'.join(key)}, which is not in {which} {path_names}")
                if key not in records:
                    continue  # the volume was already left out (and reported)
                if box_source.setdefault(key, boxes.path) != boxes.path:
                    raise _BadRow(f"boxes for volume {'/'.join(key)} are in {box_source[key]} too")
                slice_index = _number(boxes, "Slice", index, integer=True, limit=MAX_FRAMES)
                volume_slices = _number(boxes, "VolumeSlices", index, integer=True, limit=MAX_FRAMES)
                x, y = _number(boxes, "X", index, limit=MAX_SIDE), _number(boxes, "Y", index, limit=MAX_SIDE)
                width = _number(boxes, "Width", index, limit=MAX_SIDE)
                height = _number(boxes, "Height", index, limit=MAX_SIDE)
                if volume_slices <= 0:
                    raise _BadRow(f"VolumeSlices {volume_slices} must be positive")
                if not 0 <= slice_index < volume_slices:
                    raise _BadRow(f"Slice {slice_index} is outside [0, VolumeSlices={volume_slices})")
                if x < 0 or y < 0:
                    raise _BadRow(f"box has a negative coordinate (X {x:g}, Y {y:g})")
                if width <= 0 or height <= 0:
                    raise _BadRow(f"box has zero or negative size (Width {width:g}, Height {height:g})")
            except _BadRow as exc:
                _report(skipped, _row_error(str(exc), boxes.path, row), boxes.path, row)
                if key is not None:
                    records.pop(key, None)
                continue
            record = records[key]
            cls = boxes.columns["Class"][index].strip() if "Class" in boxes.columns else ""
            record.boxes.append(
                LesionBox(
                    slice=slice_index,
                    x=x,
                    y=y,
                    width=width,
                    height=height,
                    cls=cls or "lesion",
                    csv=Path(box_csv),
                    row=row,
                )
            )
            if record.volume_slices is None:
                record.volume_slices = volume_slices
    return list(records.values())


# --------------------------------------------------------------------------------------- mammography
def _categories(cell: str) -> list[str]:
    text = cell.strip()
    if len(text) > _MAX_LITERAL:
        raise _BadRow(f"finding_categories is too long ({len(text)} characters)")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise _BadRow(f"finding_categories is not a list literal: {cell!r}") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise _BadRow(f"finding_categories is not a list of strings: {cell!r}")
    return [item.strip() for item in value]


def _mammo_box(box: tuple[float, float, float, float], cls: str, csv: Path, row: int) -> LesionBox:
    """A mammogram's lesion box (x, y, width, height in the stored frame; slice 0)."""
    return LesionBox(slice=0, x=box[0], y=box[1], width=box[2], height=box[3], cls=cls, csv=csv, row=row)


def _mammo_records(root: Path, csv: Path, entries: list[tuple[str, dict]], skipped: Skipped | None) -> list[ImageRecord]:
    """One record per (relative source path, gathered entry) whose file exists inside the root; shared by the
    VinDr and manifest adapters (an entry holds patient, study, view, split, row and its boxes)."""
    records = []
    for source, entry in entries:
        try:
            path = safe_join(root, source, csv=csv, row=entry["row"])
            if not path.is_file():
                raise _row_error(f"DICOM file not found: {path}", csv, entry["row"])
        except InputDataError as exc:
            _report(skipped, exc, csv, entry["row"])
            continue
        records.append(ImageRecord(
            patient_id=entry["patient"], study_uid=entry["study"], view=entry["view"], path=path, source=source,
            label="lesion" if entry["boxes"] else "normal", boxes=entry["boxes"], volume_slices=None,
            split=entry["split"], csv=csv, row=entry["row"],
        ))
    return records


def discover_vindr(
    root: Path, *, annotations_csv: Path | None = None, skipped: Skipped | None = None
) -> list[ImageRecord]:
    """VinDr-Mammo images (``images/<study_id>/<image_id>.dicom``) with their finding boxes.

    One record per image_id, gathering all its finding rows (boxes from rows with coordinates; a row with all
    four coordinates empty is a finding without a box, e.g. 'No Finding'). VinDr has no patient column: a study
    is a patient, so ``patient_id = study_uid = study_id``.
    """
    root = Path(root)
    if annotations_csv is None:
        annotations_csv = find_csv_by_columns(root, VINDR_COLUMNS, flag="--annotations-csv")
    table = read_csv(annotations_csv, VINDR_COLUMNS, optional=("split",))
    csv = table.path
    order: list[str] = []
    images: dict[str, dict] = {}
    bad: set[str] = set()
    for index, row in enumerate(table.rows):
        image_id = table.columns["image_id"][index].strip()
        try:
            if not image_id:
                raise _BadRow("column 'image_id' is empty")
            study_id = table.columns["study_id"][index].strip()
            if not study_id:
                raise _BadRow("column 'study_id' is empty")
            laterality = table.columns["laterality"][index].strip().upper()
            position = table.columns["view_position"][index].strip().lower()
            view = laterality[:1].lower() + position
            if laterality not in ("L", "R") or view not in VIEWS:
                raise _BadRow(
                    f"laterality {table.columns['laterality'][index]!r} / view_position "
                    f"{table.columns['view_position'][index]!r} is not L/R with CC/MLO"
                )
            split = _split(table.columns["split"][index]) if "split" in table.columns else None
            categories = _categories(table.columns["finding_categories"][index])
            box = _xyxy_box(table, index, ("xmin", "ymin", "xmax", "ymax"))
            entry = images.get(image_id)
            if entry is None:
                if image_id in bad:
                    continue
                entry = {"study": study_id, "view": view, "split": split, "row": row, "boxes": []}
                images[image_id] = entry
                order.append(image_id)
            elif (entry["study"], entry["view"], entry["split"]) != (study_id, view, split):
                raise _BadRow(
                    f"image {image_id} has study/view/split {study_id}/{view}/{split} here but "
                    f"{entry['study']}/{entry['view']}/{entry['split']} in row {entry['row']}"
                )
            if box is not None:
                entry["boxes"].append(_mammo_box(box, ", ".join(categories) or "lesion", csv, row))
        except _BadRow as exc:
            _report(skipped, _row_error(str(exc), csv, row), csv, row)
            if image_id:
                images.pop(image_id, None)
                bad.add(image_id)
            continue
    entries = [(f"images/{images[i]['study']}/{i}.dicom", {**images[i], "patient": images[i]["study"]})
               for i in order if i in images]
    return _mammo_records(root, csv, entries, skipped)


def read_manifest(root: Path, manifest_csv: Path, *, skipped: Skipped | None = None) -> list[ImageRecord]:
    """Generic mammography manifest: ``path, patient_id, xmin, ymin, xmax, ymax`` (+ optional ``study_uid``,
    ``view``, ``split``, ``class``). Several rows per path = several boxes; a row with an empty box = no lesion.
    Paths are relative to ``root``; ``study_uid`` defaults to the patient id."""
    root = Path(root)
    table = read_csv(manifest_csv, MANIFEST_COLUMNS, optional=("study_uid", "view", "split", "class"))
    csv = table.path
    order: list[str] = []
    images: dict[str, dict] = {}
    bad: set[str] = set()

    def cell(name: str, index: int) -> str:
        return table.columns[name][index].strip() if name in table.columns else ""

    for index, row in enumerate(table.rows):
        source = cell("path", index)
        try:
            if not source:
                raise _BadRow("column 'path' is empty")
            patient = cell("patient_id", index)
            if not patient:
                raise _BadRow("column 'patient_id' is empty")
            study = cell("study_uid", index) or patient
            view = cell("view", index).lower()
            if view and view not in VIEWS:
                raise _BadRow(f"view {cell('view', index)!r} is not one of {', '.join(VIEWS)} (or empty)")
            split = _split(cell("split", index))
            box = _xyxy_box(table, index, ("xmin", "ymin", "xmax", "ymax"))
            entry = images.get(source)
            if entry is None:
                if source in bad:
                    continue
                entry = {
                    "patient": patient,
                    "study": study,
                    "view": view,
                    "split": split,
                    "row": row,
                    "boxes": [],
                }
                images[source] = entry
                order.append(source)
            elif (entry["patient"], entry["study"], entry["view"], entry["split"]) != (
                patient,
                study,
                view,
                split,
            ):
                raise _BadRow(
                    f"{source} has patient/study/view/split {patient}/{study}/{view}/{split} here but "
                    f"{entry['patient']}/{entry['study']}/{entry['view']}/{entry['split']} in row {entry['row']}"
                )
            if box is not None:
                entry["boxes"].append(_mammo_box(box, cell("class", index) or "lesion", csv, row))
        except _BadRow as exc:
            _report(skipped, _row_error(str(exc), csv, row), csv, row)
            if source:
                images.pop(source, None)
                bad.add(source)
    entries = [(source, images[source]) for source in order if source in images]
    return _mammo_records(root, csv, entries, skipped)


def discover_mammo(
    root: Path,
    *,
    annotations_csv: Path | None = None,
    manifest_csv: Path | None = None,
    skipped: Skipped | None = None,
) -> list[ImageRecord]:
    """Mammograms from a generic manifest when one is given, else from the VinDr-Mammo layout."""
    if manifest_csv is not None:
        return read_manifest(root, manifest_csv, skipped=skipped)
    return discover_vindr(root, annotations_csv=annotations_csv, skipped=skipped)
