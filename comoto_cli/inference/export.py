"""``comoto export``: the detector's network as a TorchScript or ONNX module for a fixed input size, and the
numbers a deployer needs to turn its outputs into boxes.

What is exported: backbone, FPN, classification and box-regression heads, from ``images`` (B, 1, H, W) float32
in [0, 1] (slices as the cache stores them) to two tensors, reshaped and concatenated as MONAI's RetinaNet does
before its post-processing (``RetinaNetDetector._reshape_maps``):

- ``cls_logits`` (B, N, 1): the lesion logit of every anchor (sigmoid -> score);
- ``box_regression`` (B, N, 4): the box deltas of every anchor, in MONAI's axis order ``(dy, dx, dh, dw)``.

N = sum over FPN levels of ``grid_h * grid_w * A`` (A anchor shapes per location); anchor ``n`` of a level (level
offset subtracted) sits at row ``r``, column ``c``, shape ``a`` with ``n = (r * grid_w + c) * A + a``. The anchors
themselves, the box coder and the thresholds stay outside the module: they are written as JSON into the export
(TorchScript extra file / ONNX ``metadata_props``, key :data:`METADATA_KEY`) and next to it (``F.json``).
:func:`anchors_from_metadata` and :func:`decode_outputs` are that recipe in numpy (the README's "Export" section
says it in words); the tests hold :func:`decode_outputs` of an exported module's outputs against
:meth:`ComotoDetector.predict`.

Exporters (torch 2.13, CPU): TorchScript by ``torch.jit.trace`` (the MONAI heads' NaN checks only warn, so the
trace is exact; ``torch.jit.script`` does not take the MONAI network); ONNX by the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``, opset :data:`ONNX_OPSET`), which needs the ``onnx`` package. The
``torch.export``-based one (``dynamo=True``) works too but needs ``onnxscript`` as well and is several times
slower, for the same graph. The batch size stays free in both formats; height and width are fixed.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from comoto_cli import __version__
from comoto_cli.config import config_json
from comoto_cli.errors import UsageError
from comoto_cli.networks.box_nms import greedy_nms
from comoto_cli.networks.checkpoint import load_detector
from comoto_cli.networks.detector import ComotoDetector
from comoto_cli.utils.atomic import atomic_path, sha256_file, write_text_atomic

FORMATS = ("torchscript", "onnx")
METADATA_KEY = "comoto_export"  # TorchScript extra file "comoto_export.json", ONNX metadata_props key
METADATA_FORMAT = "comoto-export"
METADATA_VERSION = 1
# What input.geometry names (comoto_cli.transforms.framing): how a full-resolution image becomes the model's input.
GEOMETRY_MEANING = {
    "stretch": "the whole image area-resized to height x width (each axis its own scale)",
    "breast-crop": "the breast's bounding box (largest region 5 % of the intensity range above the darkest, on a "
                   "256-pixel thumbnail of the image or of a volume's central slice, 2 % margin) area-resized with one "
                   "scale for both axes into the top-left corner, the rest 0; boxes map back as official = cache / "
                   "scale + crop origin",
}
ONNX_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAMES = ("cls_logits", "box_regression")
EXTRA_INSTALL = "pip install 'comoto-cli[export]'"

# Only these kinds of tracer noise are silenced: the MONAI heads' "NaN or Inf" checks (warnings only, no data flow)
# and the deprecation notices of the two TorchScript-based exporters, which are what works here (module docstring).
_QUIET = (
    "Converting a tensor to a Python boolean",
    r"`torch\.jit\.",
    "You are using the legacy TorchScript-based ONNX export",
    "The feature will be removed",
)


class ExportedHeads(nn.Module):
    """images (B, 1, H, W) -> (cls_logits (B, N, 1), box_regression (B, N, 4)): the detector's backbone, FPN and
    heads, outputs reshaped and concatenated exactly as :meth:`ComotoDetector._heads` (MONAI's ``_reshape_maps``)
    gives them. Shares the detector's modules (no copy)."""

    def __init__(self, detector: ComotoDetector):
        super().__init__()
        network = detector.detector.network
        self.backbone = detector.backbone
        self.classification_head = network.classification_head
        self.regression_head = network.regression_head
        self.num_anchors = int(detector.detector.num_anchors_per_loc)

    def _reshape(self, maps: list[Tensor]) -> Tensor:
        parts = []
        for value in maps:
            batch, channels, height, width = value.shape
            per_anchor = channels // self.num_anchors
            # (B, A*C, H, W) -> (B, A, C, H, W) -> (B, H, W, A, C) -> (B, H*W*A, C), as MONAI orders anchors.
            parts.append(value.view(batch, self.num_anchors, per_anchor, height, width)
                         .permute(0, 3, 4, 1, 2).reshape(batch, -1, per_anchor))
        return torch.cat(parts, dim=1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        maps = list(self.backbone(images).values())
        return self._reshape(self.classification_head(maps)), self._reshape(self.regression_head(maps))


# ---------------------------------------------------------------------------------------------- metadata
def export_metadata(detector: ComotoDetector, image_size: tuple[int, int], export_format: str,
                    checkpoint: Path | None = None) -> dict[str, Any]:
    """Everything outside the exported module that decoding needs, as plain JSON: input, outputs, anchors per
    level, box coder, post-processing thresholds, and the model config."""
    height, width = image_size
    inner = detector.detector
    generator = inner.anchor_generator
    num_anchors = int(inner.num_anchors_per_loc)
    levels, offset = [], 0
    for name, stride, cells in zip(_level_names(detector), detector.backbone.level_strides,
                                   generator.cell_anchors):
        grid = [height // int(stride), width // int(stride)]
        count = grid[0] * grid[1] * num_anchors
        levels.append({
            "name": name, "stride": [int(stride), int(stride)], "grid": grid, "offset": offset, "anchors": count,
            "cell_anchors": [[float(v) for v in row] for row in cells.detach().cpu().tolist()],
        })
        offset += count
    selector = inner.box_selector
    config = detector.config
    metadata: dict[str, Any] = {
        "format": METADATA_FORMAT,
        "format_version": METADATA_VERSION,
        "export_format": export_format,
        "comoto_version": __version__,
        "torch_version": torch.__version__,
        "input": {
            "name": INPUT_NAME, "shape": ["batch", config.input_slices, height, width], "dtype": "float32",
            "values": "slices as `comoto preprocess` caches them: official reader frame, VOI window (MONOCHROME1 "
                      "inverted), in [0, 1], framed into height x width by `geometry`"
                      + ("" if config.input_slices == 1 else
                         f"; channel c is slice s + c - {config.input_slices // 2} of the volume for output slice s, "
                         "clamped to the first and last slice"),
            "geometry": getattr(detector, "geometry", "stretch"),
            "geometry_meaning": GEOMETRY_MEANING.get(getattr(detector, "geometry", "stretch"), ""),
        },
        "outputs": {
            OUTPUT_NAMES[0]: {"shape": ["batch", offset, 1], "meaning": "lesion logit per anchor; score = sigmoid"},
            OUTPUT_NAMES[1]: {"shape": ["batch", offset, 4],
                              "meaning": "box deltas per anchor, (dy, dx, dh, dw) (MONAI axis order)"},
        },
        "coordinate_order": "anchors and decoded boxes are (y_min, x_min, y_max, x_max) in input pixels (axis 0 "
                            "first, MONAI's order); swap to (x_min, y_min, x_max, y_max) at the end",
        "num_anchors": offset,
        "anchors_per_location": num_anchors,
        "anchor_index": "within a level: n = (row * grid[1] + col) * anchors_per_location + a; anchor = "
                        "cell_anchors[a] + [cy, cx, cy, cx], cy = row * stride[0] + stride[0] // 2, "
                        "cx = col * stride[1] + stride[1] // 2",
        "levels": levels,
        "box_coder": {
            "weights": [float(w) for w in inner.box_coder.weights],
            "clip": float(inner.box_coder.boxes_xform_clip),
            "decode": "per axis: size = max - min, center = (min + max) / 2 of the anchor; "
                      "center' = d_center / weight * size + center; size' = exp(min(d_size / weight, clip)) * size; "
                      "box = center' -+ size' / 2",
        },
        "postprocess": {
            "score_threshold": float(selector.score_thresh),
            "topk_candidates_per_level": int(selector.topk_candidates_per_level),
            "nms_threshold": float(selector.nms_thresh),
            "detections_per_image": int(selector.detections_per_img),
            "min_box_size": 1.0,
            "steps": [
                "per image and level: score = sigmoid(logit); keep anchors with score > score_threshold; of those "
                "the topk_candidates_per_level best",
                "decode them (box_coder), clip to [0, height] x [0, width], drop boxes under min_box_size along an "
                "axis",
                "all levels together: greedy NMS (IoU > nms_threshold suppresses; IoU = inter / (area_a + area_b - "
                "inter + float32 eps)), at most detections_per_image, best first",
            ],
        },
        "checkpoint_image_size": list(detector.image_size),
        "model_config": json.loads(config_json(config)),
    }
    if checkpoint is not None:
        metadata["checkpoint"] = {"path": str(checkpoint), "sha256": sha256_file(checkpoint)}
    return metadata


def _level_names(detector: ComotoDetector) -> list[str]:
    names = getattr(detector.backbone, "level_names", None)
    count = len(detector.backbone.level_strides)
    return list(names) if names and len(names) == count else [f"level{i}" for i in range(count)]


# ---------------------------------------------------------------------------------------------- the recipe
def anchors_from_metadata(metadata: dict[str, Any]) -> np.ndarray:
    """All anchors (N, 4) float32, (y_min, x_min, y_max, x_max), in the order of the exported outputs."""
    per_level = []
    for level in metadata["levels"]:
        (rows, cols), (stride_y, stride_x) = level["grid"], level["stride"]
        center_y = np.arange(rows, dtype=np.int64) * stride_y + stride_y // 2
        center_x = np.arange(cols, dtype=np.int64) * stride_x + stride_x // 2
        grid_y, grid_x = np.meshgrid(center_y, center_x, indexing="ij")
        shifts = np.stack([grid_y, grid_x, grid_y, grid_x], axis=-1).reshape(-1, 1, 4).astype(np.float32)
        cells = np.asarray(level["cell_anchors"], dtype=np.float32).reshape(1, -1, 4)
        per_level.append((shifts + cells).reshape(-1, 4))
    return np.concatenate(per_level).astype(np.float32)


def decode_boxes(codes: np.ndarray, anchors: np.ndarray, weights: list[float], clip: float) -> np.ndarray:
    """MONAI's ``BoxCoder.decode_single`` in numpy float32: deltas (n, 4) on anchors (n, 4) -> boxes (n, 4)."""
    codes, anchors = codes.astype(np.float32), anchors.astype(np.float32)
    boxes = np.empty_like(codes)
    for axis in range(2):
        size = anchors[:, axis + 2] - anchors[:, axis]
        center = (anchors[:, axis] + anchors[:, axis + 2]) / np.float32(2)
        new_center = codes[:, axis] / np.float32(weights[axis]) * size + center
        log_size = np.minimum(codes[:, axis + 2] / np.float32(weights[axis + 2]), np.float32(clip))
        half = np.float32(0.5) * (np.exp(log_size) * size)
        boxes[:, axis], boxes[:, axis + 2] = new_center - half, new_center + half
    return boxes


def decode_outputs(cls_logits: np.ndarray, box_regression: np.ndarray,
                   metadata: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    """The exported module's outputs (B, N, 1) and (B, N, 4) -> per image ``boxes`` (n, 4) float32 xyxy and
    ``scores`` (n,) float32, best first: :meth:`ComotoDetector.predict`'s detections, from the metadata alone."""
    cls_logits = np.asarray(cls_logits, dtype=np.float32)
    box_regression = np.asarray(box_regression, dtype=np.float32)
    anchors = anchors_from_metadata(metadata)
    if cls_logits.shape[1:] != (len(anchors), 1) or box_regression.shape != (*cls_logits.shape[:2], 4):
        raise ValueError(f"outputs of shape {cls_logits.shape} and {box_regression.shape} do not fit "
                         f"{len(anchors)} anchors")
    post, coder = metadata["postprocess"], metadata["box_coder"]
    height, width = metadata["input"]["shape"][2:]
    threshold, limit = float(post["score_threshold"]), int(post["topk_candidates_per_level"])
    results = []
    for logits, codes in zip(cls_logits[..., 0], box_regression):
        boxes, scores = [], []
        for level in metadata["levels"]:
            part = slice(level["offset"], level["offset"] + level["anchors"])
            level_scores = (1.0 / (1.0 + np.exp(-logits[part].astype(np.float64)))).astype(np.float32)
            above = np.flatnonzero(level_scores > threshold)
            top = above[np.argsort(-level_scores[above], kind="stable")[:limit]]
            decoded = decode_boxes(codes[part][top], anchors[part][top], coder["weights"], coder["clip"])
            decoded[:, [0, 2]] = np.clip(decoded[:, [0, 2]], 0, height)
            decoded[:, [1, 3]] = np.clip(decoded[:, [1, 3]], 0, width)
            size = float(post["min_box_size"])
            keep = (decoded[:, 2] >= decoded[:, 0] + size) & (decoded[:, 3] >= decoded[:, 1] + size)
            boxes.append(decoded[keep])
            scores.append(level_scores[top][keep])
        all_boxes, all_scores = np.concatenate(boxes), np.concatenate(scores)
        chosen = (greedy_nms(all_boxes, all_scores, float(post["nms_threshold"]), int(post["detections_per_image"]))
                  if len(all_scores) else np.zeros(0, np.int64))
        results.append({"boxes": np.ascontiguousarray(all_boxes[chosen][:, [1, 0, 3, 2]]),
                        "scores": all_scores[chosen]})
    return results


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata embedded in an exported file: a TorchScript extra file, or an ONNX ``metadata_props`` entry
    (its sidecar ``F.json`` when the ``onnx`` package is missing)."""
    path = Path(path)
    with path.open("rb") as handle:
        is_zip = handle.read(2) == b"PK"  # TorchScript archives are zip files; ONNX is a bare protobuf
    if is_zip:
        files = {f"{METADATA_KEY}.json": ""}
        with _quiet():
            torch.jit.load(str(path), map_location="cpu", _extra_files=files)
        return json.loads(files[f"{METADATA_KEY}.json"])
    try:
        onnx = importlib.import_module("onnx")
    except ImportError:
        return json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    props = {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props[METADATA_KEY])


def sidecar_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".json")


# ---------------------------------------------------------------------------------------------- export
def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"ONNX export needs the '{module}' package: {EXTRA_INSTALL}") from None


def export_image_size(detector: ComotoDetector, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width) of the export: the checkpoint's unless given; each a multiple of the coarsest stride."""
    size = (int(height) if height is not None else detector.image_size[0],
            int(width) if width is not None else detector.image_size[1])
    divisor = detector.size_divisible
    for flag, side in zip(("--height", "--width"), size):
        if side < 1 or side % divisor:
            suggestion = max(divisor, round(side / divisor) * divisor)
            raise UsageError(f"{flag} {side}: the input size must be a positive multiple of {divisor}, the coarsest "
                             f"stride of this model; e.g. {suggestion}")
    return size


def _example_input(image_size: tuple[int, int], slices: int = 1) -> Tensor:
    """What the module is traced with: one image of ``slices`` channels (a 2.5-D model is traced with its
    neighbours, so the exported graph takes them; a 2-D one with the grey channel)."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand((1, slices, *image_size), generator=generator)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=message)
        yield


def _write_torchscript(module: ExportedHeads, example: Tensor, temporary: Path, metadata_text: str) -> None:
    with _quiet():
        traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, str(temporary), _extra_files={f"{METADATA_KEY}.json": metadata_text})


def _write_onnx(module: ExportedHeads, example: Tensor, temporary: Path, metadata_text: str) -> None:
    onnx = _require("onnx")
    batch = {0: "batch"}
    with _quiet():
        torch.onnx.export(
            module, (example,), str(temporary), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: batch, **{name: batch for name in OUTPUT_NAMES}},
            opset_version=ONNX_OPSET, dynamo=False,
        )
    model = onnx.load(str(temporary))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata_text
    model.producer_name, model.doc_string = "comoto-cli", "CoMoTo RetinaNet heads; decoding: metadata comoto_export"
    onnx.checker.check_model(model)
    onnx.save(model, str(temporary))


def export_detector(detector: ComotoDetector, out: str | Path, export_format: str, *,
                    image_size: tuple[int | None, int | None] | None = None,
                    checkpoint: Path | None = None) -> dict[str, Any]:
    """Write ``detector``'s network (moved to the CPU, eval mode) to ``out`` (TorchScript or ONNX) for the input
    ``image_size`` (height, width; a side not given: the detector's) and its metadata to ``out``.json, each
    atomically (temporary file, then rename). Returns the metadata."""
    if export_format not in FORMATS:
        raise UsageError(f"--format {export_format!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if export_format == "onnx":
        _require("onnx")  # before any work: a missing package is one line, not a trace after the export
    size = export_image_size(detector, *(image_size or (None, None)))
    detector = detector.to("cpu").eval()
    metadata = export_metadata(detector, size, export_format, checkpoint)
    metadata_text = json.dumps(metadata, indent=2)
    module = ExportedHeads(detector).eval()
    writer = _write_onnx if export_format == "onnx" else _write_torchscript
    # The sidecar is renamed into place just before the module: a failed export changes neither.
    with torch.no_grad(), atomic_path(out) as temporary:
        writer(module, _example_input(size, detector.config.input_slices), temporary, metadata_text)
        write_text_atomic(sidecar_path(out), metadata_text + "\n")
    return metadata


def export_checkpoint(checkpoint: str | Path, out: str | Path, export_format: str, *, height: int | None = None,
                      width: int | None = None) -> dict[str, Any]:
    """``comoto export``: load ``checkpoint`` (weights_only) and :func:`export_detector` it."""
    checkpoint = Path(checkpoint)
    detector, _ = load_detector(checkpoint, map_location="cpu")
    return export_detector(detector, out, export_format, image_size=(height, width), checkpoint=checkpoint)


__all__ = [
    "FORMATS",
    "METADATA_KEY",
    "ONNX_OPSET",
    "OUTPUT_NAMES",
    "ExportedHeads",
    "anchors_from_metadata",
    "decode_boxes",
    "decode_outputs",
    "export_checkpoint",
    "export_detector",
    "export_image_size",
    "export_metadata",
    "read_metadata",
    "sidecar_path",
]
