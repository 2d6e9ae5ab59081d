"""Per-image FROC for 2D detection (mammography teacher validation, ``evaluate`` on a mammography cache).

The DBTex rules carried to single images, so teacher and student numbers read the same way:

- a prediction *hits* a ground-truth box when the prediction's centre lies inside the box, borders included
  (``xmin <= cx <= xmax`` and ``ymin <= cy <= ymax``); inside several boxes -> the one whose centre is
  nearest, exact ties -> the first box of the image;
- thresholds ``[max score + 1] + hitting scores + [min score - 1]``, walked downwards (as the DBTex scorer);
  TP = distinct GT boxes hit at score >= t / all GT boxes; FP = non-hitting predictions at score >= t /
  number of images; an extra hit on an already found box is neither TP nor FP;
- the walk stops after the first point above the largest requested FP rate; sensitivity at F =
  ``numpy.interp(F, fps, sensitivities)``.

With no GT box at all sensitivity is undefined: every sensitivity is NaN (and ``fps``/``sensitivities`` are
empty). No image -> the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from comoto_cli.metrics.dbtex import froc_walk, official_thresholds, sensitivities_at

#: The false-positive rates per image the teacher's validation reports (``sensitivity_at_{F}_fp``).
FPS_PER_IMAGE = (1, 2, 3, 4)
FROC_KEYS = (*(f"sensitivity_at_{f}_fp" for f in FPS_PER_IMAGE), "mean_sensitivity")


def _image_hits(pred_boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """Index of the GT box each prediction hits in one image, or -1."""
    if pred_boxes.shape[0] == 0 or gt_boxes.shape[0] == 0:
        return np.full(pred_boxes.shape[0], -1, dtype=np.int64)
    cx = (pred_boxes[:, 0] + pred_boxes[:, 2]) / 2
    cy = (pred_boxes[:, 1] + pred_boxes[:, 3]) / 2
    inside = (
        (cx[:, None] >= gt_boxes[None, :, 0]) & (cx[:, None] <= gt_boxes[None, :, 2])
        & (cy[:, None] >= gt_boxes[None, :, 1]) & (cy[:, None] <= gt_boxes[None, :, 3])
    )
    gx = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2
    gy = (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2
    distance = np.hypot(cx[:, None] - gx[None, :], cy[:, None] - gy[None, :])
    nearest = np.argmin(np.where(inside, distance, np.inf), axis=1)  # argmin: first of exact ties
    return np.where(inside.any(axis=1), nearest, -1).astype(np.int64)


def image_froc(
    predictions: Sequence[dict],
    ground_truth: Sequence[np.ndarray],
    fps_per_image: Sequence[float] = (1, 2, 3, 4),
) -> dict:
    """FROC of 2D detections. ``predictions[i] = {"boxes": (k, 4) xyxy, "scores": (k,)}``; ``ground_truth[i]``
    (m, 4) xyxy in the same frame. Returns ``sensitivity_at_{F}_fp`` for each F, ``mean_sensitivity`` and the
    walked curve ``fps`` / ``sensitivities``."""
    if len(predictions) != len(ground_truth):
        raise ValueError(f"image_froc: {len(predictions)} prediction entries for {len(ground_truth)} images")
    fps_per_image = tuple(float(f) for f in fps_per_image)
    if not fps_per_image:
        raise ValueError("image_froc: fps_per_image is empty")
    scores, hits = [], []
    gt_offset = 0
    for index, (pred, gt) in enumerate(zip(predictions, ground_truth)):
        boxes = np.asarray(pred["boxes"], dtype=np.float64).reshape(-1, 4)
        score = np.asarray(pred["scores"], dtype=np.float64).reshape(-1)
        if score.size != boxes.shape[0]:
            raise ValueError(f"image_froc: image {index} has {boxes.shape[0]} boxes and {score.size} scores")
        gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
        hit = _image_hits(boxes, gt)
        hits.append(np.where(hit >= 0, hit + gt_offset, -1))
        scores.append(score)
        gt_offset += gt.shape[0]

    def key(f: float) -> str:
        return f"sensitivity_at_{int(f) if float(f).is_integer() else f}_fp"

    if gt_offset == 0 or len(ground_truth) == 0:
        result: dict = {key(f): float("nan") for f in fps_per_image}
        result.update(mean_sensitivity=float("nan"), fps=np.zeros(0), sensitivities=np.zeros(0))
        return result
    score = np.concatenate(scores) if scores else np.zeros(0)
    hit = np.concatenate(hits) if hits else np.zeros(0, dtype=np.int64)
    thresholds = official_thresholds(score, hit >= 0)
    fps, sens = froc_walk(
        score, hit, gt_offset, len(ground_truth), thresholds, max(fps_per_image),
        gt_weight=np.ones(gt_offset, dtype=np.int64),
    )
    values = sensitivities_at(fps, sens, fps_per_image)
    result = {key(f): v for f, v in zip(fps_per_image, values)}
    result.update(mean_sensitivity=float(np.mean(values)), fps=fps, sensitivities=sens)
    return result


def froc_metrics(predictions: Sequence[dict], ground_truth: Sequence[np.ndarray]) -> dict:
    """The validation's FROC numbers (:data:`FROC_KEYS`): :func:`image_froc` at :data:`FPS_PER_IMAGE`, NaN as
    None (no ground-truth box)."""
    froc = image_froc(list(predictions), list(ground_truth), fps_per_image=FPS_PER_IMAGE)
    return {key: _finite_or_none(froc[key]) for key in FROC_KEYS}


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
