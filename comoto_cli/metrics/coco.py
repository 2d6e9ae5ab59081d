"""COCO-style AP/AR of per-image detections (MONAI's COCOMetric, one 'lesion' class): the teacher's ``map``,
``ap_10``, ``ap_50`` and ``mar``, registered in :mod:`comoto_cli.metrics.registry`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

COCO_IOU_LIST = (0.1, 0.5)
COCO_IOU_RANGE = (0.1, 0.5, 0.05)
COCO_MAX_DETECTIONS = (1, 5, 100)
COCO_KEYS = ("map", "ap_10", "ap_50", "mar")


def coco_metrics(predictions: Sequence[dict[str, np.ndarray]], ground_truth: Sequence[np.ndarray]) -> dict:
    """MONAI's COCO metric for the single 'lesion' class: ``map`` (mean AP over IoU 0.10:0.05:0.50),
    ``ap_10``, ``ap_50``, ``mar`` (mean recall at 100 detections). None when there is no ground-truth box."""
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou

    if sum(len(g) for g in ground_truth) == 0:
        return {key: None for key in COCO_KEYS}
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
