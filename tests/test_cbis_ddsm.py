"""The CBIS-DDSM adapter on a small synthetic copy of the TCIA release: the four description CSVs, full mammograms
and ROI mask / cropped image DICOMs in the download's folder tree, whose file names are not the CSVs' (and swap
between mask and crop). Boxes in the cache are the masks' bounding boxes; splits, classes; bad rows through the CLI."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from comoto_cli.cache import SliceCache
from comoto_cli.config import PreprocessConfig
from comoto_cli.data.adapters import adapter_for
from comoto_cli.data.adapters.cbis_ddsm import component_boxes, read_cbis_ddsm
from comoto_cli.data.tables import CBIS_DDSM_CALC_COLUMNS, CBIS_DDSM_CSV_NAMES, CBIS_DDSM_MASS_COLUMNS
from comoto_cli.errors import InputDataError
from comoto_cli.preprocess.pipeline import preprocess

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # how CBIS-DDSM stores every image, with Modality MG
HEIGHT, WIDTH = 64, 48
SMALL = {"image_height": HEIGHT, "image_width": WIDTH, "workers": 1,
         "split": {"val_fraction": 0.25, "test_fraction": 0.25}}
MASS_TRAIN, MASS_TEST, CALC_TRAIN, CALC_TEST = CBIS_DDSM_CSV_NAMES


# ---------------------------------------------------------------------------------------------- the fixture
def _rect(rows, cols, y0, y1, x0, x1):
    mask = np.zeros((rows, cols), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return mask


def _disk(rows, cols, cy, cx, radius):
    yy, xx = np.mgrid[0:rows, 0:cols]
    return np.where((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2, 255, 0).astype(np.uint8)


# subject -> (rows, cols, [(abnormality id, pathology, mask maker, ROI layout)]); layout "one": mask and crop in one
# series folder (1-1.dcm the crop, 1-2.dcm the mask), "two": a series folder each (both 1-1.dcm), "one-swapped":
# one folder, 1-1.dcm the mask.
IMAGES = {
    "Mass-Training_P_00001_LEFT_CC": (96, 64, [
        (1, "MALIGNANT", lambda r, c: _rect(r, c, 10, 31, 5, 26), "one"),
        (2, "BENIGN", lambda r, c: _disk(r, c, 60, 40, 9), "two")]),
    "Mass-Training_P_00002_RIGHT_MLO": (80, 60, [
        (1, "BENIGN_WITHOUT_CALLBACK", lambda r, c: _rect(r, c, 40, 52, 30, 58), "one-swapped")]),
    "Mass-Training_P_00006_LEFT_MLO": (70, 50, [(1, "BENIGN", lambda r, c: _disk(r, c, 20, 20, 6), "one")]),
    "Mass-Test_P_00003_LEFT_MLO": (90, 70, [(1, "MALIGNANT", lambda r, c: _rect(r, c, 0, 15, 50, 70), "two")]),
    "Calc-Training_P_00001_LEFT_CC": (96, 64, [(1, "MALIGNANT", lambda r, c: _rect(r, c, 70, 90, 2, 12), "one")]),
    # a mask in two parts, touching nothing (two boxes), one of them holding a diagonal step (one region)
    "Calc-Training_P_00004_RIGHT_CC": (100, 72, [
        (1, "BENIGN", lambda r, c: _rect(r, c, 10, 20, 10, 20) | _rect(r, c, 20, 30, 20, 30)
         | _rect(r, c, 60, 70, 40, 60), "one")]),
    "Calc-Test_P_00005_LEFT_CC": (84, 60, [(1, "MALIGNANT", lambda r, c: _disk(r, c, 42, 30, 4), "two")]),
}


@dataclass
class Abnormality:
    csv: str
    record: int  # its record in the CSV, the header being record 1
    row: int  # the row errors name: csvio's row number, the line its record ends on (the ROI cells hold a newline)
    cls: str
    mask: np.ndarray
    mask_file: Path
    crop_file: Path
    folder: Path  # the abnormality's subject folder


@dataclass
class Image:
    subject: str
    rows: int
    cols: int
    full_file: Path
    abnormalities: list[Abnormality] = field(default_factory=list)

    @property
    def split(self) -> str:
        return "test" if "-Test_" in self.subject else "train"


def write_dicom(path: Path, pixels: np.ndarray, subject: str) -> None:
    """A CBIS-DDSM-like DICOM: Secondary Capture, Modality MG, MONOCHROME2, 8- or 16-bit."""
    uid = generate_uid(entropy_srcs=[str(path)])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE, uid
    ds.Modality, ds.PatientID = "MG", subject
    ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(path.parent)])
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8 * pixels.dtype.itemsize
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _uid(*parts) -> str:
    """A UID-like folder name as the release's paths have (stable: from the parts)."""
    return "1.3.6.1.4.1.9590.100.1.2." + str(int(hashlib.sha256("/".join(parts).encode()).hexdigest()[:24], 16))


def make_cbis(root: Path, *, layout: str = "tcia") -> dict[str, Image]:
    """The CBIS-DDSM release in miniature under ``root``. ``layout`` "tcia": the NBIA download's descriptive
    folders and 1-1.dcm / 1-2.dcm files; "classic": the CSVs' own paths (UID folders, 000000.dcm), with the mask
    and the crop swapped where the ROI layout says so."""
    rng = np.random.default_rng(0)
    images: dict[str, Image] = {}
    tables: dict[str, list[list[str]]] = {name: [] for name in CBIS_DDSM_CSV_NAMES}
    base = root / "CBIS-DDSM"
    for subject, (rows, cols, abnormalities) in IMAGES.items():
        kind, release = subject.split("_")[0].split("-")
        table = CBIS_DDSM_CSV_NAMES[(kind == "Calc") * 2 + (release == "Test")]
        image_cell = f"{subject}/{_uid(subject, 's')}/{_uid(subject, 'e')}/000000.dcm"
        if layout == "classic":
            full = base / image_cell
        else:
            full = base / subject / "07-20-2016-DDSM-NA-74994" / "1.000000-full mammogram images-24515" / "1-1.dcm"
        write_dicom(full, rng.integers(0, 4096, (rows, cols)).astype(np.uint16), subject)
        image = images[subject] = Image(subject, rows, cols, full)
        for number, pathology, make_mask, roi in abnormalities:
            folder = f"{subject}_{number}"
            study = _uid(folder, "s")
            crop_cell = f"{folder}/{study}/{_uid(folder, 'c')}/000000.dcm"
            mask_cell = f"{folder}/{study}/{_uid(folder, 'm')}/000001.dcm\n"  # the release's cells end in \n
            if layout == "classic":
                mask_file, crop_file = base / mask_cell.strip(), base / crop_cell
                if roi == "one-swapped":
                    mask_file, crop_file = crop_file, mask_file
            else:
                series = base / folder / "08-30-2017-DDSM-NA-96009"
                one = series / "1.000000-ROI mask images-83013"
                mask_file, crop_file = {
                    "one": (one / "1-2.dcm", one / "1-1.dcm"),
                    "one-swapped": (one / "1-1.dcm", one / "1-2.dcm"),
                    "two": (series / "1.000000-ROI mask images-94682" / "1-1.dcm",
                            series / "1.000000-cropped images-56512" / "1-1.dcm"),
                }[roi]
            mask = make_mask(rows, cols)
            write_dicom(mask_file, mask, subject)
            write_dicom(crop_file, rng.integers(0, 4096, (18, 14)).astype(np.uint16), subject)
            patient, side, view = subject.split("_", 1)[1].rsplit("_", 2)
            lesion = "mass" if kind == "Mass" else "calcification"
            details = ["IRREGULAR", "SPICULATED"] if kind == "Mass" else ["PLEOMORPHIC", "CLUSTERED"]
            tables[table].append([patient, "3", side, view, str(number), lesion, *details, "4", pathology, "4",
                                  image_cell, crop_cell, mask_cell])
            image.abnormalities.append(Abnormality(table, len(tables[table]) + 1, 0, f"{lesion}-{pathology}",
                                                   mask, mask_file, crop_file, base / folder))
    for name, rows in tables.items():
        header = CBIS_DDSM_MASS_COLUMNS if name.startswith("mass") else CBIS_DDSM_CALC_COLUMNS
        write_csv(root / name, [list(header), *rows])
    for abnormality in (a for image in images.values() for a in image.abnormalities):
        abnormality.row = line_of(root / abnormality.csv, abnormality.record)
    return images


def write_csv(path: Path, rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")


def line_of(path: Path, record: int) -> int:
    """The line CSV record ``record`` (header = 1) starts on: the row number of the error messages (the release's
    ROI-mask cells end in a quoted newline, so records span two lines)."""
    reader = csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline=""))
    for _ in range(record - 1):
        next(reader)
    return reader.line_num + 1


def edit_cell(path: Path, record: int, column: str, value: str) -> None:
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    rows[record - 1][rows[0].index(column)] = value
    write_csv(path, rows)


def reference_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes of the 8-connected nonzero regions by flood fill, pixel by pixel (for comparison)."""
    seen = np.zeros(mask.shape, bool)
    boxes = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, ys, xs = deque([start]), [], []
        while queue:
            y, x = queue.popleft()
            ys.append(y)
            xs.append(x)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        boxes.append((min(xs), min(ys), max(xs) + 1, max(ys) + 1))
    return sorted(boxes, key=lambda box: (box[1], box[0], box[3], box[2]))


def expected_boxes(image: Image) -> list[tuple[tuple[int, int, int, int], str]]:
    return [(box, a.cls) for a in image.abnormalities for box in reference_boxes(a.mask)]


@pytest.fixture
def cbis(tmp_path) -> tuple[Path, dict[str, Image]]:
    root = tmp_path / "cbis"
    return root, make_cbis(root)


# ---------------------------------------------------------------------------------------------- boxes
@pytest.mark.parametrize("seed", range(6))
def test_component_boxes_are_the_8_connected_regions(seed):
    rng = np.random.default_rng(seed)
    mask = (rng.random((23, 31)) < [0.05, 0.2, 0.45, 0.6, 0.3, 0.1][seed]).astype(np.uint8) * rng.integers(1, 9)
    assert component_boxes(mask) == reference_boxes(mask)
    assert component_boxes(np.zeros((4, 5))) == []
    assert component_boxes(np.ones((4, 5))) == [(0, 0, 5, 4)]
    diagonal = np.eye(6, dtype=bool)  # touching by corners only: one region
    assert component_boxes(diagonal) == [(0, 0, 6, 6)]


# ---------------------------------------------------------------------------------------------- records
@pytest.mark.parametrize("layout", ["tcia", "classic"])
def test_records_find_full_images_and_masks_by_folder_and_content(tmp_path, layout):
    root = tmp_path / "cbis"
    images = make_cbis(root, layout=layout)
    records = read_cbis_ddsm(root)
    assert sorted(r.study_uid for r in records) == sorted(images)
    for record in records:
        image = images[record.study_uid]
        assert record.path == image.full_file.resolve()
        assert record.source == image.full_file.relative_to(root).as_posix()
        patient, side, view = image.subject.split("_", 1)[1].rsplit("_", 2)
        assert (record.patient_id, record.view, record.split, record.label) == (
            patient, side[0].lower() + view.lower(), image.split, "lesion")
        got = [((b.x, b.y, b.x + b.width, b.y + b.height), b.cls) for b in record.boxes]
        assert got == expected_boxes(image)
        assert [(b.csv.name, b.row) for b in record.boxes] == [
            (a.csv, a.row) for a in image.abnormalities for _ in reference_boxes(a.mask)]
    assert len(images["Calc-Training_P_00004_RIGHT_CC"].abnormalities) == 1
    assert len(next(r for r in records if r.study_uid == "Calc-Training_P_00004_RIGHT_CC").boxes) == 2
    assert read_cbis_ddsm(root, threads=3) == records  # the masks read on threads: the same records, in order


# ---------------------------------------------------------------------------------------------- the cache
def test_cache_boxes_are_the_mask_bounding_boxes_with_the_release_split(cbis, tmp_path):
    root, images = cbis
    config = PreprocessConfig(modality="mammo", dataset="cbis-ddsm", **SMALL)
    report = preprocess(root, tmp_path / "cbis.h5", config, progress=False)
    assert report["skipped"] == [] and report["volumes"] == len(images)
    cache = SliceCache(tmp_path / "cbis.h5")
    volumes = cache.volumes
    assert sorted(volumes["study_uid"]) == sorted(images)
    for index, subject in enumerate(volumes["study_uid"]):
        image = images[subject]
        split = volumes["split"][index]
        assert (split == "test") if image.split == "test" else (split in ("train", "val"))
        assert (volumes["original_height"][index], volumes["original_width"][index]) == (image.rows, image.cols)
        assert volumes["label"][index] == "lesion"
        # the cache's lesion order: by position (x, then y, then size)
        expected = sorted(expected_boxes(image), key=lambda e: (e[0][0], e[0][1], e[0][2] - e[0][0], e[0][3] - e[0][1]))
        lesions = np.flatnonzero(cache.lesions["volume"] == index)
        assert [str(c) for c in cache.lesions["class"][lesions]] == [cls for _, cls in expected]
        official = np.stack([cache.lesions[k][lesions] for k in ("x", "y", "width", "height")], axis=1)
        boxes = np.array([box for box, _ in expected], dtype=np.float64)
        assert np.array_equal(official, np.column_stack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]]))
        (row,) = range(cache.volume_slice_rows(index).start, cache.volume_slice_rows(index).stop)
        scale = np.array([WIDTH / image.cols, HEIGHT / image.rows] * 2)
        np.testing.assert_allclose(cache.boxes(row), boxes * scale, rtol=0, atol=1e-4)
    # The release's test patients are the cache's test patients; val is carved from its training patients.
    assert set(volumes["patient_id"][volumes["split"] == "test"]) == {"P_00003", "P_00005"}
    assert set(volumes["patient_id"][volumes["split"] == "val"]) and set(volumes["patient_id"][volumes["split"] == "train"])
    assert json.loads(cache.attrs["config_json"])["dataset"] == "cbis-ddsm"
    # Unchanged inputs: up to date. A pathology edited in a CSV: rebuilt, with the new class.
    assert preprocess(root, tmp_path / "cbis.h5", config, progress=False)["up_to_date"]
    edit_cell(root / MASS_TEST, 2, "pathology", "BENIGN")
    assert not preprocess(root, tmp_path / "cbis.h5", config, progress=False)["up_to_date"]
    cache = SliceCache(tmp_path / "cbis.h5")
    index = list(cache.volumes["study_uid"]).index("Mass-Test_P_00003_LEFT_MLO")
    assert list(cache.lesions["class"][cache.lesions["volume"] == index]) == ["mass-BENIGN"]
    # A ROI mask replaced by another (the same boxes here; what counts is that the file changed): rebuilt.
    assert preprocess(root, tmp_path / "cbis.h5", config, progress=False)["up_to_date"]
    mask = images["Mass-Test_P_00003_LEFT_MLO"].abnormalities[0].mask_file
    mask.write_bytes(mask.read_bytes() + b"\0\0")
    assert not preprocess(root, tmp_path / "cbis.h5", config, progress=False)["up_to_date"]


def test_csvs_given_as_inputs_are_the_only_ones_read_and_are_fingerprinted(cbis, tmp_path):
    root, images = cbis
    elsewhere = tmp_path / "tables"
    elsewhere.mkdir()
    for name in CBIS_DDSM_CSV_NAMES:
        shutil.move(root / name, elsewhere / name)
    config = PreprocessConfig(modality="mammo", dataset="cbis-ddsm", inputs=[f"calc-test={elsewhere / CALC_TEST}",
                              f"mass-train={elsewhere / MASS_TRAIN}"], **SMALL)
    adapter = adapter_for(config)
    assert adapter.input_files(config) == [elsewhere / MASS_TRAIN, elsewhere / CALC_TEST]
    records = adapter.discover(root, config, None)
    assert sorted(r.study_uid for r in records) == sorted(s for s in images if s.startswith(("Mass-Training",
                                                                                              "Calc-Test")))
    with pytest.raises(InputDataError) as info:  # nothing under ROOT has the columns now
        read_cbis_ddsm(root)
    assert "no CSV file with the columns" in str(info.value) and "--input mass-train=F" in str(info.value)


# ---------------------------------------------------------------------------------------------- bad input
def _argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["preprocess", "mammo", str(root), "--out", str(out), "--dataset", "cbis-ddsm", "--image-height",
            str(HEIGHT), "--image-width", str(WIDTH), "--workers", "1", "--no-progress", *extra]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    from comoto_cli.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


def _abnormality(images, subject: str, index: int = 0) -> Abnormality:
    return images[subject].abnormalities[index]


def _missing_mask(root, images):
    a = _abnormality(images, "Mass-Training_P_00002_RIGHT_MLO")
    a.mask_file.unlink()  # the crop stays: it is not the mask
    return a, ["no ROI mask of the full image's size (80 x 60", "1-2.dcm is 18 x 14"]


def _missing_roi_folder(root, images):
    a = _abnormality(images, "Calc-Test_P_00005_LEFT_CC")
    shutil.rmtree(a.folder)
    return a, ["ROI mask folder Calc-Test_P_00005_LEFT_CC_1 not found"]


def _mask_of_another_size(root, images):
    a = _abnormality(images, "Mass-Training_P_00001_LEFT_CC", 1)
    write_dicom(a.mask_file, a.mask[:88], "Mass-Training_P_00001_LEFT_CC")
    return a, ["no ROI mask of the full image's size (96 x 64", "is 88 x 64"]


def _mask_not_binary(root, images):
    a = _abnormality(images, "Mass-Test_P_00003_LEFT_MLO")
    write_dicom(a.mask_file, a.mask // 255 * np.arange(90, dtype=np.uint8)[:, None], "Mass-Test_P_00003_LEFT_MLO")
    return a, ["not binary"]


def _mask_empty(root, images):
    a = _abnormality(images, "Mass-Test_P_00003_LEFT_MLO")
    write_dicom(a.mask_file, np.zeros_like(a.mask), "Mass-Test_P_00003_LEFT_MLO")
    return a, ["is empty"]


def _missing_full_image(root, images):
    images["Calc-Training_P_00004_RIGHT_CC"].full_file.unlink()
    return _abnormality(images, "Calc-Training_P_00004_RIGHT_CC"), ["no DICOM file under", "Calc-Training_P_00004"]


def _cell_case(subject: str, column: str, value: str, *needles: str):
    def build(root, images):
        a = _abnormality(images, subject)
        edit_cell(root / a.csv, a.record, column, value)
        return a, list(needles)
    return build


def _duplicate_row(root, images):
    a = _abnormality(images, "Mass-Training_P_00006_LEFT_MLO")
    rows = list(csv.reader(io.StringIO((root / a.csv).read_text(encoding="utf-8"), newline="")))
    write_csv(root / a.csv, [*rows, rows[a.record - 1]])
    a.row = line_of(root / a.csv, len(rows) + 1)  # the second listing is the bad row
    return a, ["abnormality 1 of Mass-Training_P_00006_LEFT_MLO is listed twice"]


BAD = {
    "missing-mask": _missing_mask,
    "missing-roi-folder": _missing_roi_folder,
    "mask-of-another-size": _mask_of_another_size,
    "mask-not-binary": _mask_not_binary,
    "mask-empty": _mask_empty,
    "missing-full-image": _missing_full_image,
    "bad-pathology": _cell_case("Mass-Training_P_00002_RIGHT_MLO", "pathology", "MALIGNANTT",
                                "pathology 'MALIGNANTT' is not one of"),
    "bad-abnormality-id": _cell_case("Calc-Test_P_00005_LEFT_CC", "abnormality id", "one",
                                     "'abnormality id' is not a number"),
    "bad-laterality": _cell_case("Mass-Test_P_00003_LEFT_MLO", "left or right breast", "RIGHT",
                                 "left or right breast 'RIGHT' does not match"),
    "bad-abnormality-type": _cell_case("Calc-Test_P_00005_LEFT_CC", "abnormality type", "mass",
                                       "abnormality type 'mass' in a Calc folder"),
    "bad-image-path": _cell_case("Mass-Test_P_00003_LEFT_MLO", "image file path", "../../etc/passwd",
                                 "does not start with a subject folder"),
    "duplicate-row": _duplicate_row,
}


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_report_the_first_bad_row_as_one_thread_does(cbis, threads):
    root, images = cbis
    for case in ("mask-of-another-size", "missing-mask", "missing-full-image"):  # in three images
        BAD[case](root, images)
    with pytest.raises(InputDataError) as info:
        read_cbis_ddsm(root, threads=threads)
    assert f"{CALC_TRAIN}, row 4: no DICOM file under" in str(info.value)  # CSVs in name order; a record starts on line 2k
    skipped: list[dict] = []
    kept = read_cbis_ddsm(root, threads=threads, skipped=skipped)
    assert sorted(r.study_uid for r in kept) == sorted(set(images) - {
        "Mass-Training_P_00001_LEFT_CC", "Mass-Training_P_00002_RIGHT_MLO", "Calc-Training_P_00004_RIGHT_CC"})
    assert [(Path(s["path"]).name, s["row"]) for s in skipped] == [(CALC_TRAIN, 4), (MASS_TRAIN, 4), (MASS_TRAIN, 6)]


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_row_is_one_line_naming_file_and_row_or_is_skipped(case, cbis, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COMOTO_DEBUG", raising=False)
    root, images = cbis
    bad, needles = BAD[case](root, images)
    out = tmp_path / "out" / "cbis.h5"
    code, err = _run(_argv(root, out), capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    for needle in [bad.csv, f"row {bad.row}", *needles]:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert not out.exists()
    # --on-error skip: the image of the bad row is left out, with every box of it; the others are cached.
    code, err = _run(_argv(root, out, "--on-error", "skip"), capsys)
    assert code == 0, err
    cache = SliceCache(out)
    left_out = bad.folder.name.rsplit("_", 1)[0]
    assert sorted(cache.volumes["study_uid"]) == sorted(set(images) - {left_out})
    assert [(Path(s["path"]).name, s["row"]) for s in cache.skipped] == [(bad.csv, bad.row)]
