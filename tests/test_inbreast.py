"""The INbreast adapter on a small synthetic copy of the release: AllDICOMs/<id>_<patient>_MG_<side>_<view>_ANON.dcm
and AllXML/<id>.xml (OsiriX plists with Point_px outlines). Cached boxes sit on the bright regions drawn inside the
outlines; single calcifications and landmarks are left out; bad regions name the XML and line."""

from __future__ import annotations

import plistlib
from pathlib import Path

import numpy as np
import pytest

from comoto_cli.cache import SliceCache
from comoto_cli.config import PreprocessConfig
from comoto_cli.data.adapters.inbreast import read_inbreast
from comoto_cli.errors import InputDataError
from comoto_cli.preprocess.pipeline import preprocess
from tests.conftest import write_mammogram_dicom

HEIGHT, WIDTH = 64, 48
SMALL = {"image_height": HEIGHT, "image_width": WIDTH, "workers": 1, "dataset": "inbreast",
         "split": {"val_fraction": 0.25, "test_fraction": 0.25}}


def _outline(cx: float, cy: float, rx: float, ry: float, count: int = 12) -> list[tuple[float, float]]:
    angles = np.linspace(0, 2 * np.pi, count, endpoint=False)
    return [(round(cx + rx * np.cos(a), 3), round(cy + ry * np.sin(a), 3)) for a in angles]


# file id -> (patient, side, view, rows, cols, [(name, outline points)])
IMAGES = {
    "20586908": ("6c613a14b80a8591", "R", "CC", 96, 64, [
        ("Mass", _outline(30, 40, 10, 8)), ("Calcification", [(50.5, 80.5)]),
        ("Calcification", [(10.2, 85.1), (11.0, 86.0)]), ("Cluster", _outline(45, 75, 6, 5))]),
    "20586934": ("6c613a14b80a8591", "R", "MLO", 96, 64, []),  # no XML: a normal image
    "22614074": ("0b1ae2ea7ffd4a65", "L", "MLO", 80, 60, [
        ("Spiculated Region", _outline(20, 20, 7, 9)), ("Assymetry", _outline(40, 55, 9, 6)), ("Point 1", [(3, 3)])]),
    "22614097": ("0b1ae2ea7ffd4a65", "L", "CC", 80, 60, [("Nodule", _outline(30, 30, 8, 8))]),
}
KEPT_CLASSES = {"20586908": ["mass", "calcification-cluster"], "20586934": [],
                "22614074": ["spiculated-region", "asymmetry"], "22614097": ["nodule"]}


def _dicom_name(file_id: str) -> str:
    patient, side, view = IMAGES[file_id][:3]
    return f"{file_id}_{patient}_MG_{side}_{view}_ANON.dcm"


def _roi(index: int, name: str, points: list[tuple[float, float]]) -> dict:
    xs, ys = [p[0] for p in points] or [0.0], [p[1] for p in points] or [0.0]
    return {"Area": 0.0, "Center": f"({np.mean(xs):.6f}, {np.mean(ys):.6f}, 0.000000)", "Dev": 0.0,
            "IndexInImage": index, "Max": 0.0, "Mean": 0.0, "Min": 0.0, "Name": name,
            "NumberOfPoints": len(points), "Point_mm": [f"({x * 0.07:.6f}, {y * 0.07:.6f}, 0.000000)" for x, y in points],
            "Point_px": [f"({x:.6f}, {y:.6f})" for x, y in points], "Total": 0.0, "Type": 15 if len(points) > 1 else 19}


def write_xml(path: Path, regions: list[tuple[str, list]]) -> None:
    document = {"Images": [{"ImageIndex": 0, "NumberOfROIs": len(regions),
                            "ROIs": [_roi(i, name, points) for i, (name, points) in enumerate(regions)]}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(plistlib.dumps(document, fmt=plistlib.FMT_XML))


def make_inbreast(root: Path) -> None:
    rng = np.random.default_rng(0)
    for file_id, (patient, side, view, rows, cols, regions) in IMAGES.items():
        pixels = rng.integers(200, 600, (rows, cols))
        for _name, points in regions:
            if len(points) > 2:
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                pixels[int(np.ceil(min(ys))):int(max(ys)), int(np.ceil(min(xs))):int(max(xs))] += 3000
        write_mammogram_dicom(root / "AllDICOMs" / _dicom_name(file_id), pixels, patient=patient,
                              study=f"1.2.3.{file_id}", view=(side + view).lower())
        if regions:
            write_xml(root / "AllXML" / f"{file_id}.xml", regions)


@pytest.fixture
def inbreast(tmp_path) -> Path:
    root = tmp_path / "INbreast Release 1.0"
    make_inbreast(root)
    return root


def _kept_boxes(regions) -> list[tuple[float, float, float, float]]:
    boxes = []
    for name, points in regions:
        if name in ("Calcification", "Point 1"):
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        boxes.append((min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)))
    return boxes


def test_records_have_the_outlines_bounding_boxes(inbreast):
    records = {record.source: record for record in read_inbreast(inbreast)}
    assert sorted(records) == sorted(f"AllDICOMs/{_dicom_name(i)}" for i in IMAGES)
    for file_id, (patient, side, view, _, _, regions) in IMAGES.items():
        record = records[f"AllDICOMs/{_dicom_name(file_id)}"]
        assert (record.patient_id, record.view, record.split) == (patient, (side + view).lower(), None)
        assert record.label == ("lesion" if KEPT_CLASSES[file_id] else "normal")
        assert [b.cls for b in record.boxes] == KEPT_CLASSES[file_id]
        np.testing.assert_allclose(np.array([(b.x, b.y, b.width, b.height) for b in record.boxes]).reshape(-1, 4),
                                   np.array(_kept_boxes(regions)).reshape(-1, 4), atol=1e-9)


def test_cache_boxes_sit_on_the_lesions_and_an_added_xml_rebuilds(inbreast, tmp_path):
    out = tmp_path / "inbreast.h5"
    config = PreprocessConfig(modality="mammo", **SMALL)
    report = preprocess(inbreast, out, config, progress=False)
    assert report["skipped"] == [] and report["volumes"] == len(IMAGES)
    cache = SliceCache(out)
    for index, source in enumerate(cache.volumes["source"]):
        file_id = Path(source).name.split("_")[0]
        (row,) = range(cache.volume_slice_rows(index).start, cache.volume_slice_rows(index).stop)
        pixels, boxes = cache.image(row), cache.boxes(row)
        assert len(boxes) == len(KEPT_CLASSES[file_id])
        for x0, y0, x1, y1 in boxes:  # the bright region was drawn inside each outline's box
            inner = pixels[int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1]
            assert inner.size and inner.mean() > 0.6
            outside = np.ones(pixels.shape, bool)
            outside[max(int(y0) - 1, 0):int(np.ceil(y1)) + 1, max(int(x0) - 1, 0):int(np.ceil(x1)) + 1] = False
        if len(boxes) == 1:
            assert pixels[outside].mean() < 0.3
    assert preprocess(inbreast, out, config, progress=False)["up_to_date"]
    # Annotating the normal image (its XML did not exist) is an input change: the cache is rebuilt with the box.
    write_xml(inbreast / "AllXML" / "20586934.xml", [("Mass", _outline(30, 30, 6, 6))])
    assert not preprocess(inbreast, out, config, progress=False)["up_to_date"]
    cache = SliceCache(out)
    index = next(i for i, s in enumerate(cache.volumes["source"]) if "20586934" in s)
    assert list(cache.lesions["class"][cache.lesions["volume"] == index]) == ["mass"]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    from comoto_cli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return int(exit_info.value.code or 0), capsys.readouterr().err


def _region_line(path: Path, region: int) -> int:
    """The line the region's <dict> opens on (the dictionaries after the ROIs key, in order)."""
    lines = path.read_text().splitlines()
    after = next(n for n, line in enumerate(lines, 1) if "<key>ROIs</key>" in line)
    return [n for n, line in enumerate(lines, 1) if n > after and line.strip() == "<dict>"][region]


def _flat_mass(root: Path) -> tuple[Path, str | None, str, str]:
    xml = root / "AllXML" / "22614097.xml"
    write_xml(xml, [("Nodule", [(10, 10), (20, 10)])])
    return xml, f"row {_region_line(xml, 0)}", "outlines no area", "22614097"


def _orphan_xml(root: Path) -> tuple[Path, str | None, str, str | None]:
    xml = root / "AllXML" / "99999999.xml"
    write_xml(xml, [("Mass", _outline(10, 10, 3, 3))])
    return xml, None, "no image in AllDICOMs/ has the file id 99999999", None


def _broken_xml(root: Path) -> tuple[Path, str | None, str, str | None]:
    xml = root / "AllXML" / "22614074.xml"
    xml.write_text(xml.read_text()[:200])
    return xml, "row 1", "not an OsiriX plist", "22614074"


def _region_without_outline(root: Path) -> tuple[Path, str | None, str, str | None]:
    xml = root / "AllXML" / "20586908.xml"
    write_xml(xml, [("Mass", _outline(30, 40, 10, 8)), ("Cluster", []), ("Mass", _outline(20, 20, 5, 5))])
    return xml, f"row {_region_line(xml, 1)}", "region 2 (Cluster) has no outline", "20586908"


def _malformed_point(root: Path) -> tuple[Path, str | None, str, str | None]:
    xml = root / "AllXML" / "22614074.xml"
    write_xml(xml, [("Mass", [(1, 1), (5, 5)])])
    xml.write_text(xml.read_text().replace("(1.000000, 1.000000)", "(1..0, 1.0)"))
    return xml, f"row {_region_line(xml, 0)}", "region 1 (Mass) has no outline", "22614074"


@pytest.mark.parametrize("make_bad", [_flat_mass, _orphan_xml, _broken_xml, _region_without_outline,
                                      _malformed_point])
def test_a_bad_annotation_is_one_line_naming_the_xml_or_is_skipped(make_bad, inbreast, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COMOTO_DEBUG", raising=False)
    xml, where, needle, left_out = make_bad(inbreast)
    out = tmp_path / "out" / "inbreast.h5"
    argv = ["preprocess", "mammo", str(inbreast), "--dataset", "inbreast", "--out", str(out), "--image-height",
            str(HEIGHT), "--image-width", str(WIDTH), "--workers", "1"]
    code, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    for expected in (str(xml), needle, *([where] if where else [])):
        assert expected in lines[0], f"{expected!r} not in {lines[0]!r}"
    assert not out.exists()
    code, err = _run(argv + ["--on-error", "skip"], capsys)
    assert code == 0, err
    kept = {Path(source).name.split("_")[0] for source in SliceCache(out).volumes["source"]}
    assert kept == set(IMAGES) - {left_out}


def test_not_an_inbreast_folder_is_one_clear_error(tmp_path):
    with pytest.raises(InputDataError, match="expected its AllDICOMs/"):
        read_inbreast(tmp_path)
    (tmp_path / "AllDICOMs").mkdir()
    (tmp_path / "AllDICOMs" / "scan.dcm").write_bytes(b"")
    with pytest.raises(InputDataError, match="not named as INbreast names its images"):
        read_inbreast(tmp_path)
