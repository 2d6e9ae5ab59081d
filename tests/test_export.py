"""`comoto export`: the exported network (TorchScript, ONNX) gives the detector's own head outputs, and the
documented decoding recipe (metadata + :func:`decode_outputs`) gives :meth:`ComotoDetector.predict`'s detections.

Tolerances (measured on this CPU with one thread: TorchScript 0 difference; ONNX Runtime up to 8e-6 on logits of
magnitude up to 3, 7e-7 on box deltas; decoded boxes within 2e-5 px, scores within 1.5e-6):
TorchScript heads atol 1e-5; ONNX heads rtol 1e-4 + atol 1e-4; detections boxes 1e-3 px, scores 1e-5.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from comoto_cli.cli import main
from comoto_cli.inference.export import (
    METADATA_KEY,
    anchors_from_metadata,
    decode_outputs,
    export_detector,
    read_metadata,
    sidecar_path,
)
from comoto_cli.networks.checkpoint import load_detector, save_checkpoint
from comoto_cli.networks.detector import build_detector
from tests.conftest import tiny_model_config

# Not square, so that a swapped axis anywhere (anchors, grid, clipping, box order) shows.
IMAGE_SIZE = (128, 64)
HEADS_ATOL = {"torchscript": 1e-5, "onnx": 1e-4}
HEADS_RTOL = {"torchscript": 0.0, "onnx": 1e-4}
BOX_ATOL, SCORE_ATOL = 1e-3, 1e-5
# TorchScript is deprecated upstream (torch.export is its successor) but is the format asked for.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


def _exit_code(arguments: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(arguments)
    return info.value.code


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny detector whose classifier scores spread over (0, 1): the default prior (0.01) is under the score
    threshold, which would leave nothing to decode."""
    torch.manual_seed(0)
    detector = build_detector(tiny_model_config(), IMAGE_SIZE, load_weights=False)
    head = detector.detector.network.classification_head.cls_logits
    with torch.no_grad():
        head.bias.fill_(-1.0)
        head.weight.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("export") / "best.pt"
    save_checkpoint(path, model_state=detector.state_dict(), model_config=detector.config, image_size=IMAGE_SIZE,
                    metadata={"epoch": 1})
    return path


@pytest.fixture(scope="module")
def exports(checkpoint):
    """Both formats, written by the command; the format of the .pt file from its suffix."""
    folder = checkpoint.parent / "out"
    paths = {"torchscript": folder / "detector.pt", "onnx": folder / "detector.onnx"}
    assert _exit_code(["export", str(checkpoint), "--out", str(paths["torchscript"])]) == 0
    assert _exit_code(["export", str(checkpoint), "--format", "onnx", "--out", str(paths["onnx"])]) == 0
    return paths


def _images(batch: int = 3, size=IMAGE_SIZE, seed: int = 1) -> torch.Tensor:
    return torch.rand((batch, 1, *size), generator=torch.Generator().manual_seed(seed))


def _run(path, fmt: str, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            cls_logits, box_regression = module(images)
        return cls_logits.numpy(), box_regression.numpy()
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["cls_logits", "box_regression"]
    cls_logits, box_regression = session.run(None, {"images": images.numpy()})
    return cls_logits, box_regression


def _detector_heads(detector, images):
    detector.eval()
    with torch.no_grad():
        reshaped, anchors, locations, _ = detector._heads(images)
    inner = detector.detector
    return reshaped[inner.cls_key].numpy(), reshaped[inner.box_reg_key].numpy(), anchors[0].numpy(), locations


def _same_detections(got, expected):
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected):
        boxes, scores = np.asarray(theirs["boxes"]), np.asarray(theirs["scores"])
        assert len(scores) > 0  # the check means something only with detections
        assert np.asarray(mine["scores"]).shape == scores.shape
        np.testing.assert_allclose(np.asarray(mine["boxes"]), boxes, atol=BOX_ATOL, rtol=0)
        np.testing.assert_allclose(np.asarray(mine["scores"]), scores, atol=SCORE_ATOL, rtol=0)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_heads_match_the_detector(exports, checkpoint, fmt):
    detector, _ = load_detector(checkpoint)
    images = _images()  # batch 3; the export was traced with batch 1: the batch size stays free
    cls_logits, box_regression = _run(exports[fmt], fmt, images)
    expected_cls, expected_box, _, _ = _detector_heads(detector, images)
    assert cls_logits.shape == expected_cls.shape and box_regression.shape == expected_box.shape
    np.testing.assert_allclose(cls_logits, expected_cls, atol=HEADS_ATOL[fmt], rtol=HEADS_RTOL[fmt])
    np.testing.assert_allclose(box_regression, expected_box, atol=HEADS_ATOL[fmt], rtol=HEADS_RTOL[fmt])


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_metadata_is_embedded_and_beside_the_file(exports, checkpoint, fmt):
    path = exports[fmt]
    sidecar = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    assert read_metadata(path) == sidecar
    assert sidecar["export_format"] == fmt and sidecar["input"]["shape"] == ["batch", 1, *IMAGE_SIZE]
    assert sidecar["checkpoint"]["path"] == str(checkpoint)
    # Written through temporary files renamed into place: nothing else is left in the folder.
    assert sorted(os.listdir(path.parent)) == sorted(
        name for written in exports.values() for name in (written.name, sidecar_path(written).name))


def test_metadata_anchors_and_thresholds_are_the_detectors(exports, checkpoint):
    detector, _ = load_detector(checkpoint)
    metadata = read_metadata(exports["torchscript"])
    _, _, anchors, locations = _detector_heads(detector, _images(1))
    np.testing.assert_array_equal(anchors_from_metadata(metadata), anchors)
    per_location = metadata["anchors_per_location"]
    assert [level["anchors"] for level in metadata["levels"]] == [count * per_location for count in locations]
    assert metadata["num_anchors"] == len(anchors)
    selector = detector.detector.box_selector
    post = metadata["postprocess"]
    assert (post["score_threshold"], post["topk_candidates_per_level"], post["nms_threshold"],
            post["detections_per_image"]) == (selector.score_thresh, selector.topk_candidates_per_level,
                                              selector.nms_thresh, selector.detections_per_img)
    assert metadata["box_coder"]["weights"] == list(detector.detector.box_coder.weights)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_decoding_the_exported_outputs_reproduces_predict(exports, checkpoint, fmt, monkeypatch):
    detector, _ = load_detector(checkpoint)
    images = _images()
    expected = detector.predict(images)
    cls_logits, box_regression = _run(exports[fmt], fmt, images)
    metadata = read_metadata(exports[fmt])

    # 1. The recipe as written down (numpy, from the metadata alone).
    _same_detections(decode_outputs(cls_logits, box_regression, metadata), expected)

    # 2. The exported outputs and the metadata's anchors through the detector's own post-processing.
    inner = detector.detector
    anchors = torch.from_numpy(anchors_from_metadata(metadata))
    locations = [level["anchors"] // metadata["anchors_per_location"] for level in metadata["levels"]]
    reshaped = {inner.cls_key: torch.from_numpy(cls_logits), inner.box_reg_key: torch.from_numpy(box_regression)}
    monkeypatch.setattr(detector, "_heads",
                        lambda batch: (reshaped, [anchors] * len(batch), locations, None))
    _same_detections(detector.predict(images), expected)


def test_the_recipe_applies_threshold_top_k_and_limit(checkpoint, tmp_path):
    """Inference settings that cut: a score threshold above many anchors, a top-k below a level's candidates, a
    detection limit below the NMS survivors (the export takes the detector's settings, here not the stored ones)."""
    settings = {"score_threshold": 0.3, "topk_candidates_per_level": 20, "detections_per_image": 5}
    detector, _ = load_detector(checkpoint, expected=tiny_model_config(**settings))
    out = tmp_path / "cut.pt"
    metadata = export_detector(detector, out, "torchscript")
    assert {key: metadata["postprocess"][key] for key in settings} == settings
    images = _images(4, seed=3)
    cls_logits, box_regression = _run(out, "torchscript", images)
    scores = 1 / (1 + np.exp(-cls_logits[..., 0]))
    first = metadata["levels"][0]
    assert ((scores[:, :first["anchors"]] > 0.3).sum(axis=1) > 20).all()  # the top-k cut is exercised
    expected = detector.predict(images)
    assert all(len(d["scores"]) == 5 for d in expected)
    _same_detections(decode_outputs(cls_logits, box_regression, metadata), expected)


def test_another_input_size(checkpoint, tmp_path):
    out = tmp_path / "wide.ts"
    assert _exit_code(["export", str(checkpoint), "--out", str(out), "--height", "64", "--width", "128"]) == 0
    metadata = read_metadata(out)
    assert metadata["input"]["shape"] == ["batch", 1, 64, 128]
    assert metadata["checkpoint_image_size"] == list(IMAGE_SIZE)
    detector, _ = load_detector(checkpoint)
    images = _images(2, (64, 128), seed=2)
    cls_logits, box_regression = _run(out, "torchscript", images)
    expected_cls, expected_box, anchors, _ = _detector_heads(detector, images)
    np.testing.assert_allclose(cls_logits, expected_cls, atol=HEADS_ATOL["torchscript"], rtol=0)
    np.testing.assert_allclose(box_regression, expected_box, atol=HEADS_ATOL["torchscript"], rtol=0)
    np.testing.assert_array_equal(anchors_from_metadata(metadata), anchors)
    _same_detections(decode_outputs(cls_logits, box_regression, metadata), detector.predict(images))


@pytest.mark.parametrize("name, arguments, message", [
    ("model.pt", ["--height", "100"], "--height 100: the input size must be a positive multiple of 64"),
    ("model.onnx", ["--width", "0"], "--width 0: the input size must be a positive multiple of 64"),
    ("model.pt", ["--format", "tflite"], "--format 'tflite': choose torchscript or onnx"),
    ("model.bin", [], "cannot tell the format from its suffix"),
])
def test_bad_usage_is_one_line(checkpoint, tmp_path, capsys, name, arguments, message):
    out = tmp_path / name
    assert _exit_code(["export", str(checkpoint), "--out", str(out), *arguments]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_missing_onnx_package_says_what_to_install(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    out = tmp_path / "model.onnx"
    assert _exit_code(["export", str(checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'comoto-cli[export]'" in err[0], err
    assert os.listdir(tmp_path) == []


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert _exit_code(["export", str(tmp_path / "none.pt"), "--out", str(tmp_path / "m.pt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "file not found" in err[0], err


def test_torchscript_extra_file_name(exports):
    files = {f"{METADATA_KEY}.json": ""}
    torch.jit.load(str(exports["torchscript"]), _extra_files=files)
    assert json.loads(files[f"{METADATA_KEY}.json"])["format"] == "comoto-export"


def test_metadata_names_the_checkpoints_geometry(checkpoint, tmp_path):
    """A detector trained on a breast-crop cache says so in its export: a deployment must frame images that way."""
    payload = torch.load(checkpoint, weights_only=True)
    cropped = tmp_path / "cropped.pt"
    save_checkpoint(cropped, model_state=payload["model_state"], model_config=tiny_model_config(),
                    image_size=IMAGE_SIZE, metadata={"epoch": 1}, geometry="breast-crop")
    for path, geometry in ((checkpoint, "stretch"), (cropped, "breast-crop")):
        out = tmp_path / f"{geometry}.pt"
        assert _exit_code(["export", str(path), "--out", str(out)]) == 0
        metadata = read_metadata(out)
        assert metadata["input"]["geometry"] == geometry
        assert metadata["input"]["geometry_meaning"]
