"""Per-image validation of a 2-D detector: predictions over a cache split, scored by every registered metric
family of level "image" (:mod:`comoto_cli.metrics.registry`): the image-level FROC (sensitivity at 1-4 false
positives per image and their mean), COCO-style AP/AR from MONAI, and the split's size.

Used every epoch by ``train-teacher`` (best checkpoint by ``mean_sensitivity`` by default). The DBT student's
volume-level DBTex validation lives with ``distill``; this per-image one works on any cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from comoto_cli.data.datasets import DetectionDataset, make_loader
from comoto_cli.metrics.registry import compute_metrics
from comoto_cli.networks.detector import detections_as_numpy
from comoto_cli.utils.system import loader_workers


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


def detection_metrics(predictions: Sequence[dict[str, np.ndarray]], ground_truth: Sequence[np.ndarray]) -> dict:
    """Every registered image-level metric (by default ``sensitivity_at_{1..4}_fp``, ``mean_sensitivity``, ``map``,
    ``ap_10``, ``ap_50``, ``mar``, ``num_images``, ``num_lesions``) of per-image predictions against per-image
    ground-truth boxes (both in the same pixel frame)."""
    return compute_metrics("image", predictions, ground_truth)


def validate(model, dataset: DetectionDataset, *, batch_size: int = 16, num_workers: int | str = "auto") -> dict:
    """Predict every image of ``dataset`` and score it (:func:`detection_metrics`)."""
    predictions = detect_images(model, dataset, batch_size=batch_size, num_workers=num_workers)
    return detection_metrics(predictions, ground_truth_boxes(dataset))


def make_val_fn(dataset: DetectionDataset, *, batch_size: int = 16,
                num_workers: int | str = "auto") -> Callable[[torch.nn.Module], dict]:
    """The trainer's ``val_fn``: model -> metrics dict (:func:`detection_metrics`); ``val_fn.size`` is the number
    of images it validates (the trainer's ``val_every: auto`` reads it)."""

    def val_fn(model: torch.nn.Module) -> dict:
        return validate(model, dataset, batch_size=batch_size, num_workers=num_workers)

    val_fn.size = len(dataset)
    return val_fn
