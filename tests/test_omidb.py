"""The OMI-DB adapter on a small synthetic copy in the sync tool's layout: data/<client>/imagedb_<client>.json with
the marks, a header JSON per image, images/<client>/<study>/<image>.dcm. Cached boxes sit on the bright lesions
drawn at the marks; not-synced studies and FOR PROCESSING images are left out; bad marks name file and line."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from comoto_cli.cache import SliceCache
from comoto_cli.config import PreprocessConfig
from comoto_cli.data.adapters.omidb import read_omidb
from comoto_cli.errors import InputDataError
from comoto_cli.preprocess.pipeline import preprocess
from tests.conftest import write_mammogram_dicom

HEIGHT, WIDTH = 64, 48
SMALL = {"image_height": HEIGHT, "image_width": WIDTH, "workers": 1, "dataset": "omidb",
         "split": {"val_fraction": 0.25, "test_fraction": 0.25}}


@dataclass
class Image:
    client: str
    study: str
    uid: str
    rows: int
    cols: int
    view: str
    marks: list[dict] = field(default_factory=list)
    intent: str = "FOR PRESENTATION"
    header: str = "model"  # "model": DICOM JSON model, "keywords": {"ViewPosition": ..}, ".dcm.json", "none"

    @property
    def path(self) -> str:
        return f"images/{self.client}/{self.study}/{self.uid}.dcm"


def _uid(*parts) -> str:
    return generate_uid(prefix="1.2.826.0.1.3680043.9.3218.1.1.", entropy_srcs=[str(p) for p in parts])


def _mark(mark_id: int, x1: int, y1: int, x2: int, y2: int, **flags) -> dict:
    return {"MarkID": mark_id, "X1": x1, "Y1": y1, "X2": x2, "Y2": y2, "Conspicuity": "Obvious",
            "LinkedNBSSLesionNumber": "1", **flags}


def _images() -> list[Image]:
    a, b = _uid("optm1", "study"), _uid("optm2", "study")
    return [
        Image("optm1", a, _uid("optm1", 1), 96, 64, "lcc", [_mark(1, 10, 20, 30, 44, Mass=1)]),
        Image("optm1", a, _uid("optm1", 2), 96, 64, "lmlo", [_mark(2, 30, 50, 50, 70, SuspiciousCalcifications=1)],
              header="keywords"),
        Image("optm1", a, _uid("optm1", 3), 96, 64, "rcc"),  # normal
        Image("optm1", a, _uid("optm1", 4), 96, 64, "lcc", intent="FOR PROCESSING"),
        Image("optm2", b, _uid("optm2", 1), 80, 60, "rmlo",
              [_mark(1, 5, 5, 20, 25, Mass=1, WithCalcification=1), _mark(2, 30, 40, 55, 70)], header=".dcm.json"),
        Image("optm2", b, _uid("optm2", 2), 80, 60, "rcc", [_mark(3, 12, 8, 40, 30, ArchitecturalDistortion=1)],
              header="none"),
        Image("optm3", _uid("optm3", "study"), _uid("optm3", 1), 90, 70, "lcc"),
        Image("optm3", _uid("optm3", "study"), _uid("optm3", 2), 90, 70, "lmlo", [_mark(1, 40, 40, 60, 60, Mass=1)]),
    ]


NOT_SYNCED = _uid("optm1", "study-not-synced")


def _header_json(image: Image) -> dict:
    if image.header == "keywords":
        return {"ViewPosition": image.view[1:].upper(), "ImageLaterality": image.view[0].upper(),
                "PresentationIntentType": image.intent, "Modality": "MG"}
    return {"00185101": {"vr": "CS", "Value": [image.view[1:].upper()]},
            "00200062": {"vr": "CS", "Value": [image.view[0].upper()]},
            "00080068": {"vr": "CS", "Value": [image.intent]}, "00080060": {"vr": "CS", "Value": ["MG"]}}


def make_omidb(root: Path) -> list[Image]:
    """The copy: three clients, an extra study listed in optm1's imagedb but not synced, pretty-printed JSON."""
    rng = np.random.default_rng(0)
    images = _images()
    listings: dict[str, dict] = {}
    for image in images:
        pixels = rng.integers(200, 600, (image.rows, image.cols))
        for mark in image.marks:
            pixels[mark["Y1"]:mark["Y2"], mark["X1"]:mark["X2"]] += 3000
        write_mammogram_dicom(root / image.path, pixels, patient=image.client, study=image.study,
                              view=image.view, intent=image.intent, uid=image.uid)
        if image.header != "none":
            name = f"{image.uid}.dcm.json" if image.header == ".dcm.json" else f"{image.uid}.json"
            folder = root / "data" / image.client / image.study
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(json.dumps(_header_json(image)))
        studies = listings.setdefault(image.client, {"Site": "jarvis", "STUDIES": {}})["STUDIES"]
        study = studies.setdefault(image.study, {"StudyDate": "20100101", "EpisodeID": "1"})
        series = study.setdefault(_uid(image.study, "series"), {})
        series[image.uid] = {str(m["MarkID"]): m for m in image.marks} if image.marks else {}
    listings["optm1"]["STUDIES"][NOT_SYNCED] = {"StudyDate": "20130101", _uid("x", "series"): {
        _uid("x", "image"): {"1": _mark(9, 1, 1, 5, 5, Mass=1)}}}
    for client, listing in listings.items():
        folder = root / "data" / client
        (folder / f"imagedb_{client}.json").write_text(json.dumps(listing, indent=2))
        (folder / f"nbss_{client}.json").write_text(json.dumps({"1": {"EpisodeType": "S"}}))
    return images


@pytest.fixture
def omidb(tmp_path) -> tuple[Path, list[Image]]:
    root = tmp_path / "omidb"
    return root, make_omidb(root)


def _kept(images: list[Image]) -> list[Image]:
    return [image for image in images if image.intent != "FOR PROCESSING"]


def test_records_keep_synced_presentation_images_with_their_marks(omidb):
    root, images = omidb
    records = read_omidb(root)
    by_source = {record.source: record for record in records}
    assert sorted(by_source) == sorted(image.path for image in _kept(images))
    for image in _kept(images):
        record = by_source[image.path]
        assert (record.patient_id, record.study_uid, record.view, record.split) == (image.client, image.study,
                                                                                   image.view, None)
        assert record.label == ("lesion" if image.marks else "normal")
        boxes = [(b.x, b.y, b.width, b.height) for b in record.boxes]
        assert boxes == [(m["X1"], m["Y1"], m["X2"] - m["X1"], m["Y2"] - m["Y1"]) for m in image.marks]
    classes = {record.source: [b.cls for b in record.boxes] for record in records}
    assert classes[images[4].path] == ["mass+calcification", "lesion"]
    assert classes[images[1].path] == ["calcification"] and classes[images[5].path] == ["distortion"]


def test_cache_boxes_sit_on_the_lesions(omidb, tmp_path):
    root, images = omidb
    report = preprocess(root, tmp_path / "omidb.h5", PreprocessConfig(modality="mammo", **SMALL), progress=False)
    assert report["skipped"] == [] and report["volumes"] == len(_kept(images))
    cache = SliceCache(tmp_path / "omidb.h5")
    marked = 0
    for index, source in enumerate(cache.volumes["source"]):
        image = next(i for i in images if i.path == source)
        (row,) = range(cache.volume_slice_rows(index).start, cache.volume_slice_rows(index).stop)
        pixels, boxes = cache.image(row), cache.boxes(row)
        assert len(boxes) == len(image.marks)
        scale = np.array([WIDTH / image.cols, HEIGHT / image.rows] * 2)
        expected = np.array([[m["X1"], m["Y1"], m["X2"], m["Y2"]] for m in image.marks]).reshape(-1, 4) * scale
        order = np.lexsort((expected[:, 1], expected[:, 0]))
        np.testing.assert_allclose(boxes[np.lexsort((boxes[:, 1], boxes[:, 0]))], expected[order], atol=1e-4)
        background = pixels.copy()
        for x0, y0, x1, y1 in boxes:
            inner = pixels[int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1]
            background[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = np.nan
            # The lesion was drawn 3000 above a 200-600 background: inside the box is bright.
            assert inner.size and inner.min() > 0.5
            marked += 1
        if len(boxes):  # outside every box: the dim background (a normal image is windowed on its noise alone)
            assert np.nanmax(background) < 0.5
    assert marked == sum(len(image.marks) for image in _kept(images))
    assert preprocess(root, tmp_path / "omidb.h5", PreprocessConfig(modality="mammo", **SMALL),
                      progress=False)["up_to_date"]
    # A header JSON rewritten (the view of an image corrected): an input change, rebuilt with the new view.
    header = root / "data" / images[0].client / images[0].study / f"{images[0].uid}.json"
    document = json.loads(header.read_text())
    document["00185101"]["Value"] = ["MLO"]
    header.write_text(json.dumps(document))
    assert not preprocess(root, tmp_path / "omidb.h5", PreprocessConfig(modality="mammo", **SMALL),
                          progress=False)["up_to_date"]
    cache = SliceCache(tmp_path / "omidb.h5")
    assert cache.volumes["view"][list(cache.volumes["source"]).index(images[0].path)] == "lmlo"


def _listing(root: Path, client: str) -> Path:
    return root / "data" / client / f"imagedb_{client}.json"


def _line_of(path: Path, key: str) -> int:
    return next(number for number, line in enumerate(path.read_text().splitlines(), 1) if f'"{key}"' in line)


def _edit_mark(root: Path, image: Image, **changes) -> Path:
    listing = _listing(root, image.client)
    document = json.loads(listing.read_text())
    series = document["STUDIES"][image.study][_uid(image.study, "series")]
    next(iter(series[image.uid].values())).update(changes)
    listing.write_text(json.dumps(document, indent=2))
    return listing


def _dicom_missing(root: Path, images: list[Image]) -> tuple[Path, Image, str]:
    (root / images[2].path).unlink()
    return _listing(root, "optm1"), images[2], "DICOM file not found"


BAD = {
    "inverted-mark": lambda root, images: (_edit_mark(root, images[0], X2=5), images[0], "mark 1 is not a box"),
    "mark-without-corner": lambda root, images: (_edit_mark(root, images[4], Y2=None), images[4], "not a number"),
    "dicom-missing": _dicom_missing,
    "mark-outside-image": lambda root, images: (_edit_mark(root, images[7], X2=500), images[7], "outside"),
}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    from comoto_cli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return int(exit_info.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_mark_is_one_line_naming_file_and_line_or_is_skipped(case, omidb, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COMOTO_DEBUG", raising=False)
    root, images = omidb
    listing, bad, needle = BAD[case](root, images)
    out = tmp_path / "out" / "omidb.h5"
    argv = ["preprocess", "mammo", str(root), "--dataset", "omidb", "--out", str(out), "--image-height",
            str(HEIGHT), "--image-width", str(WIDTH), "--workers", "1"]
    code, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    for expected in (str(listing), f"row {_line_of(listing, bad.uid)}", needle):
        assert expected in lines[0], f"{expected!r} not in {lines[0]!r}"
    assert not out.exists()
    code, err = _run(argv + ["--on-error", "skip"], capsys)
    assert code == 0, err
    cache = SliceCache(out)
    assert sorted(cache.volumes["source"]) == sorted(i.path for i in _kept(images) if i is not bad)


def test_not_an_omidb_copy_is_one_clear_error(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(InputDataError, match="expected its data/ and images/ folders"):
        read_omidb(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "data" / "optm9").mkdir()
    with pytest.raises(InputDataError, match="without its imagedb_optm9.json"):
        read_omidb(tmp_path)
    (tmp_path / "data" / "optm9" / "imagedb_optm9.json").write_text("{\"STUDIES\": [")
    with pytest.raises(InputDataError, match="imagedb_optm9.json: not an OMI-DB imagedb file"):
        read_omidb(tmp_path)
