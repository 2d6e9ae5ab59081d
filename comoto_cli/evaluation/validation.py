"""Per-image validation of a 2-D detector: predictions over a cache split, then the image-level FROC
(sensitivity at 1-4 false positives per image and their mean) and COCO-style AP/AR from MONAI.

Used every epoch by ``train-teacher`` (best checkpoint by ``mean_sensitivity`` by default). The DBT student's
volume-level DBTex validation lives with ``distill``; this per-image one works on any cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from comoto_cli.data.datasets import DetectionDataset, make_loader
from comoto_cli.metrics.image_froc import image_froc
from comoto_cli.networks.detector import detections_as_numpy
from comoto_cli.utils.system import loader_workers

FPS_PER_IMAGE = (1, 2, 3, 4)
COCO_IOU_LIST = (0.1, 0.5)
COCO_IOU_RANGE = (0.1, 0.5, 0.05)
COCO_MAX_DETECTIONS = (1, 5, 100)

#: Keys of :func:`detection_metrics`; any of them may be the trainer's ``best_metric``.
METRIC_NAMES = (
    *(f"sensitivity_at_{f}_fp" for f in FPS_PER_IMAGE), "mean_sensitivity", "map", "ap_10", "ap_50", "mar",
)


@torch.no_grad()
def detect_images(model, dataset: DetectionDataset, *, batch_size: int = 16, device: torch.device | None = None,
                  num_workers: int | str = "auto") -> list[dict[str, np.ndarray]]:
    """``model.predict`` (eval mode, see :meth:`ComotoDetector.predict`) over every image of ``dataset``, in order.
    Returns per image ``{"boxes": (n, 4), "scores": (n,)}`` float32 numpy arrays, boxes xyxy in cache pixels."""
    if device is None:
        device = next(model.parameters()).device
    workers = loader_workers(num_workers, torch.device(device).type)
    loader = make_loader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    detections: list[dict[str, np.ndarray]] = []
    for batch in loader:
        detections.extend(detections_as_numpy(model.predict(batch["images"].to(device))))
    return detections


def ground_truth_boxes(dataset: DetectionDataset) -> list[np.ndarray]:
    """Cache-frame xyxy boxes of every image of ``dataset``, in its order (no augmentation)."""
    return [np.asarray(dataset.cache.boxes(int(row)), dtype=np.float64).reshape(-1, 4) for row in dataset.rows]


def coco_metrics(predictions: Sequence[dict[str, np.ndarray]], ground_truth: Sequence[np.ndarray]) -> dict:
    """MONAI's COCO metric for the single 'lesion' class: ``map`` (mean AP over IoU 0.10:0.05:0.50),
    ``ap_10``, ``ap_50``, ``mar`` (mean recall at 100 detections). None when there is no ground-truth box."""
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou

    if sum(len(g) for g in ground_truth) == 0:
        return {"map": None, "ap_10": None, "ap_50": None, "mar": None}
    metric = COCOMetric(classes=["lesion"], iou_list=COCO_IOU_LIST, iou_range=COCO_IOU_RANGE,
                        max_detection=COCO_MAX_DETECTIONS, per_class=False, verbose=False)
    matches = matching_batch(
        iou_fn=box_iou,
        iou_thresholds=metric.iou_thresholds,
        pred_boxes=[np.asarray(p["boxes"], dtype=np.float64).reshape(-1, 4) for p in predictions],
        pred_classes=[np.zeros(len(p["scores"]), dtype=np.int64) for p in predictions],
        pred_scores=[np.asarray(p["scores"], dtype=np.float64).reshape(-1) for p in predictions],
        gt_boxes=[np.asarray(g, dtype=np.float64).reshape(-1, 4) for g in ground_truth],
        gt_classes=[np.zeros(len(g), dtype=np.int64) for g in ground_truth],
        max_detections=COCO_MAX_DETECTIONS[-1],
    )
    values, _ = metric(matches)
    suffix_range = f"IoU_{COCO_IOU_RANGE[0]:.2f}_{COCO_IOU_RANGE[1]:.2f}_{COCO_IOU_RANGE[2]:.2f}"
    last = COCO_MAX_DETECTIONS[-1]
    return {
        "map": float(values[f"mAP_{suffix_range}_MaxDet_{last}"]),
        "ap_10": float(values[f"AP_IoU_0.10_MaxDet_{last}"]),
        "ap_50": float(values[f"AP_IoU_0.50_MaxDet_{last}"]),
        "mar": float(values[f"mAR_{suffix_range}_MaxDet_{last}"]),
    }


def detection_metrics(predictions: Sequence[dict[str, np.ndarray]], ground_truth: Sequence[np.ndarray]) -> dict:
    """Image-level FROC (``sensitivity_at_{1..4}_fp``, ``mean_sensitivity``) and COCO AP/AR of per-image
    predictions against per-image ground-truth boxes (both in the same pixel frame)."""

    froc = image_froc(list(predictions), list(ground_truth), fps_per_image=FPS_PER_IMAGE)
    metrics: dict = {f"sensitivity_at_{f}_fp": _finite_or_none(froc[f"sensitivity_at_{f}_fp"]) for f in FPS_PER_IMAGE}
    metrics["mean_sensitivity"] = _finite_or_none(froc["mean_sensitivity"])
    metrics.update(coco_metrics(predictions, ground_truth))
    metrics["num_images"] = len(ground_truth)
    metrics["num_lesions"] = int(sum(len(g) for g in ground_truth))
    return metrics


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def validate(model, dataset: DetectionDataset, *, batch_size: int = 16, num_workers: int | str = "auto") -> dict:
    """Predict every image of ``dataset`` and score it (:func:`detection_metrics`)."""
    predictions = detect_images(model, dataset, batch_size=batch_size, num_workers=num_workers)
    return detection_metrics(predictions, ground_truth_boxes(dataset))


def make_val_fn(dataset: DetectionDataset, *, batch_size: int = 16,
                num_workers: int | str = "auto") -> Callable[[torch.nn.Module], dict]:
    """The trainer's ``val_fn``: model -> metrics dict (see :data:`METRIC_NAMES`); ``val_fn.size`` is the number
    of images it validates (the trainer's ``val_every: auto`` reads it)."""

    def val_fn(model: torch.nn.Module) -> dict:
        return validate(model, dataset, batch_size=batch_size, num_workers=num_workers)

    val_fn.size = len(dataset)
    return val_fn
