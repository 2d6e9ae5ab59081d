"""`comoto predict --format dicom-sr`: one DICOM SR (TID 1500, Comprehensive 3D SR) per input, read back with
highdicom and checked box by box against the CSV of the same inputs, in the stored pixel frame.

The detector is untrained with its classification bias lifted (as in tests/test_volume_inference.py), so it
reports many boxes everywhere: what is tested is where they are written, not whether they are right.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from comoto_cli import __version__
from comoto_cli.inference import formats
from comoto_cli.inference.dicom_sr import SR_SUFFIX, rectangle, referenced_frames, stored_boxes
from comoto_cli.inference.formats import register_format, write_output
from comoto_cli.inference.volume import DBTEX_COLUMNS
from comoto_cli.utils.csvio import read_csv
from tests.conftest import tiny_model_config

HEIGHT, WIDTH = 64, 32  # the model's size
ROWS, COLS, SLICES = 96, 48, 5  # the phantoms' stored size
STUDY = "1.2.826.0.1.3680043.10.77"
# name -> (patient, view, stored rotated?, study); the rotated volume is what the official reader turns back.
VOLUMES = {
    "plain": ("SR-P1", "lcc", False, STUDY),
    "rotated": ("SR-P1", "rcc", True, STUDY),  # breast on the right in the official frame, stored turned
}


def run_cli(argv: list[str]) -> int:
    from comoto_cli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return int(exit_info.value.code or 0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from comoto_cli.networks.checkpoint import save_checkpoint
    from comoto_cli.networks.detector import build_detector

    torch.manual_seed(0)
    config = tiny_model_config(returned_layers=[1, 2, 3])
    model = build_detector(config, (HEIGHT, WIDTH)).eval()
    head = model.detector.network.classification_head
    last = [module for module in head.modules() if isinstance(module, torch.nn.Conv2d)][-1]
    last.bias.data.fill_(-0.4)  # many anchors pass the score threshold: plenty of boxes to check
    path = tmp_path_factory.mktemp("sr-ckpt") / "best.pt"
    save_checkpoint(path, model_state=model.state_dict(), model_config=config, image_size=(HEIGHT, WIDTH),
                    metadata={"note": "untrained, lifted bias"})
    return path


def official_phantom(rng, view: str, slices: int = SLICES) -> np.ndarray:
    """uint16 12-bit noise over a ramp that puts the breast on the view's side (the pixel laterality rule)."""
    ramp = 0.3 + 0.4 * (1 - np.arange(COLS) / COLS)
    ramp = ramp if view[0] == "l" else ramp[::-1]
    volume = ramp + 0.15 * rng.random((slices, ROWS, COLS))
    return np.round(np.clip(volume, 0, 1) * 4095).astype(np.uint16)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two DBT volumes of one study (one stored turned by 180 degrees) and a mammogram of another study; returns
    the folder and, per resolved path, what the test knows of it (stored pixels, official pixels, ...)."""
    from comoto_cli.synth.writer import write_dbt_dicom, write_mammo_dicom

    root = tmp_path_factory.mktemp("sr-inputs")
    rng = np.random.default_rng(5)
    known = {}
    for number, (name, (patient, view, rotated, study)) in enumerate(VOLUMES.items()):
        official = official_phantom(rng, view)
        stored = official[:, ::-1, ::-1].copy() if rotated else official
        path = root / "dbt" / f"{name}.dcm"
        write_dbt_dicom(path, stored, seed=0, patient_id=patient, study_instance_uid=study,
                        series_instance_uid=f"{study}.{number + 1}", series_number=number + 1, view=view,
                        window=(2048.0, 4096.0), compress=False)
        known[str(path.resolve())] = {"kind": "dbt", "stored": stored, "official": official, "flipped": rotated,
                                      "view": view, "study": study}
    image = official_phantom(rng, "lcc", slices=1)[0]
    path = root / "mammo" / "image.dcm"
    path.parent.mkdir()
    write_mammo_dicom(path, image, seed=0, patient_id="SR-MG", study_instance_uid="1.2.826.0.1.3680043.10.78",
                      series_instance_uid="1.2.826.0.1.3680043.10.78.1", sop_key="sr-m1", laterality="L",
                      view_position="CC", bits_stored=12, photometric="MONOCHROME2", window=(2048.0, 4096.0),
                      voi_lut=None, compress=False)
    known[str(path.resolve())] = {"kind": "mammo", "stored": image[None], "official": image[None], "flipped": False,
                                  "view": "lcc", "study": "1.2.826.0.1.3680043.10.78"}
    return root, known


@pytest.fixture(scope="module")
def outputs(checkpoint, inputs, tmp_path_factory):
    """The CSV and the SR folder of the same inputs and checkpoint."""
    root, _ = inputs
    out = tmp_path_factory.mktemp("sr-out")
    csv_path, sr_folder = out / "preds.csv", out / "sr"
    common = ["predict", "--checkpoint", str(checkpoint), str(root), "--batch-size", "2"]
    assert run_cli([*common, "--out", str(csv_path)]) == 0
    assert run_cli([*common, "--out", str(sr_folder), "--format", "dicom-sr"]) == 0
    return csv_path, sr_folder


def csv_rows(csv_path) -> dict[str, list[dict]]:
    """The CSV's rows per input path, in file order (best first within each input)."""
    table = read_csv(csv_path, [*DBTEX_COLUMNS, "path"])
    by_path: dict[str, list[dict]] = {}
    for i, path in enumerate(table.text("path")):
        by_path.setdefault(path, []).append({name: table.floats(name)[i] for name in
                                             ("X", "Y", "Width", "Height", "Z", "Depth", "Score")})
    return by_path


def sr_of(sr_folder, known) -> dict[str, object]:
    """Each SR read back with highdicom, keyed by the path of the input it references."""
    uid_to_path = {}
    for path in known:
        uid_to_path[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    found = {}
    for file in sorted(sr_folder.iterdir()):
        sr = hd.sr.srread(file)
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        referenced = str(evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        assert referenced in uid_to_path, file
        found[uid_to_path[referenced]] = (file, sr)
    return found


def group_values(group):
    """(polyline, frame numbers or None, score, algorithm name/version/parameters, referenced SOP UID)."""
    region = group.roi
    reference = region.ContentSequence[0].ReferencedSOPSequence[0]
    frames = [int(v) for v in np.atleast_1d(reference.ReferencedFrameNumber)] \
        if "ReferencedFrameNumber" in reference else None
    (measurement,) = group.get_measurements()
    return region, frames, measurement, str(reference.ReferencedSOPInstanceUID)


def algorithm_of(item) -> dict[str, list[str]]:
    """The TID 4019 Algorithm Identification TEXT items directly below ``item`` (highdicom writes, not parses,
    them): concept meaning -> values."""
    found: dict[str, list[str]] = {}
    for child in item.ContentSequence:
        meaning = child.ConceptNameCodeSequence[0].CodeMeaning
        if meaning.startswith("Algorithm") and child.ValueType == "TEXT":
            found.setdefault(meaning, []).append(str(child.TextValue))
    return found


# ---------------------------------------------------------------------------------------------- end to end
def test_every_sr_box_frame_and_score_matches_the_csv_in_the_stored_frame(checkpoint, inputs, outputs):
    _, known = inputs
    csv_path, sr_folder = outputs
    by_path = csv_rows(csv_path)
    reports = sr_of(sr_folder, known)
    assert set(reports) == set(known), "one SR per input"
    assert sorted(p.name for p in sr_folder.iterdir()) == sorted(
        ["dbt__plain" + SR_SUFFIX, "dbt__rotated" + SR_SUFFIX, "mammo__image" + SR_SUFFIX])
    assert not [p for p in sr_folder.parent.rglob("*.tmp")]
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    series = {}
    checked_pixels = 0
    for path, (_file, sr) in reports.items():
        info = known[path]
        source = pydicom.dcmread(path, stop_before_pixels=True)
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
        assert sr.StudyInstanceUID == info["study"] == source.StudyInstanceUID
        assert sr.PatientID == source.PatientID and sr.Modality == "SR"
        assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
        series.setdefault(str(sr.StudyInstanceUID), set()).add(str(sr.SeriesInstanceUID))
        template = sr.ContentTemplateSequence[0]
        assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "1500")
        groups = sr.content.get_planar_roi_measurement_groups()
        rows = by_path.get(path, [])
        assert rows, f"the lifted-bias detector found nothing in {path}"
        assert len(groups) == len(rows)
        stored = info["stored"]
        for rank, (group, row) in enumerate(zip(groups, rows), start=1):
            assert group.tracking_identifier == f"detection {rank}"
            region, frames, measurement, referenced = group_values(group)
            assert referenced == source.SOPInstanceUID
            assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
            points = np.asarray(region.value, dtype=np.float64)
            # The CSV box, official frame, turned back by 180 degrees where the reader had turned the volume.
            x0, y0 = row["X"], row["Y"]
            x1, y1 = x0 + row["Width"], y0 + row["Height"]
            if info["flipped"]:
                x0, x1, y0, y1 = COLS - x1, COLS - x0, ROWS - y1, ROWS - y0
            expected = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
            # the CSV keeps 3 decimals of X and Width (so X + Width is off by up to 1e-3); the SR keeps float32
            np.testing.assert_allclose(points, expected, atol=1.2e-3, rtol=0)
            if info["kind"] == "dbt":
                assert frames == [int(row["Z"]) + 1] and row["Depth"] == 0
            else:
                assert frames is None
            assert measurement.name.value == "111012" and measurement.unit.value == "1"
            assert math.isclose(measurement.value, row["Score"], rel_tol=1e-9, abs_tol=1e-12)
            for item in (measurement[0], group[0]):  # on the score and on the whole group
                assert algorithm_of(item) == {"Algorithm Name": ["CoMoTo CLI"], "Algorithm Version": [__version__],
                                              "Algorithm Parameters": [f"checkpoint sha256 {sha}"]}
            # The pixels under the SR's box in the stored image are the pixels under the CSV's box in the official
            # image (turned when flipped): checked on the whole pixels the boxes cover, where no edge lies within
            # rounding of a pixel border.
            edges = np.concatenate([points[:4].ravel(), [row["X"], row["Y"], row["X"] + row["Width"],
                                                         row["Y"] + row["Height"]]])
            if np.min(np.abs(edges - np.round(edges))) > 2e-3:
                z = int(row["Z"])
                official = info["official"][z, math.floor(row["Y"]):math.ceil(row["Y"] + row["Height"]),
                                            math.floor(row["X"]):math.ceil(row["X"] + row["Width"])]
                under = stored[z, math.floor(points[0, 1]):math.ceil(points[2, 1]),
                               math.floor(points[0, 0]):math.ceil(points[2, 0])]
                np.testing.assert_array_equal(under[::-1, ::-1] if info["flipped"] else under, official)
                checked_pixels += 1
        # the rotated volume really needed the turn: its SR boxes are not the CSV's
        if info["flipped"]:
            first = np.asarray(group_values(groups[0])[0].value)[0]
            assert abs(first[0] - rows[0]["X"]) > 1 or abs(first[1] - rows[0]["Y"]) > 1
    assert checked_pixels > 10
    # One new SR series per study in a run: the two DBT views share one.
    assert len(series[STUDY]) == 1 and len(series) == 2


def test_the_rotated_volume_is_the_one_the_reader_turns(inputs):
    from comoto_cli.data.dicom_io import open_dicom_image

    _, known = inputs
    for path, info in known.items():
        image, kind = open_dicom_image(path)
        assert kind == info["kind"]
        assert bool(getattr(image, "flipped", False)) == info["flipped"]


def test_sr_files_pass_dciodvfy(outputs):
    """dicom3tools' validator on every SR (it knows the SR IODs and TID 1500)."""
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy (dicom3tools) is not on PATH: `apt-get install dicom3tools` to validate the SRs")
    _, sr_folder = outputs
    for file in sorted(sr_folder.iterdir()):
        result = subprocess.run([dciodvfy, str(file)], capture_output=True, text=True, timeout=120)
        lines = (result.stdout + result.stderr).splitlines()
        # It names the IOD it checked, and an error line starts with "Error" (warnings, e.g. on the source's own
        # attributes copied into the SR, are allowed).
        assert "Comprehensive3DSR" in lines, f"{file.name}:\n" + "\n".join(lines)
        errors = [line for line in lines if line.startswith("Error")]
        assert result.returncode == 0 and not errors, f"{file.name}:\n" + "\n".join(lines)


def test_a_failing_input_leaves_no_sr_and_an_existing_folder_as_it_was(checkpoint, inputs, tmp_path, capsys):
    root, _ = inputs
    bad = tmp_path / "in" / "broken.dcm"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00" * 64 + b"not DICOM")
    good = root / "dbt" / "plain.dcm"
    fresh = tmp_path / "fresh" / "sr"
    code = run_cli(["predict", "--checkpoint", str(checkpoint), str(good), str(bad), "--out", str(fresh),
                    "--format", "dicom-sr"])
    assert code == 1 and str(bad.resolve()) in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine\n")
    assert run_cli(["predict", "--checkpoint", str(checkpoint), str(good), str(bad), "--out", str(kept),
                    "--format", "dicom-sr"]) == 1
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    # An SR that cannot be written (here: the input has no SOPInstanceUID) fails the run the same way.
    dataset = pydicom.dcmread(good)
    del dataset.SOPInstanceUID
    orphan = tmp_path / "in" / "orphan.dcm"
    dataset.save_as(orphan)
    assert run_cli(["predict", "--checkpoint", str(checkpoint), str(good), str(orphan), "--out", str(kept),
                    "--format", "dicom-sr"]) == 1
    err = capsys.readouterr().err
    assert str(orphan.resolve()) in err and "SOPInstanceUID" in err
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    assert run_cli(["predict", "--checkpoint", str(checkpoint), str(good), "--out", str(kept),
                    "--format", "dicom-sr"]) == 0
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt", "plain" + SR_SUFFIX]
    # --out naming a file is refused in one line
    (tmp_path / "afile").write_text("x")
    assert run_cli(["predict", "--checkpoint", str(checkpoint), str(good), "--out", str(tmp_path / "afile"),
                    "--format", "dicom-sr"]) != 0
    assert (tmp_path / "afile").read_text() == "x"


# ---------------------------------------------------------------------------------------------- pieces
def test_stored_boxes_undo_the_official_turn_only_where_it_applied():
    rows = {"X": np.array([1.0, 10.5]), "Y": np.array([2.0, 0.0]), "Width": np.array([3.0, 5.5]),
            "Height": np.array([4.0, 20.0])}
    np.testing.assert_allclose(stored_boxes(rows, 20, 16, flipped=False), [[1, 2, 4, 6], [10.5, 0, 16, 20]])
    # turned by 180 degrees in a 20-row, 16-column image: x -> 16 - x, y -> 20 - y, corners swapped
    np.testing.assert_allclose(stored_boxes(rows, 20, 16, flipped=True), [[12, 14, 15, 18], [0, 0, 5.5, 20]])
    np.testing.assert_array_equal(rectangle([1, 2, 4, 6]), [[1, 2], [4, 2], [4, 6], [1, 6], [1, 2]])
    assert referenced_frames(0, 0, 5) == [1] and referenced_frames(3, 2, 5) == [4, 5] and referenced_frames(4, 3, 5) == [5]


def test_folder_formats_get_the_predictions_and_write_all_or_nothing(tmp_path):
    """A folder format receives the per-input predictions and the run; its files appear together, or none."""
    from comoto_cli.inference.formats import PredictRun

    seen = []

    def per_input(folder, predictions, run):
        seen.append((folder.parent, list(predictions), run))
        for index, name in enumerate(predictions):
            (folder / f"{name}.txt").write_text(f"{index} {run.checkpoint_sha256}\n")

    def half(folder, predictions, run):
        (folder / "first.txt").write_text("1")
        raise RuntimeError("writer failed")

    register_format("per-input", per_input, folder=True, description="test")
    register_format("half", half, folder=True)
    try:
        out = tmp_path / "out"
        write_output(out, [], "per-input", predictions=["a", "b"], run=PredictRun(checkpoint_sha256="abc"))
        assert seen[0][0] == out and seen[0][1] == ["a", "b"]
        assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"] and (out / "b.txt").read_text() == "1 abc\n"
        with pytest.raises(RuntimeError, match="writer failed"):
            write_output(out, [], "half", predictions=["a"])
        assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"]
        with pytest.raises(RuntimeError):
            write_output(tmp_path / "new" / "out", [], "half", predictions=["a"])
        assert not (tmp_path / "new").exists()
        with pytest.raises(ValueError, match="predictions"):
            write_output(out, [], "per-input")
        with pytest.raises(ValueError, match="writer"):
            register_format("nonsense", 42)
    finally:
        for name in ("per-input", "half"):
            formats._FORMATS.pop(name)
            formats.PredictConfig.format_names.remove(name)


def test_sr_of_a_real_mammogram_matches_the_csv(checkpoint, real, tmp_path):
    """The real NEMA mammogram (4664 x 3064, JPEG 2000, Secondary Capture with Modality RG): its SR reads back with
    highdicom, referencing the image, with every box the CSV's (a mammogram's official frame is its stored one)."""
    image = real / "MG1_J2KI.dcm"
    common = ["predict", "--checkpoint", str(checkpoint), str(image), "--accept-modality", "RG"]
    assert run_cli([*common, "--out", str(tmp_path / "preds.csv")]) == 0
    assert run_cli([*common, "--out", str(tmp_path / "sr"), "--format", "dicom-sr"]) == 0
    rows = csv_rows(tmp_path / "preds.csv")[str(image.resolve())]
    assert rows, "the lifted-bias detector found nothing on the real mammogram"
    (sr_file,) = sorted((tmp_path / "sr").iterdir())
    sr = hd.sr.srread(sr_file)
    source = pydicom.dcmread(image, stop_before_pixels=True)
    assert sr.PatientID == source.PatientID and sr.StudyInstanceUID == source.StudyInstanceUID
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(rows)
    for group, row in zip(groups, rows):
        region, frames, measurement, referenced = group_values(group)
        assert referenced == source.SOPInstanceUID and frames is None
        x0, y0, x1, y1 = row["X"], row["Y"], row["X"] + row["Width"], row["Y"] + row["Height"]
        assert 0 <= x0 < x1 <= source.Columns and 0 <= y0 < y1 <= source.Rows
        np.testing.assert_allclose(np.asarray(region.value, dtype=np.float64),
                                   [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], atol=1.2e-3, rtol=0)
        assert math.isclose(measurement.value, row["Score"], rel_tol=1e-9, abs_tol=1e-12)
