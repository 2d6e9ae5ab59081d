"""Every table the CLI reads or writes: its columns, what they mean, and the readers and writers that use them.

Tables are CSV files parsed by :mod:`comoto_cli.utils.csvio` (text cells, errors naming file and row); this module
says which columns each format has. ``docs/design.md`` section 6 describes the same formats in prose.

Input tables (as the public datasets ship them)
    * BCS-DBT file paths, labels and boxes (one row per view, per view, per lesion), keyed by
      (PatientID, StudyUID, View) -- the adapters in :mod:`comoto_cli.data.sources` read them;
    * VinDr-Mammo ``finding_annotations.csv`` (one row per finding) and ``breast-level_annotations.csv``;
    * the generic mammography manifest (one row per box);
    * the CBIS-DDSM description CSVs (one row per abnormality, its box in an ROI mask DICOM).

Output tables (written by this CLI)
    * the DBTex submission (one row per 3-D detection), the challenge's own format;
    * the ``comoto predict`` table: a DBTex submission plus the input file;
    * per-image predictions of a mammography checkpoint evaluation.

Scorer tables
    The DBTex scorer (:mod:`comoto_cli.metrics.dbtex`) works on three column dictionaries -- predictions, boxes,
    labels -- with text columns as ``str`` arrays and numbers as float64 (label flags int64). The readers below
    build them from CSV files; :func:`dbtex_boxes` and :func:`dbtex_labels` build the same structures from
    arrays (checkpoint evaluation takes its ground truth from a cache that way, with no CSV in between).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from comoto_cli.errors import InputDataError
from comoto_cli.utils.csvio import CsvTable, read_csv, write_csv_atomic

# ============================================================================================== BCS-DBT
#: The four DBT views, lower case as the BCS-DBT CSVs write them (laterality letter + CC/MLO).
DBT_VIEWS = ("lcc", "lmlo", "rcc", "rmlo")

#: Key of a DBT volume in every BCS-DBT and DBTex table. PatientID: TCIA patient (``DBT-P00013``); StudyUID: the
#: TCIA study label (``DBT-S04378``), not the DICOM StudyInstanceUID; View: one of :data:`DBT_VIEWS`.
DBT_KEYS = ("PatientID", "StudyUID", "View")

#: The two file-path columns of the BCS-DBT file-paths CSV, relative to the data root: ``descriptive_path``
#: (the TCIA download's named folders; preferred) and ``classic_path`` (UID folders, the other download layout).
BCS_DBT_PATH_COLUMNS = ("descriptive_path", "classic_path")

#: BCS-DBT file-paths CSV: one row per view (one multi-frame DICOM each).
BCS_DBT_FILE_PATHS_COLUMNS = (*DBT_KEYS, *BCS_DBT_PATH_COLUMNS)

#: The 0/1 label flags of the BCS-DBT labels CSV, most severe first: a volume's label is the first flag set.
BCS_DBT_LABEL_FLAGS = ("Cancer", "Benign", "Actionable", "Normal")

#: BCS-DBT labels CSV: one row per view, flags in the order the release writes them.
BCS_DBT_LABELS_COLUMNS = (*DBT_KEYS, "Normal", "Actionable", "Benign", "Cancer")

#: The geometry columns of a BCS-DBT box row: ``Slice`` (the lesion's central slice, 0-based), ``X``, ``Y``
#: (top-left, pixels of the official reader's frame at full resolution), ``Width``, ``Height`` (pixels) and
#: ``VolumeSlices`` (slices in the view; the scorer's z tolerance is a quarter of it).
BCS_DBT_BOX_GEOMETRY = ("Slice", "X", "Y", "Width", "Height", "VolumeSlices")

#: BCS-DBT boxes CSV: one row per lesion. Besides the key and :data:`BCS_DBT_BOX_GEOMETRY`: ``Subject`` (the
#: patient's number), ``Class`` (``cancer`` or ``benign``) and ``AD`` (architectural distortion, 0/1); the
#: scorer uses none of those three, the adapters keep ``Class`` as the lesion's class.
BCS_DBT_BOXES_COLUMNS = (*DBT_KEYS, "Subject", "Slice", "X", "Y", "Width", "Height", "Class", "AD", "VolumeSlices")

# ============================================================================================== DBTex
#: The DBTex submission (challenge format), one row per 3-D detection: the volume key, ``X``, ``Y`` (top-left,
#: official frame, full resolution), ``Width``, ``Height`` (pixels), ``Z`` (first slice), ``Depth`` (slices
#: covered; volume NMS writes 0) and ``Score`` (higher = more suspicious). Column order as the challenge's.
DBTEX_COLUMNS = ("PatientID", "StudyUID", "View", "X", "Width", "Y", "Height", "Z", "Depth", "Score")
#: Text columns of every DBTex table (compared as stripped text, never parsed as numbers).
DBTEX_TEXT_COLUMNS = DBT_KEYS
#: Numeric columns of the DBTex submission.
DBTEX_NUMERIC_COLUMNS = ("X", "Width", "Y", "Height", "Z", "Depth", "Score")

#: The columns of a BCS-DBT boxes table that the scorer needs (a boxes CSV may carry more; ``Class`` is kept
#: when present).
DBTEX_BOX_COLUMNS = (*DBT_KEYS, "X", "Y", "Width", "Height", "Slice", "VolumeSlices")
#: The columns of a BCS-DBT labels table that the scorer needs: the volume key (each row is one volume).
DBTEX_LABEL_COLUMNS = DBT_KEYS

#: ``comoto predict`` CSV: a DBTex submission plus ``path``, the DICOM file the detection comes from.
PREDICT_COLUMNS = (*DBTEX_COLUMNS, "path")

# ============================================================================================== mammography
#: VinDr-Mammo ``finding_annotations.csv``, one row per finding: ``study_id`` (a study is a patient),
#: ``series_id``, ``image_id`` (the file is ``images/<study_id>/<image_id>.dicom``), ``laterality`` (L/R),
#: ``view_position`` (CC/MLO), ``height``, ``width`` (image size), ``breast_birads``, ``breast_density``,
#: ``finding_categories`` (a list literal such as ``['Mass']``), ``finding_birads``, ``xmin``, ``ymin``, ``xmax``,
#: ``ymax`` (box in the stored pixel frame; all four empty for a finding without a box, e.g. 'No Finding') and
#: ``split`` (``training`` / ``test``).
VINDR_FINDING_COLUMNS = (
    "study_id", "series_id", "image_id", "laterality", "view_position", "height", "width", "breast_birads",
    "breast_density", "finding_categories", "finding_birads", "xmin", "ymin", "xmax", "ymax", "split",
)
#: The finding columns the mammography adapter needs (``split`` is optional); also how it finds the file.
VINDR_REQUIRED_COLUMNS = (
    "study_id", "image_id", "laterality", "view_position", "finding_categories", "xmin", "ymin", "xmax", "ymax",
)
#: VinDr-Mammo ``breast-level_annotations.csv``, one row per image (not read by the CLI; ``comoto synth`` writes
#: it so a synthetic dataset has the full layout).
VINDR_BREAST_COLUMNS = (
    "study_id", "series_id", "image_id", "laterality", "view_position", "height", "width", "breast_birads",
    "breast_density", "split",
)

#: Generic mammography manifest, one row per box: ``path`` (DICOM file relative to the data root),
#: ``patient_id`` and the box ``xmin, ymin, xmax, ymax`` in the stored pixel frame (all four empty: an image
#: without lesion). Several rows with one path give that image several boxes.
MANIFEST_COLUMNS = ("path", "patient_id", "xmin", "ymin", "xmax", "ymax")
#: Optional manifest columns: ``study_uid`` (defaults to the patient), ``view`` (one of :data:`DBT_VIEWS` or
#: empty), ``split`` (train/val/test, training/testing) and ``class`` (lesion class, default 'lesion').
MANIFEST_OPTIONAL = ("study_uid", "view", "split", "class")

#: Per-image predictions of ``comoto evaluate --checkpoint`` on a mammography cache, one row per box:
#: ``image_id`` (the image's path relative to the data root, as the cache's ``source``), the image's
#: PatientID, StudyUID, View, the box ``X``, ``Width``, ``Y``, ``Height`` in its stored frame at full resolution
#: (2 decimals) and ``Score`` (6 decimals).
IMAGE_PREDICTION_COLUMNS = ("image_id", "PatientID", "StudyUID", "View", "X", "Width", "Y", "Height", "Score")


# ============================================================================================== DBTex tables
def _text(table: CsvTable, name: str) -> np.ndarray:
    return np.asarray(table.text(name), dtype=str)


def _require_nonnegative(table: CsvTable, values: np.ndarray, name: str) -> None:
    bad = np.flatnonzero(values < 0)
    if bad.size:
        raise InputDataError(f"column {name!r} is negative: {values[bad[0]]:g}", path=table.path, row=table.rows[bad[0]])


def _require_nonempty_text(table: CsvTable, values: np.ndarray, name: str) -> None:
    bad = np.flatnonzero(values == "")
    if bad.size:
        raise InputDataError(f"column {name!r} is empty", path=table.path, row=table.rows[bad[0]])


def _dbtex_columns(table: CsvTable, names) -> dict[str, np.ndarray]:
    """``names`` of ``table``: the key columns as non-empty text, the others as finite floats (NaN, inf or text is
    an error naming the row)."""
    columns: dict[str, np.ndarray] = {}
    for name in names:
        if name in DBTEX_TEXT_COLUMNS:
            columns[name] = _text(table, name)
            _require_nonempty_text(table, columns[name], name)
        else:
            columns[name] = table.floats(name)
    return columns


def read_dbtex_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """A DBTex submission CSV as the scorer's predictions table (:data:`DBTEX_COLUMNS`); sizes must be >= 0."""
    table = read_csv(path, DBTEX_COLUMNS)
    columns = _dbtex_columns(table, DBTEX_COLUMNS)
    for name in ("Width", "Height", "Depth"):
        _require_nonnegative(table, columns[name], name)
    return columns


def read_dbtex_boxes(path: str | Path) -> dict[str, np.ndarray]:
    """A BCS-DBT boxes CSV as the scorer's boxes table (:data:`DBTEX_BOX_COLUMNS`, plus ``Class`` when present)."""
    table = read_csv(path, DBTEX_BOX_COLUMNS, optional=("Class",))
    columns = _dbtex_columns(table, DBTEX_BOX_COLUMNS)
    if "Class" in table.columns:
        columns["Class"] = _text(table, "Class")
    for name in ("Width", "Height"):
        _require_nonnegative(table, columns[name], name)
    bad = np.flatnonzero(columns["VolumeSlices"] <= 0)
    if bad.size:
        raise InputDataError(
            f"column 'VolumeSlices' must be positive: {columns['VolumeSlices'][bad[0]]:g}",
            path=table.path, row=table.rows[bad[0]],
        )
    return columns


def read_dbtex_labels(path: str | Path) -> dict[str, np.ndarray]:
    """A BCS-DBT labels CSV as the scorer's labels table (:data:`DBTEX_LABEL_COLUMNS`; the label flags, int64,
    when present)."""
    table = read_csv(path, DBTEX_LABEL_COLUMNS, optional=BCS_DBT_LABELS_COLUMNS[len(DBT_KEYS):])
    columns: dict[str, np.ndarray] = {}
    for name in DBTEX_LABEL_COLUMNS:
        columns[name] = _text(table, name)
        _require_nonempty_text(table, columns[name], name)
    for name in BCS_DBT_LABELS_COLUMNS[len(DBT_KEYS):]:
        if name in table.columns:
            columns[name] = table.ints(name)
    return columns


def dbtex_boxes(patient_id, study_uid, view, x, y, width, height, slice_index, volume_slices) -> dict[str, np.ndarray]:
    """The scorer's boxes table from arrays (one entry per lesion): the same structure :func:`read_dbtex_boxes`
    returns for a boxes CSV. ``x, y, width, height`` in the official frame at full resolution, ``slice_index``
    the central slice, ``volume_slices`` the view's slice count."""
    text = {"PatientID": patient_id, "StudyUID": study_uid, "View": view}
    numbers = {"X": x, "Y": y, "Width": width, "Height": height, "Slice": slice_index, "VolumeSlices": volume_slices}
    columns = {name: np.asarray(values).astype(str) for name, values in text.items()}
    columns.update({name: np.asarray(values, dtype=np.float64) for name, values in numbers.items()})
    return {name: columns[name] for name in DBTEX_BOX_COLUMNS}


def dbtex_labels(patient_id, study_uid, view) -> dict[str, np.ndarray]:
    """The scorer's labels table from arrays (one entry per volume), as :func:`read_dbtex_labels` returns it."""
    text = {"PatientID": patient_id, "StudyUID": study_uid, "View": view}
    return {name: np.asarray(text[name]).astype(str) for name in DBTEX_LABEL_COLUMNS}


def rows_by_volume(table: Mapping[str, np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
    """A DBTex table's row indices per volume, keyed (StudyUID, View) as the scorer keys volumes; rows in file order,
    volumes in order of first appearance."""
    groups: dict[tuple[str, str], list[int]] = {}
    for row, key in enumerate(zip(np.asarray(table["StudyUID"]).astype(str), np.asarray(table["View"]).astype(str))):
        groups.setdefault(key, []).append(row)
    return {key: np.asarray(rows, dtype=np.int64) for key, rows in groups.items()}


def _fmt(value: float) -> str:
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)  # shortest text that reads back to the same float


def write_dbtex_predictions(path: str | Path, predictions: Mapping[str, Sequence]) -> None:
    """Write a DBTex submission CSV (:data:`DBTEX_COLUMNS`, in that order) atomically; numbers as the shortest
    text that reads back to the same float (integers without a decimal point)."""
    missing = [name for name in DBTEX_COLUMNS if name not in predictions]
    if missing:
        raise ValueError(f"predictions lack column(s) {missing}")
    count = len(predictions["Score"])
    if any(len(predictions[name]) != count for name in DBTEX_COLUMNS):
        raise ValueError("prediction columns differ in length")
    text = [np.asarray(predictions[name]).astype(str) for name in DBTEX_TEXT_COLUMNS]
    numbers = [np.asarray(predictions[name], dtype=np.float64) for name in DBTEX_NUMERIC_COLUMNS]
    records = (
        [text[0][i], text[1][i], text[2][i], *(_fmt(column[i]) for column in numbers)] for i in range(count)
    )
    write_csv_atomic(path, DBTEX_COLUMNS, records)


# ============================================================================================== per-image
def write_image_predictions(path: str | Path, predictions: Mapping[str, Sequence]) -> None:
    """Write per-image predictions (:data:`IMAGE_PREDICTION_COLUMNS`) atomically: the key columns as text, the
    box with 2 decimals, the score with 6."""
    count = len(predictions["Score"])
    records = (
        (
            predictions["image_id"][i], predictions["PatientID"][i], predictions["StudyUID"][i],
            predictions["View"][i], f"{predictions['X'][i]:.2f}", f"{predictions['Width'][i]:.2f}",
            f"{predictions['Y'][i]:.2f}", f"{predictions['Height'][i]:.2f}", f"{predictions['Score'][i]:.6f}",
        )
        for i in range(count)
    )
    write_csv_atomic(path, IMAGE_PREDICTION_COLUMNS, records)


# ============================================================================================== CBIS-DDSM
#: CBIS-DDSM description CSVs as TCIA publishes them (``mass_case_description_train_set.csv``, ...): one row per
#: abnormality. The TCIA file names; the adapter finds the files by their columns, so a renamed copy reads too.
CBIS_DDSM_CSV_NAMES = (
    "mass_case_description_train_set.csv", "mass_case_description_test_set.csv",
    "calc_case_description_train_set.csv", "calc_case_description_test_set.csv",
)
#: The mass CSVs' columns, in the release's order (the density column is spelt ``breast_density`` here).
CBIS_DDSM_MASS_COLUMNS = (
    "patient_id", "breast_density", "left or right breast", "image view", "abnormality id", "abnormality type",
    "mass shape", "mass margins", "assessment", "pathology", "subtlety", "image file path", "cropped image file path",
    "ROI mask file path",
)
#: The calcification CSVs' columns, in the release's order (``breast density``, with a space).
CBIS_DDSM_CALC_COLUMNS = (
    "patient_id", "breast density", "left or right breast", "image view", "abnormality id", "abnormality type",
    "calc type", "calc distribution", "assessment", "pathology", "subtlety", "image file path",
    "cropped image file path", "ROI mask file path",
)
#: What the CBIS-DDSM adapter reads (and how it finds the CSVs): ``patient_id`` (``P_00001``), ``left or right
#: breast`` (LEFT / RIGHT), ``image view`` (CC / MLO), ``abnormality id`` (1, 2, ... within the image),
#: ``abnormality type`` (mass / calcification), ``pathology`` (one of :data:`CBIS_DDSM_PATHOLOGIES`), ``image file
#: path`` and ``ROI mask file path`` (``<subject folder>/<study UID>/<series UID>/000000.dcm``: only the first
#: folder is trusted, the TCIA download names the rest differently). The ROI folder also holds the cropped image.
CBIS_DDSM_REQUIRED_COLUMNS = (
    "patient_id", "left or right breast", "image view", "abnormality id", "abnormality type", "pathology",
    "image file path", "ROI mask file path",
)
#: Read when present: the cropped image's path, whose first folder is searched for the mask too.
CBIS_DDSM_OPTIONAL_COLUMNS = ("cropped image file path",)
#: ``abnormality type`` values, as the release writes them, and the subject-folder prefix each goes with.
CBIS_DDSM_ABNORMALITY_TYPES = {"mass": "Mass", "calcification": "Calc"}
#: ``pathology`` values; a lesion's class is ``<abnormality type>-<pathology>``, e.g. ``mass-MALIGNANT``.
CBIS_DDSM_PATHOLOGIES = ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK")
