"""`comoto synth`: real layouts, readable DICOM, the official frame rule, boxes on lesions, determinism."""

from __future__ import annotations

import ast
import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from comoto_cli.cli import app
from comoto_cli.config import SynthConfig
from comoto_cli.errors import UsageError
from comoto_cli.synth import generate_dataset

# fewer items than the tiny preset keeps the whole file fast; still >= 5 DBT patients and both photometrics
SMALL = {"size": "tiny", "volumes": 8, "mammograms": 8}


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _official(pixels: np.ndarray, view: str) -> np.ndarray:
    """The official BCS-DBT reader's frame rule, written out independently of the generator."""
    frame = pixels[0].astype(np.float64)
    image_laterality = "R" if frame[:, 0].sum() < frame[:, -1].sum() else "L"
    if image_laterality != view[0].upper():
        return pixels[:, ::-1, ::-1]
    return pixels


def _box_vs_ring(image: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> tuple[float, float]:
    grow_x, grow_y = max(2, (x1 - x0) // 2), max(2, (y1 - y0) // 2)
    rows, cols = image.shape
    rx0, ry0, rx1, ry1 = (
        max(0, x0 - grow_x),
        max(0, y0 - grow_y),
        min(cols, x1 + grow_x),
        min(rows, y1 + grow_y),
    )
    region = image[ry0:ry1, rx0:rx1].astype(np.float64)
    ring = np.ones(region.shape, dtype=bool)
    ring[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0] = False
    return float(region[~ring].mean()), float(region[ring].mean())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "data"
    summary = generate_dataset(out, SynthConfig(**SMALL), progress=False)
    return out, summary


def test_layout_and_csv_columns(dataset):
    out, summary = dataset
    dbt = out / "dbt"
    header, paths = _rows(dbt / "BCS-DBT-file-paths-train-v2.csv")
    assert header == ["PatientID", "StudyUID", "View", "descriptive_path", "classic_path"]
    header, labels = _rows(dbt / "BCS-DBT-labels-train-v2.csv")
    assert header == ["PatientID", "StudyUID", "View", "Normal", "Actionable", "Benign", "Cancer"]
    header, boxes = _rows(dbt / "BCS-DBT-boxes-train-v2.csv")
    assert header == [
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
    assert len(paths) == len(labels) == 8 == summary["dbt_volumes"]
    assert len({r["PatientID"] for r in paths}) >= 5
    for row in paths:
        assert (dbt / row["descriptive_path"]).is_file()
        assert row["descriptive_path"].startswith("Breast-Cancer-Screening-DBT/" + row["PatientID"] + "/")
        assert row["descriptive_path"].endswith("/1-1.dcm") and row["View"] in ("lcc", "lmlo", "rcc", "rmlo")
    for row in labels:
        flags = [int(row[c]) for c in ("Normal", "Actionable", "Benign", "Cancer")]
        assert sum(flags) == 1 and set(flags) <= {0, 1}
    assert any(r["Normal"] == "1" for r in labels)
    positive = {(r["StudyUID"], r["View"]) for r in labels if r["Benign"] == "1" or r["Cancer"] == "1"}
    assert {(r["StudyUID"], r["View"]) for r in boxes} == positive  # every boxed volume is benign or cancer
    assert {r["Class"] for r in boxes} <= {"benign", "cancer"} and {r["AD"] for r in boxes} == {"0"}

    mammo = out / "mammo"
    header, findings = _rows(mammo / "finding_annotations.csv")
    assert header == [
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
    header, breasts = _rows(mammo / "breast-level_annotations.csv")
    assert header == [
        "study_id",
        "series_id",
        "image_id",
        "laterality",
        "view_position",
        "height",
        "width",
        "breast_birads",
        "breast_density",
        "split",
    ]
    assert len(breasts) == 8 and {r["image_id"] for r in findings} == {r["image_id"] for r in breasts}
    for row in findings:
        assert (mammo / "images" / row["study_id"] / f"{row['image_id']}.dicom").is_file()
        categories = ast.literal_eval(row["finding_categories"])
        assert categories in (["No Finding"], ["Mass"], ["Suspicious Calcification"])
        empty = [row[c] == "" for c in ("xmin", "ymin", "xmax", "ymax")]
        assert all(empty) == (categories == ["No Finding"]) and (all(empty) or not any(empty))
        assert row["split"] in ("training", "test")
    assert any(ast.literal_eval(r["finding_categories"]) == ["No Finding"] for r in findings)
    assert any(r["xmin"] for r in findings)
    # unpaired modalities: no identifier shared between the two halves
    mammo_ids = {r["study_id"] for r in breasts} | {r["image_id"] for r in breasts}
    assert not mammo_ids & ({r["PatientID"] for r in paths} | {r["StudyUID"] for r in paths})


def test_dbt_dicoms_and_official_frame_boxes(dataset):
    out, _ = dataset
    truth = json.loads((out / "truth.json").read_text())
    _, paths = _rows(out / "dbt" / "BCS-DBT-file-paths-train-v2.csv")
    _, boxes = _rows(out / "dbt" / "BCS-DBT-boxes-train-v2.csv")
    syntaxes, rotated = set(), 0
    checked = 0
    for row in paths:
        ds = pydicom.dcmread(out / "dbt" / row["descriptive_path"])
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.13.1.3" and ds.Modality == "MG"
        assert ds.PatientID == row["PatientID"] and ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.ImageLaterality == row["View"][0].upper()
        voi = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
        assert float(voi.WindowWidth) > 0
        pixels = ds.pixel_array  # decompresses the JPEG 2000 ones
        assert pixels.dtype == np.uint16 and pixels.shape == (int(ds.NumberOfFrames), ds.Rows, ds.Columns)
        assert pixels.max() < 2**ds.BitsStored
        entry = truth["dbt"][f"{row['PatientID']}/{row['StudyUID']}/{row['View']}"]
        official = _official(pixels, row["View"])
        # the flip rule agrees with how the volume was stored, and the rule's own test is not a close call
        assert (official is not pixels) == entry["rotated"]
        rotated += entry["rotated"]
        first, last = official[0][:, 0].astype(float).sum(), official[0][:, -1].astype(float).sum()
        chest, far = (last, first) if row["View"][0] == "r" else (first, last)
        assert chest > 5 * far + 1000
        # windowing maps tissue well but clips a little (some pixels above the window inside the breast)
        centre, width = float(voi.WindowCenter), float(voi.WindowWidth)
        mid = official[official.shape[0] // 2]
        assert (mid > centre + width / 2).mean() < 0.05 and (mid > centre - width / 2).mean() > 0.2
        volume_boxes = [b for b in boxes if (b["StudyUID"], b["View"]) == (row["StudyUID"], row["View"])]
        assert len(volume_boxes) == len(entry["lesions"])
        for box, lesion in zip(volume_boxes, entry["lesions"]):
            x, y, w, h, z = (int(box[k]) for k in ("X", "Y", "Width", "Height", "Slice"))
            assert int(box["VolumeSlices"]) == pixels.shape[0]
            assert 0 <= z < pixels.shape[0]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= ds.Columns and y + h <= ds.Rows
            assert x <= lesion["x"] <= x + w and y <= lesion["y"] <= y + h and z == lesion["slice"]
            inside, ring = _box_vs_ring(official[z], x, y, x + w, y + h)
            assert inside > ring, (row["View"], box)
            # the lesion is most conspicuous on its central slice: it fades a few slices away
            far_slice = z + 4 if z + 4 < pixels.shape[0] else z - 4
            inside_far, ring_far = _box_vs_ring(official[far_slice], x, y, x + w, y + h)
            assert inside - ring > inside_far - ring_far
            checked += 1
    assert checked >= 3 and rotated >= 1
    assert syntaxes == {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"}  # explicit VR LE and J2K lossless


def test_mammo_dicoms_photometric_voi_and_boxes(dataset):
    out, _ = dataset
    truth = json.loads((out / "truth.json").read_text())
    _, findings = _rows(out / "mammo" / "finding_annotations.csv")
    photometrics, vois, syntaxes = set(), set(), set()
    for row in findings:
        ds = pydicom.dcmread(out / "mammo" / "images" / row["study_id"] / f"{row['image_id']}.dicom")
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2" and ds.Modality == "MG"
        assert (ds.Rows, ds.Columns) == (int(row["height"]), int(row["width"]))
        assert ds.ImageLaterality == row["laterality"] and ds.ViewPosition == row["view_position"]
        entry = truth["mammo"][row["image_id"]]
        assert ds.PhotometricInterpretation == entry["photometric"]
        photometrics.add(ds.PhotometricInterpretation)
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
        vois.add("lut" if "VOILUTSequence" in ds else "window" if "WindowCenter" in ds else "none")
        pixels = ds.pixel_array.astype(np.float64)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            pixels = (2**ds.BitsStored - 1) - pixels
        windowed = pydicom.pixels.apply_voi_lut(ds.pixel_array, ds)
        assert windowed.shape == pixels.shape and np.ptp(windowed) > 0
        if row["xmin"]:
            x0, y0, x1, y1 = (int(float(row[k])) for k in ("xmin", "ymin", "xmax", "ymax"))
            assert 0 <= x0 < x1 <= ds.Columns and 0 <= y0 < y1 <= ds.Rows
            inside, ring = _box_vs_ring(pixels, x0, y0, x1, y1)
            assert inside > ring
            assert any(x0 <= les["x"] <= x1 and y0 <= les["y"] <= y1 for les in entry["lesions"])
        # image laterality: the chest wall (bright breast in MONOCHROME2 terms) is on the laterality's side
        left, right = pixels[:, 0].sum(), pixels[:, -1].sum()
        assert (right > left) == (row["laterality"] == "R")
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert vois == {"lut", "window"}
    assert "1.2.840.10008.1.2.4.90" in syntaxes


def test_deterministic_per_seed(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    generate_dataset(again, SynthConfig(**SMALL), progress=False)
    assert _hashes(again) == _hashes(out)
    other = tmp_path / "other"
    generate_dataset(
        other, SynthConfig(**{**SMALL, "volumes": 2, "mammograms": 2, "seed": 1}), progress=False
    )
    other_hashes = _hashes(other)
    assert other_hashes["dbt/BCS-DBT-boxes-train-v2.csv"] != _hashes(out)["dbt/BCS-DBT-boxes-train-v2.csv"]
    assert not set(other_hashes.values()) & set(_hashes(out).values())


def test_parallel_workers_write_the_same_files(tmp_path):
    config = SynthConfig(size="tiny", volumes=2, mammograms=2, seed=3)
    generate_dataset(tmp_path / "one", config, progress=False, workers=1)
    generate_dataset(tmp_path / "two", config, progress=False, workers=2)
    assert _hashes(tmp_path / "one") == _hashes(tmp_path / "two")


def test_refuses_non_empty_output_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        generate_dataset(out, SynthConfig(size="tiny", volumes=2, mammograms=2), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    assert (out / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    generate_dataset(empty, SynthConfig(size="tiny", volumes=2, mammograms=2), progress=False)
    assert (empty / "truth.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty"]


def test_cli(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["synth", str(out), "--volumes", "2", "--mammograms", "2", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert "2 volumes" in result.output
    _, labels = _rows(out / "dbt" / "BCS-DBT-labels-train-v2.csv")
    assert len(labels) == 2
    assert json.loads((out / "truth.json").read_text())["seed"] == 5
    again = runner.invoke(app, ["synth", str(out), "--volumes", "2", "--mammograms", "2"])
    assert again.exit_code != 0
    bad = runner.invoke(app, ["synth", str(tmp_path / "x"), "--volumes", "1"])
    assert bad.exit_code != 0 and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- domain gap
def _spread(psf: np.ndarray) -> tuple[float, float]:
    """Standard deviations (rows, cols) of a non-negative point-spread function."""
    weights = np.clip(psf, 0, None)
    y, x = np.mgrid[0:psf.shape[0], 0:psf.shape[1]]
    total = weights.sum()
    cy, cx = (weights * y).sum() / total, (weights * x).sum() / total
    return (float(np.sqrt((weights * (y - cy) ** 2).sum() / total)),
            float(np.sqrt((weights * (x - cx) ** 2).sum() / total)))


@pytest.mark.parametrize("projections", [0, 15])
def test_out_of_plane_blur_runs_along_the_sweep_only_in_the_limited_angle_model(projections):
    """A point 4 slices away: the isotropic model blurs it alike in both directions; the limited-angle model
    (realistic gap) spreads it along the sweep (y), as N shifted copies, and hardly across it."""
    from comoto_cli.synth.phantom import DbtParams, _depth_operator, _freq2, _freq_y

    size = 128
    params = DbtParams(sweep_projections=projections, slice_spacing_px=40.0)
    transfer = _depth_operator(_freq2(size, size), np.array([4]), 1.0, 1.0, params, fy=_freq_y(size, size))[0]
    point = np.zeros((size, size))
    point[size // 2, size // 2] = 1.0
    psf = np.fft.irfft2(np.fft.rfft2(point) * transfer, s=(size, size))
    along, across = _spread(psf)
    if projections == 0:
        assert along == pytest.approx(across, rel=1e-6)
    else:
        assert along > 3 * across
        # the copies reach +- d * spacing * tan(7.5 degrees) = +- 21 px along the sweep
        profile = psf[:, size // 2]
        assert profile[size // 2 + 18:size // 2 + 24].max() > 0.2 * profile.max()


def test_realistic_gap_mammograms_have_a_taller_finer_field_with_the_breast_in_it(tmp_path):
    from comoto_cli.synth import DOMAIN_GAPS, PRESETS, mammo_geometry

    assert "domain_gap" not in SynthConfig().model_dump()  # datasets made before the option read the same
    out = tmp_path / "realistic"
    summary = generate_dataset(out, SynthConfig(size="tiny", volumes=5, mammograms=8, domain_gap="realistic"),
                               progress=False)
    rows, cols, breast_rows = mammo_geometry(DOMAIN_GAPS["realistic"], PRESETS["tiny"])
    dbt_rows, dbt_cols = PRESETS["tiny"].dbt_shape
    assert summary["mammo_shape"] == [rows, cols] and summary["domain_gap"] == "realistic"
    assert cols == round(dbt_cols * 1.07 / 0.7) and rows == round(cols * 1.52) and breast_rows < rows
    truth = json.loads((out / "truth.json").read_text())
    _, findings = _rows(out / "mammo" / "finding_annotations.csv")
    checked = 0
    for image_id in {row["image_id"] for row in findings}:
        row = next(r for r in findings if r["image_id"] == image_id)
        ds = pydicom.dcmread(out / "mammo" / "images" / row["study_id"] / f"{image_id}.dicom")
        assert (ds.Rows, ds.Columns) == (rows, cols)
        pixels = ds.pixel_array.astype(np.float64)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            pixels = (2**ds.BitsStored - 1) - pixels
        tissue_rows = np.flatnonzero((pixels > 0.1 * pixels.max()).sum(axis=1) > 0.05 * cols)
        assert tissue_rows.size and tissue_rows[-1] - tissue_rows[0] < breast_rows  # air above and / or below
        for lesion in truth["mammo"][image_id]["lesions"]:
            x0, y0, x1, y1 = lesion["box"]
            assert tissue_rows[0] - 2 <= y0 < y1 <= tissue_rows[-1] + 2
            inside, ring = _box_vs_ring(pixels, x0, y0, x1, y1)
            assert inside > ring
            checked += 1
    assert checked > 0
