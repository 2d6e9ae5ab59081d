"""Dataset adapters: BCS-DBT, VinDr-Mammo and manifest CSVs -> records, with row-precise errors and skip mode."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from comoto_cli.config import PreprocessConfig
from comoto_cli.data.adapters import adapter_for
from comoto_cli.data.adapters.bcs_dbt import discover_bcs_dbt
from comoto_cli.data.adapters.manifest import read_manifest
from comoto_cli.data.adapters.vindr import discover_vindr
from comoto_cli.data.sources import (
    ImageRecord,
    LesionBox,
    check_box_in_image,
    find_csv_by_columns,
    safe_join,
)
from comoto_cli.errors import InputDataError


def discover_mammo(root: Path, *, manifest_csv: Path | None = None) -> list[ImageRecord]:
    """Mammograms as `comoto preprocess mammo` finds them: the adapter chosen from the config, as before adapters."""
    config = PreprocessConfig(modality="mammo", manifest_csv=manifest_csv)
    return adapter_for(config).discover(root, config, None)

PATHS_HEADER = ["PatientID", "StudyUID", "View", "descriptive_path", "classic_path"]
LABELS_HEADER = ["PatientID", "StudyUID", "View", "Normal", "Actionable", "Benign", "Cancer"]
BOXES_HEADER = [
    "PatientID",
    "StudyUID",
    "View",
    "Subject",
    "Slice",
    "X",
    "Y",
    "Width",
    "Height",
    "Class",
    "AD",
    "VolumeSlices",
]
VINDR_HEADER = [
    "study_id",
    "series_id",
    "image_id",
    "laterality",
    "view_position",
    "height",
    "width",
    "breast_birads",
    "breast_density",
    "finding_categories",
    "finding_birads",
    "xmin",
    "ymin",
    "xmax",
    "ymax",
    "split",
]


def write_csv(path: Path, header, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def dbt_path(pid: str, view: str) -> str:
    return f"Breast-Cancer-Screening-DBT/{pid}/01-01-2000-DBT-S1-{view}/1.000000-NA-1/1-1.dcm"


# (PatientID, StudyUID, View, [Normal, Actionable, Benign, Cancer])
VOLUMES = [
    ("DBT-P00001", "DBT-S001", "lcc", [0, 0, 0, 1]),
    ("DBT-P00001", "DBT-S001", "rmlo", [1, 0, 0, 0]),
    ("DBT-P00002", "DBT-S002", "rcc", [0, 0, 1, 0]),
    ("DBT-P00003", "DBT-S003", "lmlo", [0, 1, 1, 0]),  # benign beats actionable
]
BOXES = [
    ["DBT-P00001", "DBT-S001", "lcc", "1", "30", "100", "120", "50", "60", "cancer", "0", "60"],
    ["DBT-P00002", "DBT-S002", "rcc", "1", "10", "5", "6", "20", "30", "benign", "0", "40"],
    ["DBT-P00001", "DBT-S001", "lcc", "2", "12", "400", "420", "30", "35", "cancer", "0", "58"],
]


@pytest.fixture
def dbt_root(tmp_path):
    root = tmp_path / "data"
    paths_rows, label_rows = [], []
    for pid, study, view, labels in VOLUMES:
        touch(root / dbt_path(pid, view))
        paths_rows.append(
            [
                pid,
                study,
                view.upper() if pid == "DBT-P00002" else view,
                dbt_path(pid, view),
                f"Breast-Cancer-Screening-DBT/{pid}/1.2.3/1.2.3.4/1-1.dcm",
            ]
        )
        label_rows.append([pid, study, view, *labels])
    label_rows.append(["DBT-P09999", "DBT-S999", "lcc", 1, 0, 0, 0])  # extra labels are ignored
    write_csv(root / "BCS-DBT-file-paths-train-v2.csv", PATHS_HEADER, paths_rows)
    write_csv(root / "csv" / "BCS-DBT-labels-train-v2.csv", LABELS_HEADER, label_rows)
    write_csv(root / "csv" / "BCS-DBT-boxes-train-v2.csv", BOXES_HEADER, BOXES)
    return root


def error_of(call) -> str:
    with pytest.raises(InputDataError) as info:
        call()
    return str(info.value)


# ---------------------------------------------------------------------------------------------- BCS-DBT
def test_bcs_dbt_records(dbt_root):
    records = discover_bcs_dbt(dbt_root)
    assert [(r.patient_id, r.view, r.label) for r in records] == [
        ("DBT-P00001", "lcc", "cancer"),
        ("DBT-P00001", "rmlo", "normal"),
        ("DBT-P00002", "rcc", "benign"),
        ("DBT-P00003", "lmlo", "benign"),
    ]
    first = records[0]
    assert isinstance(first, ImageRecord)
    assert first.path == (dbt_root / dbt_path("DBT-P00001", "lcc")).resolve() and first.path.is_absolute()
    assert first.source == dbt_path("DBT-P00001", "lcc")
    assert first.row == 2 and first.csv.name == "BCS-DBT-file-paths-train-v2.csv"
    assert [(b.slice, b.x, b.y, b.width, b.height, b.cls, b.row) for b in first.boxes] == [
        (30, 100.0, 120.0, 50.0, 60.0, "cancer", 2),
        (12, 400.0, 420.0, 30.0, 35.0, "cancer", 4),
    ]
    assert first.volume_slices == 60  # the view's FIRST box row, not the later 58
    assert records[2].volume_slices == 40 and records[2].view == "rcc"  # 'RCC' in the CSV
    assert records[1].boxes == [] and records[1].volume_slices is None
    assert all(r.split is None for r in records)


def test_bcs_dbt_classic_path_fallback_and_root_is_collection_folder(dbt_root):
    target = dbt_root / dbt_path("DBT-P00001", "lcc")
    classic = touch(dbt_root / "Breast-Cancer-Screening-DBT/DBT-P00001/1.2.3/1.2.3.4/1-1.dcm")
    target.unlink()
    records = discover_bcs_dbt(dbt_root)
    assert records[0].path == classic.resolve()
    # ROOT pointing at the collection folder itself: paths starting with its name still resolve.
    inner = dbt_root / "Breast-Cancer-Screening-DBT"
    records = discover_bcs_dbt(
        inner,
        file_paths_csv=dbt_root / "BCS-DBT-file-paths-train-v2.csv",
        labels_csv=dbt_root / "csv/BCS-DBT-labels-train-v2.csv",
        boxes_csv=dbt_root / "csv/BCS-DBT-boxes-train-v2.csv",
    )
    assert len(records) == 4 and all(r.path.is_relative_to(inner.resolve()) for r in records)


def test_ambiguous_csv_needs_flag(dbt_root):
    write_csv(dbt_root / "BCS-DBT-file-paths-test-v2.csv", PATHS_HEADER, [])
    message = error_of(lambda: discover_bcs_dbt(dbt_root))
    assert "--file-paths-csv" in message and "train-v2" in message and "test-v2" in message
    records = discover_bcs_dbt(dbt_root, file_paths_csv=dbt_root / "BCS-DBT-file-paths-train-v2.csv")
    assert len(records) == 4


def test_find_csv_by_columns(dbt_root):
    assert find_csv_by_columns(dbt_root, LABELS_HEADER).name == "BCS-DBT-labels-train-v2.csv"
    message = error_of(lambda: find_csv_by_columns(dbt_root, ["PatientID", "Nope"], flag="--labels-csv"))
    assert "Nope" in message and "--labels-csv" in message and str(dbt_root) in message


def test_misspelled_column(dbt_root):
    labels = dbt_root / "csv" / "BCS-DBT-labels-train-v2.csv"
    text = labels.read_text().replace("StudyUID", "StudyUid", 1)
    labels.write_text(text)
    message = error_of(lambda: discover_bcs_dbt(dbt_root))  # no labels CSV found by its columns
    assert "Cancer" in message and "--labels-csv" in message
    message = error_of(lambda: discover_bcs_dbt(dbt_root, labels_csv=labels))
    assert str(labels) in message and "row 1" in message and "'StudyUID'" in message


def test_duplicated_column(dbt_root):
    boxes = dbt_root / "csv" / "BCS-DBT-boxes-train-v2.csv"
    write_csv(boxes, BOXES_HEADER + ["X"], [row + ["1"] for row in BOXES])
    message = error_of(lambda: discover_bcs_dbt(dbt_root, boxes_csv=boxes))
    assert str(boxes) in message and "row 1" in message and "'X'" in message


def test_non_utf8_csv(dbt_root):
    paths = dbt_root / "BCS-DBT-file-paths-train-v2.csv"
    paths.write_bytes(paths.read_bytes() + b"DBT-P\xe900009,S,lcc,a.dcm,b.dcm\n")
    message = error_of(lambda: discover_bcs_dbt(dbt_root, file_paths_csv=paths))
    assert str(paths) in message and "row 6" in message and "UTF-8" in message


def _append(path: Path, *rows) -> None:
    with open(path, "a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)


def test_duplicate_volume_in_file_paths(dbt_root):
    paths = dbt_root / "BCS-DBT-file-paths-train-v2.csv"
    _append(paths, ["DBT-P00002", "DBT-S002", "rcc", dbt_path("DBT-P00002", "rcc"), ""])
    message = error_of(lambda: discover_bcs_dbt(dbt_root))
    assert str(paths) in message and "row 6" in message and "row 4" in message and "duplicate" in message
    skipped: list[dict] = []
    records = discover_bcs_dbt(dbt_root, skipped=skipped)
    assert len(records) == 4
    assert [(s["path"], s["row"]) for s in skipped] == [(str(paths), 6)]


def test_duplicate_labels(dbt_root):
    labels = dbt_root / "csv" / "BCS-DBT-labels-train-v2.csv"
    _append(labels, ["DBT-P00001", "DBT-S001", "rmlo", 0, 0, 0, 1])
    message = error_of(lambda: discover_bcs_dbt(dbt_root))
    assert str(labels) in message and "row 7" in message and "row 3" in message
    skipped: list[dict] = []
    records = discover_bcs_dbt(dbt_root, skipped=skipped)
    assert ("DBT-P00001", "rmlo") not in {(r.patient_id, r.view) for r in records} and len(records) == 3
    assert skipped[0]["row"] == 7


def test_volume_without_labels_row(dbt_root):
    labels = dbt_root / "csv" / "BCS-DBT-labels-train-v2.csv"
    rows = list(csv.reader(labels.open()))
    write_csv(labels, rows[0], [r for r in rows[1:] if r[2] != "lmlo"])
    message = error_of(lambda: discover_bcs_dbt(dbt_root))
    assert "BCS-DBT-file-paths-train-v2.csv" in message and "row 5" in message and "labels" in message


@pytest.mark.parametrize(
    "values,needle", [([0, 0, 0, 0], "none of"), ([0, 0, 2, 0], "0 or 1"), ([0, 0, "x", 0], "not a number")]
)
def test_bad_label_values(dbt_root, values, needle):
    labels = dbt_root / "csv" / "BCS-DBT-labels-train-v2.csv"
    rows = list(csv.reader(labels.open()))
    rows[3] = rows[3][:3] + [str(v) for v in values]
    write_csv(labels, rows[0], rows[1:])
    message = error_of(lambda: discover_bcs_dbt(dbt_root))
    assert str(labels) in message and "row 4" in message and needle in message


def test_boxes_for_unknown_volume(dbt_root):
    boxes = dbt_root / "csv" / "BCS-DBT-boxes-train-v2.csv"
    _append(boxes, ["DBT-P00077", "DBT-S077", "lcc", "1", "3", "1", "1", "5", "5", "cancer", "0", "10"])
    message = error_of(lambda: discover_bcs_dbt(dbt_root))
    assert str(boxes) in message and "row 5" in message and "not in the file-paths CSV" in message
    skipped: list[dict] = []
    assert len(discover_bcs_dbt(dbt_root, skipped=skipped)) == 4
    assert skipped == [{"path": str(boxes), "row": 5, "reason": message}]


@pytest.mark.parametrize(
    "column,value,needle",
    [
        ("X", "abc", "not a number"),
        ("Y", "-3", "negative"),
        ("Width", "0", "size"),
        ("Height", "-1", "size"),
        ("Slice", "60", "outside"),
        ("Slice", "-1", "outside"),
        ("Slice", "2.5", "integer"),
        ("VolumeSlices", "0", "positive"),
        ("X", "", "empty"),
        ("X", "inf", "finite"),
        # huge numbers: refused as they are read, before any arithmetic (or DICOM decoding) meets them
        ("VolumeSlices", "99999999999999999999999", "out of range"),
        ("Slice", "1e300", "out of range"),
        ("X", "1e300", "out of range"),
        ("Width", "123456789012345678901234567890", "out of range"),
        ("Y", "-1e300", "out of range"),
    ],
)
def test_bad_boxes(dbt_root, column, value, needle):
    boxes = dbt_root / "csv" / "BCS-DBT-boxes-train-v2.csv"
    rows = [list(r) for r in BOXES]
    rows[2][BOXES_HEADER.index(column)] = value  # the second box of DBT-P00001 lcc (file row 4)
    write_csv(boxes, BOXES_HEADER, rows)
    message = error_of(lambda: discover_bcs_dbt(dbt_root))
    assert str(boxes) in message and "row 4" in message and needle in message
    skipped: list[dict] = []
    records = discover_bcs_dbt(dbt_root, skipped=skipped)
    # the whole volume goes (no volume is kept with part of its lesions), the others stay
    assert [(r.patient_id, r.view) for r in records] == [
        ("DBT-P00001", "rmlo"),
        ("DBT-P00002", "rcc"),
        ("DBT-P00003", "lmlo"),
    ]
    assert [s["row"] for s in skipped] == [4] and needle in skipped[0]["reason"]


@pytest.mark.parametrize("bad", ["../outside.dcm", "/etc/passwd", "C:\\data\\x.dcm", "a/../../x.dcm"])
def test_unsafe_paths(dbt_root, bad):
    (dbt_root.parent / "outside.dcm").write_bytes(b"x")
    paths = dbt_root / "BCS-DBT-file-paths-train-v2.csv"
    rows = list(csv.reader(paths.open()))
    rows[2][3] = bad
    write_csv(paths, rows[0], rows[1:])
    message = error_of(lambda: discover_bcs_dbt(dbt_root))
    assert str(paths) in message and "row 3" in message and repr(bad) in message
    skipped: list[dict] = []
    records = discover_bcs_dbt(dbt_root, skipped=skipped)
    assert len(records) == 3 and skipped[0]["row"] == 3


def test_symlink_leaving_root(dbt_root, tmp_path):
    outside = tmp_path / "elsewhere"
    touch(outside / "1-1.dcm")
    link = dbt_root / "Breast-Cancer-Screening-DBT" / "link"
    os.symlink(outside, link)
    paths = dbt_root / "BCS-DBT-file-paths-train-v2.csv"
    _append(paths, ["DBT-P00009", "DBT-S009", "lcc", "Breast-Cancer-Screening-DBT/link/1-1.dcm", ""])
    message = error_of(lambda: discover_bcs_dbt(dbt_root))
    assert str(paths) in message and "row 6" in message and "outside the data root" in message
    # a symlink that stays inside the root is fine
    assert safe_join(dbt_root, "Breast-Cancer-Screening-DBT/DBT-P00001", csv=paths, row=2).is_dir()


def test_missing_file_on_disk(dbt_root):
    (dbt_root / dbt_path("DBT-P00002", "rcc")).unlink()
    paths = dbt_root / "BCS-DBT-file-paths-train-v2.csv"
    message = error_of(lambda: discover_bcs_dbt(dbt_root))
    assert str(paths) in message and "row 4" in message and "not found" in message
    skipped: list[dict] = []
    records = discover_bcs_dbt(dbt_root, skipped=skipped)
    assert "DBT-P00002" not in {r.patient_id for r in records}  # and its box is dropped silently
    assert [s["row"] for s in skipped] == [4]


@pytest.mark.parametrize(
    "column,value,needle",
    [(2, "lxx", "View"), (0, "", "'PatientID' is empty"), (1, " ", "'StudyUID' is empty")],
)
def test_bad_keys_in_file_paths(dbt_root, column, value, needle):
    paths = dbt_root / "BCS-DBT-file-paths-train-v2.csv"
    rows = list(csv.reader(paths.open()))
    rows[1][column] = value
    write_csv(paths, rows[0], rows[1:])
    message = error_of(lambda: discover_bcs_dbt(dbt_root))
    assert str(paths) in message and "row 2" in message and needle in message


def test_lesion_labels_without_boxes_csv(dbt_root):
    (dbt_root / "csv" / "BCS-DBT-boxes-train-v2.csv").unlink()
    message = error_of(lambda: discover_bcs_dbt(dbt_root))
    assert "--boxes-csv" in message
    # a release with only normal volumes needs no boxes
    labels = dbt_root / "csv" / "BCS-DBT-labels-train-v2.csv"
    write_csv(labels, LABELS_HEADER, [[p, s, v, 1, 0, 0, 0] for p, s, v, _ in VOLUMES])
    assert {r.label for r in discover_bcs_dbt(dbt_root)} == {"normal"}


def test_check_box_in_image():
    box = LesionBox(slice=5, x=10, y=20, width=30, height=40, cls="cancer", csv=Path("b.csv"), row=2)
    assert check_box_in_image(box, rows=60, cols=40, num_slices=6) is None
    assert "outside" in check_box_in_image(box, rows=59, cols=40, num_slices=6)
    assert "outside" in check_box_in_image(box, rows=60, cols=39, num_slices=6)
    assert "slice 5" in check_box_in_image(box, rows=60, cols=40, num_slices=5)


# ------------------------------------------------------------------------------------------------ VinDr
def vindr_row(study, image, lat, view, categories, box=("", "", "", ""), split="training"):
    return [
        study,
        "ser",
        image,
        lat,
        view,
        "3518",
        "2800",
        "BI-RADS 4",
        "DENSITY C",
        categories,
        "BI-RADS 4",
        *box,
        split,
    ]


@pytest.fixture
def vindr_root(tmp_path):
    root = tmp_path / "vindr"
    rows = [
        vindr_row("st1", "im1", "L", "CC", "['Mass']", ("10.5", "20", "110.5", "220")),
        vindr_row(
            "st1", "im1", "L", "CC", "['Suspicious Calcification', 'Mass']", ("300", "310", "340", "350")
        ),
        vindr_row("st1", "im2", "R", "MLO", "['No Finding']"),
        vindr_row("st2", "im3", "R", "CC", "['No Finding']", split="test"),
    ]
    for study, image in [("st1", "im1"), ("st1", "im2"), ("st2", "im3")]:
        touch(root / "images" / study / f"{image}.dicom")
    write_csv(root / "finding_annotations.csv", VINDR_HEADER, rows)
    return root


def test_vindr_records(vindr_root):
    records = discover_vindr(vindr_root)
    assert [(r.patient_id, r.study_uid, r.view, r.label, r.split) for r in records] == [
        ("st1", "st1", "lcc", "lesion", "train"),
        ("st1", "st1", "rmlo", "normal", "train"),
        ("st2", "st2", "rcc", "normal", "test"),
    ]
    first = records[0]
    assert first.source == "images/st1/im1.dicom" and first.path == (vindr_root / first.source).resolve()
    assert [(b.x, b.y, b.width, b.height, b.cls, b.row, b.slice) for b in first.boxes] == [
        (10.5, 20.0, 100.0, 200.0, "Mass", 2, 0),
        (300.0, 310.0, 40.0, 40.0, "Suspicious Calcification, Mass", 3, 0),
    ]
    assert first.volume_slices is None and first.row == 2
    assert [r.path for r in discover_mammo(vindr_root)] == [r.path for r in records]


@pytest.mark.parametrize(
    "row,needle",
    [
        (vindr_row("st1", "im1", "L", "CC", "['Mass'", ("1", "1", "5", "5")), "list literal"),
        (
            vindr_row("st1", "im1", "L", "CC", "__import__('os').system('true')", ("1", "1", "5", "5")),
            "list literal",
        ),
        (vindr_row("st1", "im1", "L", "CC", "[1, 2]", ("1", "1", "5", "5")), "list of strings"),
        (vindr_row("st1", "im1", "L", "CC", "['Mass']", ("5", "1", "5", "5")), "xmin 5, xmax 5"),
        (vindr_row("st1", "im1", "L", "CC", "['Mass']", ("1", "", "5", "5")), "partly empty"),
        (vindr_row("st1", "im1", "L", "CC", "['Mass']", ("1", "x", "5", "5")), "not a number"),
        (vindr_row("st1", "im1", "L", "CC", "['Mass']", ("-1", "1", "5", "5")), "negative"),
        (vindr_row("st1", "im1", "L", "CC", "['Mass']", ("1", "1", "1e300", "5")), "out of range"),
        (vindr_row("st1", "im1", "L", "XCCL", "['Mass']", ("1", "1", "5", "5")), "CC/MLO"),
        (vindr_row("st1", "im1", "R", "CC", "['Mass']", ("1", "1", "5", "5")), "row 2"),
        (vindr_row("st1", "im1", "L", "CC", "['Mass']", ("1", "1", "5", "5"), split="dev"), "split"),
    ],
)
def test_vindr_bad_rows(vindr_root, row, needle):
    annotations = vindr_root / "finding_annotations.csv"
    _append(annotations, row)
    message = error_of(lambda: discover_vindr(vindr_root))
    assert str(annotations) in message and "row 6" in message and needle in message
    skipped: list[dict] = []
    records = discover_vindr(vindr_root, annotations_csv=annotations, skipped=skipped)
    assert [r.source for r in records] == ["images/st1/im2.dicom", "images/st2/im3.dicom"]  # im1 left out
    assert [s["row"] for s in skipped] == [6]


def test_vindr_missing_image_and_unsafe_ids(vindr_root):
    (vindr_root / "images/st1/im2.dicom").unlink()
    annotations = vindr_root / "finding_annotations.csv"
    message = error_of(lambda: discover_vindr(vindr_root))
    assert str(annotations) in message and "row 4" in message and "not found" in message
    _append(annotations, vindr_row("..", "x", "L", "CC", "['No Finding']"))
    skipped: list[dict] = []
    records = discover_vindr(vindr_root, skipped=skipped)
    assert [r.source for r in records] == ["images/st1/im1.dicom", "images/st2/im3.dicom"]
    assert [s["row"] for s in skipped] == [4, 6] and "'..'" in skipped[1]["reason"]


def test_vindr_missing_column(vindr_root):
    annotations = vindr_root / "finding_annotations.csv"
    rows = list(csv.reader(annotations.open()))
    write_csv(annotations, [c if c != "xmax" else "x_max" for c in rows[0]], rows[1:])
    message = error_of(lambda: discover_vindr(vindr_root))
    assert "xmax" in message and "--annotations-csv" in message
    message = error_of(lambda: discover_vindr(vindr_root, annotations_csv=annotations))
    assert str(annotations) in message and "row 1" in message and "'xmax'" in message


# --------------------------------------------------------------------------------------------- manifest
def test_manifest(tmp_path):
    root = tmp_path / "m"
    for name in ("a.dcm", "sub/b.dcm", "c.dcm"):
        touch(root / name)
    manifest = write_csv(
        tmp_path / "manifest.csv",
        ["path", "patient_id", "xmin", "ymin", "xmax", "ymax", "view", "split"],
        [
            ["a.dcm", "p1", "1", "2", "11", "22", "LCC", "train"],
            ["a.dcm", "p1", "5", "5", "6", "7", "LCC", "train"],
            ["sub/b.dcm", "p2", "", "", "", "", "", "test"],
            ["c.dcm", "p3", "", "", "", "", "rmlo", ""],
        ],
    )
    records = discover_mammo(root, manifest_csv=manifest)
    assert [
        (r.source, r.patient_id, r.study_uid, r.view, r.label, r.split, len(r.boxes)) for r in records
    ] == [
        ("a.dcm", "p1", "p1", "lcc", "lesion", "train", 2),
        ("sub/b.dcm", "p2", "p2", "", "normal", "test", 0),
        ("c.dcm", "p3", "p3", "rmlo", "normal", None, 0),
    ]
    assert (records[0].boxes[1].x, records[0].boxes[1].width, records[0].boxes[1].row) == (5.0, 1.0, 3)


@pytest.mark.parametrize(
    "row,needle",
    [
        (["a.dcm", "p9", "", "", "", "", "", ""], "patient/study"),  # inconsistent with row 2
        (["a.dcm", "p1", "4", "2", "3", "22", "", ""], "xmin 4, xmax 3"),
        (["a.dcm", "p1", "1", "2", "3", "", "", ""], "partly empty"),
        (["", "p1", "1", "2", "3", "4", "", ""], "'path' is empty"),
        (["a.dcm", "", "1", "2", "3", "4", "", ""], "'patient_id' is empty"),
        (["a.dcm", "p1", "1", "2", "3", "4", "cc", ""], "view"),
        (["a.dcm", "p1", "1", "2", "99999999999999999999999", "4", "", ""], "'xmax' is out of range"),
    ],
)
def test_manifest_bad_rows(tmp_path, row, needle):
    root = tmp_path / "m"
    touch(root / "a.dcm")
    touch(root / "b.dcm")
    manifest = write_csv(
        tmp_path / "manifest.csv",
        ["path", "patient_id", "xmin", "ymin", "xmax", "ymax", "view", "split"],
        [["a.dcm", "p1", "1", "1", "2", "2", "", ""], ["b.dcm", "p2", "", "", "", "", "", ""], row],
    )
    message = error_of(lambda: read_manifest(root, manifest))
    assert str(manifest) in message and "row 4" in message and needle in message
    skipped: list[dict] = []
    records = read_manifest(root, manifest, skipped=skipped)
    assert [s["row"] for s in skipped] == [4]
    kept = [r.source for r in records]
    assert "b.dcm" in kept and ("a.dcm" not in kept or row[0] == "")


def test_manifest_unsafe_and_missing(tmp_path):
    root = tmp_path / "m"
    touch(root / "a.dcm")
    manifest = write_csv(
        tmp_path / "manifest.csv",
        ["path", "patient_id", "xmin", "ymin", "xmax", "ymax"],
        [
            ["a.dcm", "p1", "", "", "", ""],
            ["../m/a.dcm", "p2", "", "", "", ""],
            ["gone.dcm", "p3", "", "", "", ""],
        ],
    )
    message = error_of(lambda: read_manifest(root, manifest))
    assert str(manifest) in message and "row 3" in message and "'..'" in message
    skipped: list[dict] = []
    records = read_manifest(root, manifest, skipped=skipped)
    assert [r.source for r in records] == ["a.dcm"]
    assert [s["row"] for s in skipped] == [3, 4] and "not found" in skipped[1]["reason"]


def test_csv_integer_columns_refuse_values_beyond_exact_floats(tmp_path):
    """A huge integer (e.g. a DBTex label column) is an error naming the row, not an int64 overflow later."""
    from comoto_cli.utils.csvio import read_csv

    table = read_csv(write_csv(tmp_path / "t.csv", ["a"], [["1"], ["99999999999999999999"]]), ["a"])
    with pytest.raises(InputDataError, match=r"t\.csv, row 3: column 'a' is out of range"):
        table.ints("a")
    assert read_csv(write_csv(tmp_path / "u.csv", ["a"], [["-7"], ["9007199254740992"]]), ["a"]).ints("a").tolist() == [
        -7, 2**53]
