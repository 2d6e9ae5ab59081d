"""BCS-DBT (Duke Breast Cancer Screening DBT, TCIA): multi-frame DICOM volumes listed by a file-paths CSV, with a
labels CSV (one row per view) and a boxes CSV (one row per lesion), all keyed by (PatientID, StudyUID, View).

The release ships each table per split (``BCS-DBT-file-paths-train-v2.csv``, ``...-validation-v2.csv``,
``...-test-v2.csv``); they are found in ROOT by their columns or given with ``--file-paths-csv`` /
``--labels-csv`` / ``--boxes-csv`` (each repeatable as ``SPLIT=PATH``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from comoto_cli.config import PreprocessConfig
from comoto_cli.data.adapters.base import VolumeAdapter, register
from comoto_cli.data.dicom_io import MAX_FRAMES, MAX_SIDE
from comoto_cli.data.sources import (
    BadRow,
    CsvInput,
    ImageRecord,
    LesionBox,
    Skipped,
    csv_input,
    find_split_csvs,
    none_found,
    number,
    report,
    row_error,
    safe_join,
)
from comoto_cli.data.tables import BCS_DBT_BOX_GEOMETRY, BCS_DBT_LABEL_FLAGS, BCS_DBT_PATH_COLUMNS, DBT_KEYS, DBT_VIEWS
from comoto_cli.errors import InputDataError
from comoto_cli.utils.csvio import CsvTable, read_csv
from comoto_cli.utils.split_names import release_name, split_of_file_name

Key = tuple[str, str, str]  # (PatientID, StudyUID, View)
Files = list[tuple[str | None, Path]]  # (split the CSV is for, None: no split of its own; path)
LABEL_COLUMNS = (*DBT_KEYS, *BCS_DBT_LABEL_FLAGS)
BOX_COLUMNS = (*DBT_KEYS, *BCS_DBT_BOX_GEOMETRY)


@register
class BcsDbt(VolumeAdapter):
    """BCS-DBT volumes (the default for ``comoto preprocess dbt``)."""

    name: ClassVar[str] = "bcs-dbt"
    config_fields: ClassVar[tuple[str, ...]] = ("file_paths_csv", "labels_csv", "boxes_csv")

    def discover(self, root: Path, config: PreprocessConfig, skipped: Skipped | None) -> list[ImageRecord]:
        return discover_bcs_dbt(root, file_paths_csv=config.file_paths_csv, labels_csv=config.labels_csv,
                                boxes_csv=config.boxes_csv, skipped=skipped)


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
    ``SPLIT=PATH``; see :func:`comoto_cli.utils.split_names.split_csvs`). CSVs not given are found under ``root``
    by their columns (:func:`~comoto_cli.data.sources.find_split_csvs`): the release's
    ``BCS-DBT-file-paths-train-v2.csv``, ``...-validation-v2.csv``, ``...-test-v2.csv`` are read together. A volume
    from a file-paths CSV of a split gets that split (``record.split``; None from a lone CSV); one listed under two
    splits is a bad row naming both files. Labels and boxes are matched to volumes by (PatientID, StudyUID, View)
    across all their CSVs; those of a split without a file-paths CSV are not read.

    The labels CSV is required (a volume without a labels row is a bad row; extra labels rows are ignored); with
    file-paths CSVs per split, every split needs a labels CSV of its own or one plain labels CSV for all. A split
    may have no boxes CSV (e.g. a test release) only when none of its volumes is labelled cancer or benign.
    ``volume_slices`` is the VolumeSlices of the view's first box row, as the DBTex scorer uses it.
    """
    root = Path(root)
    csvs = _find_csvs(root, file_paths_csv, labels_csv, boxes_csv)
    records, listed = _read_file_paths(root, csvs.paths, skipped)
    label_row = _read_labels(csvs.labels, records, listed, skipped)
    _drop_unlabelled(csvs.labels, records, label_row, skipped)
    _check_boxes_cover_lesions(root, csvs, records)
    _read_boxes(csvs, records, listed, skipped)
    return list(records.values())


# ---------------------------------------------------------------------------------------------- the CSVs
@dataclass
class _Csvs:
    """The CSVs of one run, each with the split it is for."""

    paths: Files
    labels: Files
    boxes: Files

    @property
    def by_split(self) -> bool:
        """File paths given per split (the release's layout) rather than one plain CSV."""
        return self.paths[0][0] is not None


def _find_csvs(root: Path, file_paths_csv: CsvInput, labels_csv: CsvInput, boxes_csv: CsvInput) -> _Csvs:
    """The CSVs given, else those found in ROOT by their columns; labels must cover every split of the file paths."""
    path_csvs = _file_path_csvs(root, csv_input(file_paths_csv, "--file-paths-csv"))
    paths: Files = list(path_csvs.items()) if isinstance(path_csvs, dict) else [(None, path_csvs)]
    by_split = isinstance(path_csvs, dict)
    splits = {split for split, _ in paths}
    labels_given = csv_input(labels_csv, "--labels-csv")
    label_csvs = labels_given or find_split_csvs(root, LABEL_COLUMNS, flag="--labels-csv")
    if label_csvs is None:
        raise none_found(root, LABEL_COLUMNS, "--labels-csv")
    labels = _used(label_csvs, labels_given is None, by_split, splits)
    if by_split and all(split is not None for split, _ in labels):
        _check_labels_per_split(paths, labels, label_csvs)
    boxes_given = csv_input(boxes_csv, "--boxes-csv")
    box_csvs = boxes_given or find_split_csvs(root, BOX_COLUMNS, flag="--boxes-csv")
    return _Csvs(paths, labels, _used(box_csvs, boxes_given is None, by_split, splits))


def _file_path_csvs(root: Path, given: Path | dict[str, Path] | None) -> Path | dict[str, Path]:
    """The file-paths CSVs given, else found: those with descriptive_path, else those with classic_path."""
    if given is not None:
        return given
    for column in BCS_DBT_PATH_COLUMNS:
        found = find_split_csvs(root, [*DBT_KEYS, column], flag="--file-paths-csv")
        if found is not None:
            return found
    raise none_found(root, [*DBT_KEYS, BCS_DBT_PATH_COLUMNS[-1]], "--file-paths-csv")


def _used(value: Path | dict[str, Path] | None, found: bool, by_split: bool, splits: set[str | None]) -> Files:
    """The labels / boxes CSVs to read: with file paths per split, those of the same splits (a lone CSV found in
    ROOT counts for the split its name carries), else all."""
    if value is None:
        return []
    if by_split and found:
        value = _by_name(value)
    if not isinstance(value, dict):
        return [(None, value)]
    return [(split, path) for split, path in value.items() if not by_split or split in splits]


def _by_name(found: Path | dict[str, Path]) -> Path | dict[str, Path]:
    """A lone CSV found in ROOT stands for the split its name carries (``...-labels-train-v2.csv``: train only)."""
    if isinstance(found, dict):
        return found
    split = split_of_file_name(found.name)
    return found if split is None else {split: found}


def _check_labels_per_split(paths: Files, labels: Files, label_csvs: Path | dict[str, Path]) -> None:
    have = {split for split, _ in labels}
    for split, path_csv in paths:
        if split not in have:
            found = label_csvs.values() if isinstance(label_csvs, dict) else [label_csvs]
            raise InputDataError(
                f"no labels CSV for the {release_name(split)} split (labels CSVs: {_listed(list(found))}); "
                f"pass it with --labels-csv {release_name(split)}=PATH, or choose the file-paths CSVs with "
                f"--file-paths-csv SPLIT=PATH",
                path=path_csv,
            )


def _listed(files: Sequence[Path]) -> str:
    return ", ".join(str(f) for f in files)


# ---------------------------------------------------------------------------------------------- rows
def _dbt_key(table: CsvTable, index: int) -> Key:
    pid, study, view = (table.columns[name][index].strip() for name in DBT_KEYS)
    for name, value in zip(DBT_KEYS, (pid, study, view)):
        if not value:
            raise BadRow(f"column {name!r} is empty")
    if view.lower() not in DBT_VIEWS:
        raise BadRow(f"View {view!r} is not one of {', '.join(DBT_VIEWS)}")
    return pid, study, view.lower()


def _locate_dbt_file(root: Path, table: CsvTable, index: int) -> tuple[Path, str]:
    """(resolved path, source as written): descriptive_path, else classic_path when that one exists."""
    csv, row = table.path, table.rows[index]
    written = [
        (name, table.columns[name][index].strip())
        for name in BCS_DBT_PATH_COLUMNS
        if name in table.columns and table.columns[name][index].strip()
    ]
    if not written:
        raise BadRow("no file path (descriptive_path / classic_path empty)")
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
    raise BadRow(f"DICOM file not found: {' or '.join(tried)}")


def _read_file_paths(root: Path, paths: Files, skipped: Skipped | None) -> tuple[dict[Key, ImageRecord], set[Key]]:
    """One record per volume, and every key listed (even on a rejected row: its labels and boxes are not
    "foreign" rows then)."""
    records: dict[Key, ImageRecord] = {}
    first_seen: dict[Key, tuple[Path, int, str | None]] = {}
    for split, path_csv in paths:
        table = read_csv(path_csv, DBT_KEYS, optional=BCS_DBT_PATH_COLUMNS)
        if not any(name in table.columns for name in BCS_DBT_PATH_COLUMNS):
            raise InputDataError("missing column 'descriptive_path' (or 'classic_path')", path=path_csv, row=1)
        for index, row in enumerate(table.rows):
            try:
                key = _dbt_key(table, index)
                if key in first_seen:
                    other_csv, other_row, other_split = first_seen[key]
                    if other_csv == table.path:
                        raise BadRow(f"duplicate volume {'/'.join(key)} (also in row {other_row})")
                    records.pop(key, None)  # which split is right is not known: the volume goes
                    raise BadRow(
                        f"volume {'/'.join(key)} is in the {release_name(split)} split here and in the "
                        f"{release_name(other_split)} split in {other_csv}, row {other_row}"
                    )
                first_seen[key] = (table.path, row, split)
                path, source = _locate_dbt_file(root, table, index)
            except (BadRow, InputDataError) as exc:
                error = exc if isinstance(exc, InputDataError) else row_error(str(exc), table.path, row)
                report(skipped, error, table.path, row)
                continue
            records[key] = ImageRecord(patient_id=key[0], study_uid=key[1], view=key[2], path=path, source=source,
                                       label="", boxes=[], volume_slices=None, split=split, csv=Path(path_csv),
                                       row=row)
    return records, set(first_seen)


def _read_labels(labels: Files, records: dict[Key, ImageRecord], listed: set[Key],
                 skipped: Skipped | None) -> dict[Key, tuple[Path, int]]:
    """Label every listed volume from its labels row; returns where each key's labels row is."""
    label_row: dict[Key, tuple[Path, int]] = {}
    for _split, label_csv in labels:
        table = read_csv(label_csv, LABEL_COLUMNS)
        for index, row in enumerate(table.rows):
            try:
                key = _dbt_key(table, index)
            except BadRow:
                continue  # cannot belong to a listed volume; extra label rows are ignored
            if key not in listed:
                continue
            try:
                if key in label_row:
                    other_csv, other_row = label_row[key]
                    where = f"row {other_row}" if other_csv == table.path else f"{other_csv}, row {other_row}"
                    raise BadRow(f"duplicate labels for volume {'/'.join(key)} (also in {where})")
                label_row[key] = (table.path, row)
                label = _label(table, index)
            except BadRow as exc:
                if key in records:
                    report(skipped, row_error(str(exc), table.path, row), table.path, row)
                    del records[key]
                continue
            if key in records:
                records[key].label = label
                records[key].labels_csv = Path(label_csv)
    return label_row


def _label(table: CsvTable, index: int) -> str:
    """The most severe label flag set on a labels row (each flag 0 or 1, at least one 1)."""
    label = ""
    for name in BCS_DBT_LABEL_FLAGS:
        value = number(table, name, index)
        if value not in (0.0, 1.0):
            raise BadRow(f"column {name!r} must be 0 or 1, not {table.columns[name][index]!r}")
        if value == 1.0 and not label:
            label = name.lower()
    if not label:
        raise BadRow("none of Normal, Actionable, Benign, Cancer is 1")
    return label


def _drop_unlabelled(labels: Files, records: dict[Key, ImageRecord], label_row: dict[Key, tuple[Path, int]],
                     skipped: Skipped | None) -> None:
    for key in list(records):
        if key not in label_row:
            record = records.pop(key)
            which = "the labels CSV" if len(labels) == 1 else "any of the labels CSVs"
            error = row_error(f"volume {'/'.join(key)} has no row in {which} {_listed([f for _, f in labels])}",
                              record.csv, record.row)
            report(skipped, error, record.csv, record.row)


def _check_boxes_cover_lesions(root: Path, csvs: _Csvs, records: dict[Key, ImageRecord]) -> None:
    """A volume labelled cancer or benign needs a boxes CSV for its split: without one its lesions are unknown."""
    box_splits = {split for split, _ in csvs.boxes}
    uncovered = [r for r in records.values()
                 if not csvs.boxes or (csvs.by_split and None not in box_splits and r.split not in box_splits)]
    lesion_volumes = [r for r in uncovered if r.label in ("cancer", "benign")]
    if not lesion_volumes:
        return
    if not csvs.boxes:
        raise InputDataError(
            f"{len(lesion_volumes)} volume(s) are labelled cancer/benign but no boxes CSV with the columns "
            f"{', '.join(BOX_COLUMNS)} was found under it; pass it with --boxes-csv",
            path=root,
        )
    split = lesion_volumes[0].split
    count = sum(r.split == split for r in lesion_volumes)
    raise InputDataError(
        f"{count} volume(s) of the {release_name(split)} split are labelled cancer/benign but there is no "
        f"boxes CSV for that split (boxes CSVs: {_listed([f for _, f in csvs.boxes])}); pass it with "
        f"--boxes-csv {release_name(split)}=PATH",
        path=lesion_volumes[0].csv,
    )


def _read_boxes(csvs: _Csvs, records: dict[Key, ImageRecord], listed: set[Key], skipped: Skipped | None) -> None:
    """Attach every box row to its volume; a bad row leaves its volume out (no volume keeps part of its lesions)."""
    path_names = _listed([f for _, f in csvs.paths])
    which = "the file-paths CSV" if len(csvs.paths) == 1 else "any of the file-paths CSVs"
    box_source: dict[Key, Path] = {}
    for _split, box_csv in csvs.boxes:
        table = read_csv(box_csv, BOX_COLUMNS, optional=("Class",))
        for index, row in enumerate(table.rows):
            key = None
            try:
                key = _dbt_key(table, index)
                if key not in listed:
                    raise BadRow(f"box for volume {'/'.join(key)}, which is not in {which} {path_names}")
                if key not in records:
                    continue  # the volume was already left out (and reported)
                if box_source.setdefault(key, table.path) != table.path:
                    raise BadRow(f"boxes for volume {'/'.join(key)} are in {box_source[key]} too")
                box, volume_slices = _box(table, index, Path(box_csv), row)
            except BadRow as exc:
                report(skipped, row_error(str(exc), table.path, row), table.path, row)
                if key is not None:
                    records.pop(key, None)
                continue
            records[key].boxes.append(box)
            if records[key].volume_slices is None:
                records[key].volume_slices = volume_slices


def _box(table: CsvTable, index: int, csv: Path, row: int) -> tuple[LesionBox, int]:
    """One box row: the lesion and the VolumeSlices it was drawn on."""
    slice_index = number(table, "Slice", index, integer=True, limit=MAX_FRAMES)
    volume_slices = number(table, "VolumeSlices", index, integer=True, limit=MAX_FRAMES)
    x, y = number(table, "X", index, limit=MAX_SIDE), number(table, "Y", index, limit=MAX_SIDE)
    width = number(table, "Width", index, limit=MAX_SIDE)
    height = number(table, "Height", index, limit=MAX_SIDE)
    if volume_slices <= 0:
        raise BadRow(f"VolumeSlices {volume_slices} must be positive")
    if not 0 <= slice_index < volume_slices:
        raise BadRow(f"Slice {slice_index} is outside [0, VolumeSlices={volume_slices})")
    if x < 0 or y < 0:
        raise BadRow(f"box has a negative coordinate (X {x:g}, Y {y:g})")
    if width <= 0 or height <= 0:
        raise BadRow(f"box has zero or negative size (Width {width:g}, Height {height:g})")
    cls = table.columns["Class"][index].strip() if "Class" in table.columns else ""
    return LesionBox(slice=slice_index, x=x, y=y, width=width, height=height, cls=cls or "lesion", csv=csv,
                     row=row), volume_slices
