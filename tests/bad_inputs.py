"""Builders of the bad-input corpus of `tests/test_reliability.py`: each case is a small copy of the tiny synthetic
dataset (or a config / CSV / checkpoint file) with one defect, and the `comoto` command line that must reject it.

Unchanged DICOM files are hard links into the session's `tiny_synth` folder (no copying); a file that a case
changes is unlinked first and written anew, so the shared dataset is never modified.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

DBT_PATHS = "BCS-DBT-file-paths-train-v2.csv"
DBT_LABELS = "BCS-DBT-labels-train-v2.csv"
DBT_BOXES = "BCS-DBT-boxes-train-v2.csv"
VINDR = "finding_annotations.csv"
KEEP_PATIENTS = ("DBT-P00001", "DBT-P00002", "DBT-P00003")  # 5 volumes: enough for a 3-way split, fast to decode
SMALL = ["--image-height", "32", "--image-width", "32", "--workers", "1", "--no-progress"]


# ------------------------------------------------------------------------------------------------ CSV helpers
def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [row for row in csv.reader(handle)]


def write_rows(path: Path, rows: list[list[str]], encoding: str = "utf-8") -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    if path.exists():
        path.unlink()  # never write through a hard link into the shared data
    path.write_bytes(buffer.getvalue().encode(encoding))


def edit_csv(path: Path, edit: Callable[[list[list[str]]], list[list[str]] | None]) -> None:
    rows = read_rows(path)
    result = edit(rows)
    write_rows(path, rows if result is None else result)


def set_cell(path: Path, row: int, column: str, value: str) -> None:
    """``row`` is 1-based with the header as row 1 (the numbering of the error messages)."""
    def edit(rows):
        rows[row - 1][rows[0].index(column)] = value
    edit_csv(path, edit)


def _link_tree(source: Path, destination: Path) -> None:
    shutil.copytree(source, destination, copy_function=os.link)


def _replace_with_copy(path: Path) -> None:
    """Break the hard link so the file can be changed here only."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)


# ------------------------------------------------------------------------------------------------ datasets
def dbt_copy(synth: Path, destination: Path) -> Path:
    """BCS-DBT layout with the volumes of KEEP_PATIENTS only (hard-linked DICOMs); returns the data root."""
    root = destination / "dbt"
    root.mkdir(parents=True)
    source = synth / "dbt"
    for name in (DBT_PATHS, DBT_LABELS, DBT_BOXES):
        rows = read_rows(source / name)
        write_rows(root / name, [rows[0]] + [r for r in rows[1:] if r[0] in KEEP_PATIENTS])
    for row in read_rows(root / DBT_PATHS)[1:]:
        relative = Path(row[read_rows(root / DBT_PATHS)[0].index("descriptive_path")])
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        os.link(source / relative, root / relative)
    return root


def dbt_dicom(root: Path, row: int = 2) -> Path:
    """The DICOM file of file-paths CSV row ``row`` (1-based, header = 1)."""
    rows = read_rows(root / DBT_PATHS)
    return root / rows[row - 1][rows[0].index("descriptive_path")]


def mammo_copy(synth: Path, destination: Path) -> Path:
    root = destination / "mammo"
    _link_tree(synth / "mammo", root)
    for name in root.glob("*.csv"):
        _replace_with_copy(name)
    return root


def vindr_dicom(root: Path, row: int = 2) -> Path:
    rows = read_rows(root / VINDR)
    header = rows[0]
    return root / "images" / rows[row - 1][header.index("study_id")] / f"{rows[row - 1][header.index('image_id')]}.dicom"


def change_dicom(path: Path, **tags) -> None:
    """Rewrite ``path`` (a new file, not through the hard link) with the given top-level tags changed."""
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():  # pydicom warns about the invalid values this corpus writes on purpose
        warnings.simplefilter("ignore", UserWarning)
        for name, value in tags.items():
            if value is None:
                delattr(ds, name)
            else:
                setattr(ds, name, value)
    if "SOPClassUID" in tags:
        ds.file_meta.MediaStorageSOPClassUID = tags["SOPClassUID"]
    path.unlink()
    ds.save_as(path, enforce_file_format=True)


def set_dbt_window(path: Path, center: str, width: str) -> None:
    ds = pydicom.dcmread(path)
    voi = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        voi["WindowCenter"].value = center
        voi["WindowWidth"].value = width
    path.unlink()
    ds.save_as(path, enforce_file_format=True)


def garble_nested_sequence(path: Path) -> None:
    """A garbled sequence in the header: FrameVOILUTSequence says 5 bytes, too few for the item it holds."""
    data = bytearray(path.read_bytes())
    at = data.find(b"\x28\x00\x32\x91SQ\x00\x00")  # (0028,9132) SQ, explicit VR little endian
    assert at > 0, "no FrameVOILUTSequence to garble"
    data[at + 8:at + 12] = (5).to_bytes(4, "little")
    path.unlink()
    path.write_bytes(bytes(data))


def corrupt_compressed_pixels(path: Path) -> None:
    """JPEG 2000 pixel data (compressed here if it was not) whose frames keep their first bytes (the markers and
    the image size) and lose the rest of the code stream."""
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import JPEG2000Lossless

    ds = pydicom.dcmread(path)
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    frames = [frame[:40] + bytes(len(frame) - 40) for frame in generate_frames(ds.PixelData, number_of_frames=count)]
    ds.PixelData = encapsulate(frames)
    path.unlink()
    ds.save_as(path, enforce_file_format=True)


def undecodable_syntax(path: Path) -> None:
    """Compressed pixel data labelled with a transfer syntax pydicom 3 has no decoder for (MPEG-2)."""
    corrupt_compressed_pixels(path)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile / Main Level
    path.unlink()
    ds.save_as(path, enforce_file_format=True)


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class Context:
    """What a case builder gets: the shared inputs and a fresh folder of its own."""

    tmp: Path
    synth: Path
    caches: dict[str, Path]
    teacher: Path
    train_config: dict
    out: Path = field(init=False)

    def __post_init__(self):
        self.out = self.tmp / "out"  # every output goes below here; it must not exist after a failure

    def config_file(self, payload, name: str = "config.json") -> Path:
        path = self.tmp / name
        path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
        return path


@dataclass
class Built:
    argv: list[str]
    needles: list[str]  # each must appear in the one stderr line: the file, and the row or field


@dataclass
class Case:
    name: str
    exit_code: int
    build: Callable[[Context], Built]


def _preprocess_dbt(root: Path, ctx: Context, *extra: str) -> list[str]:
    return ["preprocess", "dbt", str(root), "--out", str(ctx.out / "dbt.h5"), *SMALL, *extra]


def _preprocess_mammo(root: Path, ctx: Context, *extra: str) -> list[str]:
    return ["preprocess", "mammo", str(root), "--out", str(ctx.out / "mammo.h5"), *SMALL, *extra]


def _dicom_case(mutate: Callable[[Path], None], *needles: str) -> Callable[[Context], Built]:
    def build(ctx: Context) -> Built:
        root = dbt_copy(ctx.synth, ctx.tmp)
        dicom = dbt_dicom(root, 2)
        mutate(dicom)
        return Built(_preprocess_dbt(root, ctx), [dicom.name, DBT_PATHS, "row 2", *needles])
    return build


def _dbt_csv_case(name: str, edit: Callable[[Path], None], *needles: str) -> Callable[[Context], Built]:
    def build(ctx: Context) -> Built:
        root = dbt_copy(ctx.synth, ctx.tmp)
        edit(root / name)
        flags = ["--file-paths-csv", str(root / DBT_PATHS), "--labels-csv", str(root / DBT_LABELS),
                 "--boxes-csv", str(root / DBT_BOXES)]
        return Built(_preprocess_dbt(root, ctx, *flags), [name, *needles])
    return build


def _mammo_case(edit: Callable[[Path], None], *needles: str, dicom_row: int | None = None) -> Callable[[Context], Built]:
    def build(ctx: Context) -> Built:
        root = mammo_copy(ctx.synth, ctx.tmp)
        found = list(needles)
        if dicom_row is not None:
            dicom = vindr_dicom(root, dicom_row)
            edit(dicom)
            found.append(dicom.name)
        else:
            edit(root / VINDR)
            found.append(VINDR)
        return Built(_preprocess_mammo(root, ctx, "--annotations-csv", str(root / VINDR)), found)
    return build


def _symlink_leaving_root(ctx: Context) -> Built:
    root = dbt_copy(ctx.synth, ctx.tmp)
    dicom = dbt_dicom(root, 3)
    outside = ctx.tmp / "outside.dcm"
    os.link(dicom, outside)
    dicom.unlink()
    dicom.symlink_to(outside)
    return Built(_preprocess_dbt(root, ctx), [DBT_PATHS, "row 3"])


def _manifest_case(rows: list[list[str]], *needles: str) -> Callable[[Context], Built]:
    def build(ctx: Context) -> Built:
        root = mammo_copy(ctx.synth, ctx.tmp)
        first = vindr_dicom(root, 2).relative_to(root).as_posix()
        table = [["path", "patient_id", "xmin", "ymin", "xmax", "ymax"]]
        table += [[cell.replace("{first}", first) for cell in row] for row in rows]
        write_rows(root / "manifest.csv", table)
        return Built(_preprocess_mammo(root, ctx, "--manifest-csv", str(root / "manifest.csv")),
                     ["manifest.csv", *needles])
    return build


def _config_case(command: str, payload, *needles: str) -> Callable[[Context], Built]:
    def build(ctx: Context) -> Built:
        config = ctx.config_file(payload)
        caches = ctx.caches
        run = str(ctx.out / "run")
        argv = {
            "train-teacher": ["train-teacher", "--cache", str(caches["mammo"]), "--out", run],
            "distill": ["distill", "--cache", str(caches["dbt"]), "--teacher", str(ctx.teacher), "--teacher-cache",
                        str(caches["mammo"]), "--out", run, "--mode", "lesion"],
            "preprocess": ["preprocess", "dbt", str(ctx.synth / "dbt"), "--out", str(ctx.out / "dbt.h5"),
                           "--no-progress"],
            "evaluate": ["evaluate", "--checkpoint", str(ctx.teacher), "--cache", str(caches["dbt"]), "--out", run],
            "synth": ["synth", run],
        }[command]
        return Built([*argv, "--config", str(config)], [config.name, *needles])
    return build


def _foreign_checkpoint(ctx: Context) -> Built:
    """A PyTorch file of another model (a plain state dict) given where a comoto checkpoint is expected."""
    import torch

    path = ctx.tmp / "other_model.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    return Built(["evaluate", "--checkpoint", str(path), "--cache", str(ctx.caches["dbt"]), "--out",
                  str(ctx.out / "eval"), "--no-froc"], [path.name, "comoto checkpoint"])


def _other_architecture_resume(ctx: Context) -> Built:
    """`--resume` of a run whose last.pt holds a different network than the run's config asks for."""
    run = ctx.out / "run"
    run.mkdir(parents=True)
    shutil.copyfile(ctx.teacher, run / "last.pt")
    model = {**ctx.train_config["model"], "width": [4, 8, 16, 32]}
    config = ctx.config_file({**ctx.train_config, "epochs": 3, "model": model})
    return Built(["train-teacher", "--cache", str(ctx.caches["mammo"]), "--out", str(run), "--config", str(config),
                  "--resume"], ["last.pt"])


def _student_as_teacher(ctx: Context) -> Built:
    """A checkpoint that is not a comoto file at all, given as --teacher."""
    path = ctx.tmp / "teacher.pt"
    path.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    return Built(["distill", "--cache", str(ctx.caches["dbt"]), "--teacher", str(path), "--teacher-cache",
                  str(ctx.caches["mammo"]), "--out", str(ctx.out / "run"), "--mode", "lesion"], [path.name])


def _predictions_case(edit: Callable[[list[list[str]]], None], *needles: str) -> Callable[[Context], Built]:
    def build(ctx: Context) -> Built:
        boxes = ctx.synth / "dbt" / DBT_BOXES
        box_rows = read_rows(boxes)
        h = box_rows[0]
        table = [["PatientID", "StudyUID", "View", "X", "Width", "Y", "Height", "Z", "Depth", "Score"]]
        for row in box_rows[1:]:
            table.append([row[h.index("PatientID")], row[h.index("StudyUID")], row[h.index("View")], row[h.index("X")],
                          row[h.index("Width")], row[h.index("Y")], row[h.index("Height")], row[h.index("Slice")],
                          "2", "0.9"])
        edit(table)
        predictions = ctx.tmp / "predictions.csv"
        write_rows(predictions, table)
        return Built(["evaluate", "--predictions", str(predictions), "--boxes", str(boxes), "--labels",
                      str(ctx.synth / "dbt" / DBT_LABELS), "--out", str(ctx.out / "eval")],
                     ["predictions.csv", *needles])
    return build


def _not_a_cache(ctx: Context) -> Built:
    path = ctx.tmp / "cache.h5"
    path.write_text("not hdf5\n")
    return Built(["train-teacher", "--cache", str(path), "--out", str(ctx.out / "run")], [path.name])


def _drop_column(column: str):
    def edit(rows):
        index = rows[0].index(column)
        return [r[:index] + r[index + 1:] for r in rows]
    return lambda path: edit_csv(path, edit)


def _rename_column(old: str, new: str):
    return lambda path: edit_csv(path, lambda rows: rows[0].__setitem__(rows[0].index(old), new))


def _duplicate_column(column: str):
    def edit(rows):
        index = rows[0].index(column)
        return [r + [r[index]] for r in rows]
    return lambda path: edit_csv(path, edit)


def _duplicate_row(row: int):
    return lambda path: edit_csv(path, lambda rows: rows.append(list(rows[row - 1])))


def _non_utf8(path: Path) -> None:
    data = path.read_bytes().replace(b"\n", b"\n" + "caf\u00e9,".encode("latin-1"), 0)
    lines = data.split(b"\n")
    lines[2] = lines[2].replace(b"DBT-P", b"DBT-\xe9P", 1)  # a Latin-1 byte in row 3
    path.unlink()
    path.write_bytes(b"\n".join(lines))


def _cell(column: str, value: str, row: int = 2):
    return lambda path: set_cell(path, row, column, value)


CASES: list[Case] = [
    # DBT DICOM files (through the BCS-DBT file-paths CSV, row 2)
    Case("dicom-truncated", 1, _dicom_case(lambda p: truncate(p, 0.6), "truncated")),
    Case("dicom-not-dicom", 1, _dicom_case(lambda p: (p.unlink(), p.write_text("not a DICOM\n" * 30)), "DICOM")),
    Case("dicom-wrong-sop-class", 1, _dicom_case(lambda p: change_dicom(p, SOPClassUID="1.2.840.10008.5.1.4.1.1.2"),
                                                 "SOP class")),
    Case("dicom-wrong-modality", 1, _dicom_case(lambda p: change_dicom(
        p, SOPClassUID="1.2.840.10008.5.1.4.1.1.7", Modality="OT"), "SOP class")),
    Case("dicom-zero-frames", 1, _dicom_case(lambda p: change_dicom(p, NumberOfFrames=0), "zero frames")),
    Case("dicom-absurd-rows", 1, _dicom_case(lambda p: change_dicom(p, Rows=30000), "absurd")),
    Case("dicom-absurd-frames", 1, _dicom_case(lambda p: change_dicom(p, NumberOfFrames=50000), "absurd")),
    Case("dicom-no-pixel-data", 1, _dicom_case(lambda p: change_dicom(p, PixelData=None), "pixel data")),
    Case("dicom-nan-window", 1, _dicom_case(lambda p: set_dbt_window(p, "NaN", "2266"), "window")),
    Case("dicom-zero-window-width", 1, _dicom_case(lambda p: set_dbt_window(p, "1797", "0"), "window")),
    Case("dicom-missing-file", 1, _dicom_case(lambda p: p.unlink(), "not found")),
    Case("dicom-garbled-sequence", 1, _dicom_case(garble_nested_sequence, "corrupt DICOM header")),
    Case("dicom-corrupt-compressed", 1, _dicom_case(corrupt_compressed_pixels, "corrupt")),
    Case("dicom-undecodable-syntax", 1, _dicom_case(undecodable_syntax, "cannot decode MPEG2")),
    Case("dicom-window-beyond-float32", 1, _dicom_case(lambda p: set_dbt_window(p, "1e39", "1e300"), "window")),
    Case("dicom-header-size-wrong", 1, _dicom_case(lambda p: change_dicom(p, Rows=100), "DICOM header", "Rows 100")),
    # BCS-DBT CSVs
    Case("paths-missing-column", 1, _dbt_csv_case(DBT_PATHS, _drop_column("View"), "View")),
    Case("paths-misspelled-column", 1, _dbt_csv_case(DBT_PATHS, _rename_column("StudyUID", "StudyUDI"), "StudyUID")),
    Case("paths-duplicated-column", 1, _dbt_csv_case(DBT_PATHS, _duplicate_column("View"), "View")),
    Case("paths-duplicate-key", 1, _dbt_csv_case(DBT_PATHS, _duplicate_row(2), "row 7")),
    Case("paths-dotdot", 1, _dbt_csv_case(DBT_PATHS, _cell("descriptive_path", "../../../etc/passwd"), "row 2")),
    Case("paths-absolute", 1, _dbt_csv_case(DBT_PATHS, _cell("descriptive_path", "/etc/passwd", 3), "row 3")),
    Case("paths-symlink-leaving-root", 1, _symlink_leaving_root),
    Case("paths-non-utf8", 1, _dbt_csv_case(DBT_PATHS, _non_utf8, "UTF-8")),
    Case("paths-empty-file", 1, _dbt_csv_case(DBT_PATHS, lambda p: (p.unlink(), p.write_bytes(b"")), "")),
    Case("labels-duplicate-key", 1, _dbt_csv_case(DBT_LABELS, _duplicate_row(3), "row 7")),
    Case("labels-missing-row", 1, _dbt_csv_case(DBT_LABELS, lambda p: edit_csv(p, lambda r: r.__delitem__(2)), "row 3")),
    Case("labels-bad-value", 1, _dbt_csv_case(DBT_LABELS, _cell("Cancer", "yes"), "row 2", "Cancer")),
    Case("boxes-outside-image", 1, _dbt_csv_case(DBT_BOXES, _cell("X", "10000"), "row 2", "outside")),
    Case("boxes-negative-width", 1, _dbt_csv_case(DBT_BOXES, _cell("Width", "-5"), "row 2")),
    Case("boxes-zero-height", 1, _dbt_csv_case(DBT_BOXES, _cell("Height", "0"), "row 2")),
    Case("boxes-nan-coordinate", 1, _dbt_csv_case(DBT_BOXES, _cell("Y", "nan"), "row 2")),
    Case("boxes-not-a-number", 1, _dbt_csv_case(DBT_BOXES, _cell("Y", "twelve"), "row 2", "Y")),
    Case("boxes-slice-out-of-range", 1, _dbt_csv_case(DBT_BOXES, _cell("Slice", "999"), "row 2", "999")),
    Case("boxes-unknown-volume", 1, _dbt_csv_case(DBT_BOXES, _cell("StudyUID", "DBT-S99999"), "row 2")),
    Case("boxes-huge-integer", 1, _dbt_csv_case(DBT_BOXES, _cell("VolumeSlices", "99999999999999999999"), "row 2",
                                                "VolumeSlices", "out of range")),
    # VinDr-Mammo and the generic manifest
    Case("vindr-missing-column", 1, _mammo_case(_drop_column("xmin"), "xmin")),
    Case("vindr-box-outside", 1, _mammo_case(_cell("xmax", "9999"), "row 2")),
    Case("vindr-xmin-after-xmax", 1, _mammo_case(_cell("xmin", "200"), "row 2")),
    Case("vindr-unsafe-image-id", 1, _mammo_case(_cell("image_id", "../../../etc/passwd"), "row 2")),
    Case("vindr-dicom-truncated", 1, _mammo_case(lambda p: truncate(p, 0.3), "truncated", dicom_row=2)),
    Case("vindr-dicom-nan-window", 1, _mammo_case(lambda p: change_dicom(p, WindowCenter="NaN"), "not finite",
                                                  dicom_row=2)),
    Case("vindr-dicom-overflowing-rescale", 1, _mammo_case(
        lambda p: change_dicom(p, RescaleSlope="1e308", RescaleIntercept="0"), "not finite", dicom_row=2)),
    Case("vindr-dicom-rows-zero", 1, _mammo_case(lambda p: change_dicom(p, Rows=0), "absurd", "Rows 0",
                                                 dicom_row=2)),
    Case("vindr-dicom-header-size-wrong", 1, _mammo_case(lambda p: change_dicom(p, Rows=100), "DICOM header",
                                                         "Rows 100", dicom_row=2)),
    Case("vindr-dicom-corrupt-compressed", 1, _mammo_case(corrupt_compressed_pixels, "corrupt", dicom_row=2)),
    Case("vindr-dicom-secondary-capture-rg", 1, _mammo_case(
        lambda p: change_dicom(p, SOPClassUID="1.2.840.10008.5.1.4.1.1.7", Modality="RG"), "--accept-modality RG",
        dicom_row=2)),
    Case("manifest-bad-number", 1, _manifest_case([["{first}", "p1", "1", "2", "x", "9"]], "row 2", "xmax")),
    Case("manifest-dotdot", 1, _manifest_case([["../{first}", "p1", "", "", "", ""]], "row 2")),
    Case("manifest-degenerate-box", 1, _manifest_case([["{first}", "p1", "10", "10", "10", "20"]], "row 2")),
    Case("manifest-huge-number", 1, _manifest_case([["{first}", "p1", "1", "2", "1e300", "9"]], "row 2", "xmax")),
    # configs (exit 2) and flags
    Case("config-wrong-type", 2, _config_case("train-teacher", {"epochs": "many"}, "epochs")),
    Case("config-unknown-key", 2, _config_case("train-teacher", {"learning_rate": 0.1}, "learning_rate")),
    Case("config-negative-lr", 2, _config_case("distill", {"optim": {"lr": -0.001}}, "optim.lr")),
    Case("config-bad-ratio", 2, _config_case("distill", {"train_ratio": 1.5}, "train_ratio")),
    Case("config-preprocess-type", 2, _config_case("preprocess", {"image_height": "big"}, "image_height")),
    Case("config-bad-modality-code", 2, _config_case("preprocess", {"accept_modality": ["RG", "not a code!"]},
                                                     "accept_modality")),
    Case("config-evaluate-negative", 2, _config_case("evaluate", {"bootstrap": -1}, "bootstrap")),
    Case("config-synth-unknown", 2, _config_case("synth", {"sizes": "tiny"}, "sizes")),
    Case("config-not-json", 2, _config_case("train-teacher", "{epochs: 2", "JSON")),
    Case("config-not-an-object", 2, _config_case("train-teacher", "[1, 2]", "object")),
    Case("flag-wrong-type", 2, lambda ctx: Built(["train-teacher", "--cache", str(ctx.caches["mammo"]), "--out",
                                                  str(ctx.out / "run"), "--epochs", "ten"], ["--epochs"])),
    # checkpoints and caches
    Case("checkpoint-foreign-model", 1, _foreign_checkpoint),
    Case("checkpoint-other-architecture-resume", 1, _other_architecture_resume),
    Case("checkpoint-not-a-checkpoint", 1, _student_as_teacher),
    Case("cache-not-hdf5", 1, _not_a_cache),
    # DBTex submission CSVs
    Case("predictions-missing-column", 1, _predictions_case(
        lambda t: [r.pop(9) for r in t], "Score")),
    Case("predictions-nan-score", 1, _predictions_case(lambda t: t[2].__setitem__(9, "nan"), "row 3")),
    Case("predictions-negative-width", 1, _predictions_case(lambda t: t[2].__setitem__(4, "-3"), "row 3")),
]
