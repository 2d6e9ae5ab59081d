"""Framings (preprocess.geometry): the breast found, shapes kept, and boxes exact both ways through crop and pad."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from comoto_cli.cache.h5cache import SliceCache
from comoto_cli.config import InferenceConfig, PreprocessConfig
from comoto_cli.transforms.framing import Framing, breast_box, framing_for
from comoto_cli.transforms.geometry import cache_to_official, official_to_cache
from comoto_cli.transforms.resize import resize_area
from comoto_cli.utils.csvio import read_csv

CACHE = {"image_height": 128, "image_width": 128}  # the tiny teacher's size: only the geometry differs


def half_ellipse(rows: int, cols: int, depth: float, half_height: float, centre_y: float) -> np.ndarray:
    """Tissue (0.3-0.7) in a half ellipse against the left edge, air (0) elsewhere."""
    y, x = np.mgrid[0:rows, 0:cols] + 0.5
    inside = (x / depth) ** 2 + ((y - centre_y) / half_height) ** 2 <= 1.0
    texture = 0.5 + 0.2 * np.sin(x / 7.0) * np.cos(y / 11.0)
    return np.where(inside, texture, 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------- the breast
def test_breast_box_holds_the_breast_and_leaves_out_air_and_a_marker():
    rows, cols = 900, 700
    image = half_ellipse(rows, cols, depth=400.0, half_height=300.0, centre_y=420.0)
    image[40:70, 600:660] = 1.0  # a burnt-in marker in the air, brighter than any tissue
    y0, y1, x0, x1 = breast_box(image)
    # The breast spans rows 120-720 and columns 0-400; the box holds it, plus at most the margin and a thumbnail
    # pixel (900 / 256 = 3.5 px) on each side, and not the marker.
    assert y0 <= 120 <= y0 + 0.02 * rows + 8 and y1 - 0.02 * rows - 8 <= 720 <= y1
    assert x0 == 0 and 400 <= x1 <= 400 + 0.02 * cols + 8
    assert x1 < 600 and y0 > 70


@pytest.mark.parametrize("image", [np.zeros((300, 200), np.float32),  # blank
                                   np.full((300, 200), 0.4, np.float32),  # flat
                                   half_ellipse(300, 200, 10_000.0, 10_000.0, 150.0)])  # tissue edge to edge
def test_breast_box_is_the_whole_image_when_nothing_stands_out(image):
    assert breast_box(image) == (0, 300, 0, 200)


def test_a_breast_filling_the_frame_keeps_its_fatty_tissue():
    """Fat (0.3) to every edge but a corner of air of 0.5 %, dense tissue (0.8) in the middle: the darkest
    percentile is fat, not air; the box must still hold all the tissue, not only the dense part."""
    rows, cols = 1200, 1000
    image = np.full((rows, cols), 0.3, np.float32)
    image += 0.5 * (half_ellipse(rows, cols, 500.0, 400.0, 600.0) > 0)
    image[:70, -90:] = 0.0  # 0.5 % air
    assert breast_box(image) == (0, rows, 0, cols)


# ---------------------------------------------------------------------------------------------- geometry
@st.composite
def crops_and_boxes(draw):
    rows, cols = draw(st.integers(20, 3000)), draw(st.integers(20, 3000))
    y0, x0 = draw(st.integers(0, rows - 10)), draw(st.integers(0, cols - 10))
    y1, x1 = draw(st.integers(y0 + 10, rows)), draw(st.integers(x0 + 10, cols))
    assume(max((y1 - y0) / (x1 - x0), (x1 - x0) / (y1 - y0)) <= 8)  # breasts, not slivers of one pixel
    height, width = draw(st.integers(16, 2048)), draw(st.integers(16, 2048))
    boxes = []
    for _ in range(draw(st.integers(1, 5))):
        x = draw(st.floats(x0, x1 - 1))
        y = draw(st.floats(y0, y1 - 1))
        boxes.append([x, y, draw(st.floats(0.5, max(x1 - x, 0.5))), draw(st.floats(0.5, max(y1 - y, 0.5)))])
    return (rows, cols), (y0, y1, x0, x1), (height, width), np.array(boxes)


@settings(max_examples=150, deadline=None)
@given(crops_and_boxes())
def test_breast_crop_keeps_the_aspect_and_maps_boxes_exactly_both_ways(case):
    shape, (y0, y1, x0, x1), (height, width), xywh = case
    from comoto_cli.transforms import framing as framing_module

    original = framing_module.breast_box
    framing_module.breast_box = lambda image: (y0, y1, x0, x1)
    try:
        framing = framing_for("breast-crop", shape, height, width, lambda: None)
    finally:
        framing_module.breast_box = original
    assert (framing.offset_y, framing.offset_x, framing.rows, framing.cols) == (y0, x0, y1 - y0, x1 - x0)
    # One scale for both axes, up to the rounding of the content to whole pixels; one side fills the frame.
    scale = min(height / framing.rows, width / framing.cols)
    assert abs(framing.scale_y - scale) <= 0.5 / framing.rows + 1e-12
    assert abs(framing.scale_x - scale) <= 0.5 / framing.cols + 1e-12
    assert framing.content_height == height or framing.content_width == width
    cache = official_to_cache(xywh, **framing.mapping())
    assert np.all(cache[:, 2:] > cache[:, :2])
    assert np.all(cache >= -1e-9)
    assert np.all(cache[:, [0, 2]] <= framing.content_width * (1 + 1e-9))
    assert np.all(cache[:, [1, 3]] <= framing.content_height * (1 + 1e-9))
    np.testing.assert_allclose(cache_to_official(cache, **framing.mapping()), xywh, rtol=1e-9, atol=1e-7)


def test_framed_image_puts_a_block_where_the_mapping_says_and_pads_with_zero():
    rows, cols = 500, 400
    image = np.zeros((rows, cols), np.float32)
    image[200:260, 150:230] = 1.0  # the block: official xywh (150, 200, 80, 60)
    framing = Framing(offset_y=100, offset_x=50, rows=300, cols=250, content_height=96, content_width=80,
                      height=128, width=96)
    framed = framing.apply(image)
    assert framed.shape == (128, 96) and framed.dtype == np.float32
    np.testing.assert_array_equal(framed[96:], 0.0)  # padding below and right of the content
    np.testing.assert_array_equal(framed[:, 80:], 0.0)
    np.testing.assert_array_equal(framed[:96, :80], resize_area(image[100:400, 50:300], 96, 80))
    x0, y0, x1, y1 = official_to_cache(np.array([[150.0, 200.0, 80.0, 60.0]]), **framing.mapping())[0]
    # The area filter conserves the mass: the block's area in cache pixels is its official area times the scales.
    assert framed.sum() == pytest.approx((x1 - x0) * (y1 - y0), rel=1e-5)
    inner = framed[int(np.ceil(y0)):int(np.floor(y1)), int(np.ceil(x0)):int(np.floor(x1))]
    assert inner.size and np.all(inner > 0.999)
    outside = np.ones(framed.shape, bool)
    outside[int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = False
    assert np.all(framed[outside] == 0.0)


def test_stretch_is_the_plain_resize():
    image = np.random.default_rng(0).random((70, 50)).astype(np.float32)
    framing = framing_for("stretch", image.shape, 32, 24, lambda: pytest.fail("stretch must not read pixels"))
    np.testing.assert_array_equal(framing.apply(image), resize_area(image, 32, 24))
    assert framing.mapping() == {"scale_y": 32 / 70, "scale_x": 24 / 50, "offset_y": 0.0, "offset_x": 0.0}


# ---------------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def cropped(tiny_synth, tmp_path_factory):
    from comoto_cli.preprocess.pipeline import preprocess

    folder = tmp_path_factory.mktemp("cropped")
    split = {"val_fraction": 0.25, "test_fraction": 0.25}
    caches = {}
    for modality in ("dbt", "mammo"):
        caches[modality] = folder / f"{modality}.h5"
        report = preprocess(tiny_synth / modality, caches[modality],
                            PreprocessConfig(modality=modality, workers=1, split=split, geometry="breast-crop",
                                             lesion_slice_offset=1, **CACHE), progress=False)
        caches[f"{modality}_report"] = report
    return caches


def _core_and_ring(image: np.ndarray, box) -> tuple[float, float]:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    core = image[y0:y1, x0:x1].mean()
    ring = image[max(y0 - 4, 0):y1 + 4, max(x0 - 4, 0):x1 + 4].sum() - image[y0:y1, x0:x1].sum()
    ring /= image[max(y0 - 4, 0):y1 + 4, max(x0 - 4, 0):x1 + 4].size - image[y0:y1, x0:x1].size
    return float(core), float(ring)


@pytest.mark.parametrize("modality", ["dbt", "mammo"])
def test_breast_crop_cache_keeps_shapes_and_its_boxes_lie_on_the_lesions(cropped, tiny_synth, modality):
    from comoto_cli.preprocess.summary import cache_summary

    cache = SliceCache(cropped[modality])
    assert cache.geometry == "breast-crop" and cache_summary(cropped[modality])["geometry"] == "breast-crop"
    vols = cache.volumes
    # The phantoms' breasts leave air beside them: every image is cropped, shapes kept, the rest padded with 0.
    assert np.all((vols["offset_x"] > 0) | (vols["offset_y"] > 0) | (vols["content_width"] < CACHE["image_width"])
                  | (vols["content_height"] < CACHE["image_height"]))
    np.testing.assert_allclose(vols["scale_y"], vols["scale_x"], rtol=0.03)
    checked = 0
    for v in range(cache.num_volumes):
        mapping = cache.mapping(v)
        rows = cache.volume_slice_rows(v)
        height, width = int(vols["content_height"][v]), int(vols["content_width"][v])
        for row in range(rows.start, rows.stop):
            image = cache.image(row)
            assert not image[height:].any() and not image[:, width:].any()
            lesion_rows = cache.box_lesion[cache.box_start[row]:cache.box_start[row] + cache.box_count[row]]
            for box, lesion in zip(cache.boxes(row), lesion_rows):
                official = [cache.lesions[name][lesion] for name in ("x", "y", "width", "height")]
                np.testing.assert_allclose(cache_to_official(box[None], **mapping)[0], official, atol=1e-3)
                if int(cache.lesions["slice"][lesion]) == int(cache.slice_index[row]):
                    core, ring = _core_and_ring(image, box)
                    assert core > ring, (v, row, core, ring)
                    checked += 1
    assert checked > 0
    assert cropped[f"{modality}_report"]["boxes_cut"] == 0  # the phantoms' lesions lie inside their breasts


def test_breast_crop_changes_the_config_hash_and_stretch_keeps_the_old_one():
    from comoto_cli.preprocess.pipeline import preprocess_config_hash

    plain = PreprocessConfig()
    assert "geometry" not in json.loads(plain.model_dump_json())  # caches made before framings stay current
    assert preprocess_config_hash(plain) == preprocess_config_hash(PreprocessConfig(geometry="stretch"))
    assert preprocess_config_hash(plain) != preprocess_config_hash(PreprocessConfig(geometry="breast-crop"))


def test_predict_frames_a_dicom_as_preprocess_did_and_maps_back_to_the_official_frame(cropped, tiny_synth,
                                                                                     monkeypatch):
    """A detector trained on a breast-crop cache carries the geometry in its checkpoint; predict frames a raw DICOM
    the same way (same pixels as the cache, to float16 storage) and reports boxes in the official frame."""
    from comoto_cli.data.dicom_io import open_dbt
    from comoto_cli.inference import predict as predict_module
    from comoto_cli.inference.predict import ResizedVolume, detect_dicom_image
    from comoto_cli.inference.volume import detections_to_dbtex

    cache = SliceCache(cropped["dbt"])
    volume = int(cache.volumes_in_split("test")[0])
    source = tiny_synth / "dbt" / str(cache.volumes["source"][volume])
    frames = open_dbt(source, str(cache.volumes["view"][volume]))
    height, width = cache.image_height, cache.image_width
    framing = framing_for("breast-crop", frames.shape[1:], height, width,
                          lambda: next(iter(frames.frames([frames.shape[0] // 2])))[1])
    assert framing.mapping() == cache.mapping(volume)
    framed = ResizedVolume(frames, height, width, framing)[0:frames.shape[0]]
    np.testing.assert_array_equal(framed.astype(np.float16), cache.images(cache.volume_slice_rows(volume)))

    class Recorder:  # a stand-in detector: returns fixed cache-frame boxes, so the mapping back is what is tested
        image_size, geometry = (height, width), "breast-crop"

    boxes = np.array([[10.0, 20.0, 30.0, 50.0]], np.float32)
    detections = {"slice_index": np.array([3]), "boxes": boxes, "scores": np.array([0.9], np.float32)}
    seen = []
    monkeypatch.setattr(predict_module, "detect_volume",
                        lambda model, slices, config, device: seen.append(slices[0:slices.shape[0]]) or detections)
    rows = detect_dicom_image(Recorder(), frames, "dbt", InferenceConfig(), "cpu")
    np.testing.assert_array_equal(seen[0], framed)  # the detector saw the framed volume
    expected = detections_to_dbtex(detections, **cache.mapping(volume), num_slices=frames.shape[0],
                                   config=InferenceConfig())
    for column in ("X", "Y", "Width", "Height"):
        np.testing.assert_allclose(rows[column], expected[column])
    np.testing.assert_allclose([rows["X"][0], rows["Y"][0]],
                               [10.0 / framing.scale_x + framing.offset_x, 20.0 / framing.scale_y + framing.offset_y])


def test_evaluate_refuses_a_checkpoint_of_another_geometry(cropped, tiny_teacher, tmp_path, capsys):
    from comoto_cli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", str(tiny_teacher), "--cache", str(cropped["mammo"]), "--split", "test",
              "--out", str(tmp_path / "eval")])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err.strip()
    assert "geometry 'stretch'" in error and "'breast-crop'" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "eval").exists()


def test_distill_refuses_a_teacher_of_another_geometry(cropped, tiny_teacher, tmp_path, capsys):
    """LsKD samples the teacher's features at lesion points of its cache: a teacher trained on stretched images
    would see cropped ones there."""
    from comoto_cli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--cache", str(cropped["dbt"]), "--teacher", str(tiny_teacher), "--teacher-cache",
              str(cropped["mammo"]), "--mode", "lesion", "--out", str(tmp_path / "student")])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err.strip()
    assert "geometry 'stretch'" in error and "'breast-crop'" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "student").exists()


def test_csv_boxes_are_unchanged_by_the_crop(cropped, tiny_synth):
    """The cache's lesions stay in the official frame at full resolution whatever the framing (evaluation scores
    against them)."""
    cache = SliceCache(cropped["dbt"])
    table = read_csv(next((tiny_synth / "dbt").glob("*boxes*.csv")), ["StudyUID", "View", "X", "Y", "Width", "Height"])
    csv = sorted(zip(table.floats("X"), table.floats("Y"), table.floats("Width"), table.floats("Height")))
    ours = sorted(zip(*(cache.lesions[name].tolist() for name in ("x", "y", "width", "height"))))
    np.testing.assert_allclose(ours, csv)


def test_boxes_cut_by_the_crop_are_cut_and_slivers_left_out():
    from comoto_cli.preprocess.pipeline import slice_boxes

    # Official xywh boxes against a content of 100 x 80 cache pixels at scale 1, offset (10, 20): one inside, one
    # half outside on the right (kept, cut), one 90 % outside at the bottom (left out), one on the border exactly.
    lesions = [(0, 30.0, 20.0, 10.0, 10.0), (0, 90.0, 40.0, 20.0, 10.0), (0, 40.0, 109.0, 10.0, 10.0),
               (0, 20.0, 10.0, 80.0, 100.0)]
    mapping = {"scale_y": 1.0, "scale_x": 1.0, "offset_y": 10.0, "offset_x": 20.0}
    boxes, ids, cut = slice_boxes(lesions, [0], mapping, 0, "dbt", (100, 80))
    assert cut == 2 and ids[0].tolist() == [0, 1, 3]
    np.testing.assert_allclose(boxes[0], [[10, 10, 20, 20], [70, 30, 80, 40], [0, 0, 80, 100]])
