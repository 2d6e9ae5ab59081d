"""What distillation sees: the distilled map's size against the lesions, and per epoch how peaked the teacher's
target is, how large the KD term is against the detection loss and how far the student moved.

A KL between softened point distributions carries lesion information only when (a) the P points of a lesion fall
in different cells of the map, and (b) the teacher's features differ between those points enough, at temperature
T, for softmax(points / T) to be far from uniform. Neither is visible in the loss curve, so ``distill`` measures
both (docs/design.md, "What distillation sees"):

* ``map_shape``, ``stride``: the distilled map of the student's input.
* ``cells_per_lesion_median``: distinct cells the P points of a training lesion fall in (1 to P), over the kept
  training lesions, computed once; ``cells_per_axis_median``: the median lesion's shorter side in map cells (the
  measure ``model.distill_feature: auto`` chooses by).
* ``teacher_entropy_ratio``: per step, the entropy of softmax(teacher points / T) over the P points, divided by
  log P and averaged over channels; the epoch mean. 1.0: the student is asked to match a flat distribution.
* ``kd_to_detection``: the epoch's mean KD term over its mean detection loss, on the steps that had a KD term.
* ``lesion_step_share``: the share of the epoch's steps that had lesion points on both sides (LsKD skips the rest).
* ``student_drift``: ||w - w0|| / ||w0|| over the student's floating-point weights, w0 its weights at the start.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from comoto_cli.config import ModelConfig
from comoto_cli.engine.distributed import sum_across_ranks
from comoto_cli.errors import UsageError
from comoto_cli.losses import point_cells
from comoto_cli.networks.backbone import AUTO_FEATURE, cells_per_axis, choose_distill_feature, map_shape

# Below this many cells per axis, the P points of the median lesion share cells: the warning threshold.
COARSE_MAP_CELLS = 2.0


def training_boxes(cache, rows: np.ndarray) -> np.ndarray:
    """(M, 4) xyxy cache-pixel boxes of the slices ``rows`` (a lesion on several slices counts once a slice)."""
    boxes = [cache.boxes(int(row)) for row in rows]
    boxes = [b for b in boxes if len(b)]
    return np.concatenate(boxes).astype(np.float64) if boxes else np.zeros((0, 4))


def shorter_sides(boxes: np.ndarray) -> np.ndarray:
    """(M,) the shorter side of each xyxy box, in pixels."""
    return np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def distinct_cells(boxes: np.ndarray, shape: tuple[int, int], image_width: int, num_points: int) -> np.ndarray:
    """(M,) how many distinct cells of an (h, w) map the P lesion points of each box fall in."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    rows, cols = point_cells(torch.as_tensor(boxes, dtype=torch.float32), shape, image_width, num_points)
    flat = (rows * shape[1] + cols).T.numpy()  # (M, P)
    return np.array([len(np.unique(points)) for points in flat], dtype=np.int64)


def entropy_ratio(points: Tensor, temperature: float) -> float:
    """Mean over channels of H(softmax(points / T)) / log P for (C, P) points: 1.0 is a flat target; nan for P = 1
    (one point: no distribution to be flat or peaked)."""
    if points.shape[1] < 2:
        return float("nan")
    probabilities = torch.softmax(points.detach().float() / temperature, dim=1)
    entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-30))).sum(dim=1)
    return float((entropy / math.log(points.shape[1])).mean())


def _weights(model: nn.Module):
    return (value.detach() for value in model.state_dict().values() if value.is_floating_point())


def weight_vector(model: nn.Module) -> Tensor:
    """The model's floating-point parameters and buffers, flattened and copied (fp32, CPU)."""
    return torch.cat([value.float().flatten().cpu() for value in _weights(model)])


def relative_drift(model: nn.Module, start: Tensor) -> float:
    """||w - w0|| / ||w0||, one tensor at a time: no second copy of the weights (118 MiB for the default
    ResNet-50 detector)."""
    squared, offset = 0.0, 0
    for value in _weights(model):
        count = value.numel()
        reference = start[offset:offset + count].to(value.device)
        squared += float((value.float().flatten() - reference).square().sum())
        offset += count
    return math.sqrt(squared) / float(torch.linalg.vector_norm(start))


def coarse_map_warning(name: str, cells: float, config: ModelConfig, lesion_sides: list[np.ndarray],
                       image_widths: list[int], *, from_teacher: bool = False) -> str | None:
    """One line when the median training lesion spans fewer than 2 cells per axis of the map ``name``, naming the
    map that would reach 2 (the rule of ``distill_feature: auto``); None otherwise. ``from_teacher``: the map is
    the teacher's (a student started from it distils on it), so the advice is to train the teacher on the other."""
    if cells >= COARSE_MAP_CELLS:
        return None
    fit, stride, fit_cells = choose_distill_feature(config, lesion_sides, image_widths, COARSE_MAP_CELLS)
    where = "train the teacher with" if from_teacher else "set"
    advice = (f"{fit} (stride {stride}) would give {fit_cells:.1f}: {where} model.distill_feature {fit} (or auto)"
              if fit_cells >= COARSE_MAP_CELLS else f"even the finest map, {fit}, gives {fit_cells:.1f}")
    return (f"warning: the median training lesion spans {cells:.1f} cells per axis of the distilled map {name}; "
            f"its lesion points mostly share cells. {advice}")


class DistillDiagnostics:
    """The ``distill_diagnostics`` of every epoch line: the map facts once, the step sums per epoch.

    ``observe_step`` is called for every training step (``kd`` and ``detection`` the step's terms, ``teacher``
    its (C, P) teacher points, or None on a step without a KD term); ``epoch_report`` closes the epoch."""

    def __init__(self, static: dict, model: nn.Module, temperature: float, distils: bool = True):
        self.static = static
        self.model = model
        self.temperature = temperature
        self.distils = distils  # False: a mode without a KD term (its KD keys are None)
        self.start = weight_vector(model)
        self._epoch = None
        self._reset()

    def _reset(self) -> None:
        self.steps = self.kd_steps = 0
        self.kd_sum = self.detection_sum = self.entropy_sum = 0.0
        self.entropy_steps = 0

    def observe_step(self, epoch: int, kd: Tensor | None, detection: Tensor | None, teacher: Tensor | None) -> None:
        if epoch != self._epoch:  # a resumed run redoes its epoch from the start
            self._epoch = epoch
            self._reset()
        self.steps += 1
        if kd is not None and detection is not None:
            self.kd_steps += 1
            self.kd_sum += float(kd.detach())
            self.detection_sum += float(detection.detach())
        if teacher is not None:
            self.entropy_steps += 1
            self.entropy_sum += entropy_ratio(teacher, self.temperature)

    def epoch_report(self, epoch: int) -> dict:
        """The epoch's ``distill_diagnostics``, its step sums added over every rank (a collective under DDP)."""
        mine = epoch == self._epoch
        names = ("steps", "kd_steps", "kd_sum", "detection_sum", "entropy_sum", "entropy_steps")
        sums = sum_across_ranks({name: float(getattr(self, name)) if mine else 0.0 for name in names})
        distils = self.distils and sums["steps"] > 0
        return {"distill_diagnostics": {
            **self.static,
            "teacher_entropy_ratio": sums["entropy_sum"] / sums["entropy_steps"] if sums["entropy_steps"] else None,
            "kd_to_detection": (sums["kd_sum"] / sums["detection_sum"]
                                if sums["kd_steps"] and sums["detection_sum"] > 0 else None),
            "lesion_step_share": sums["kd_steps"] / sums["steps"] if distils else None,
            "student_drift": relative_drift(self.model, self.start),
        }}


def map_facts(name: str, stride: int, image_size: tuple[int, int], boxes: np.ndarray, num_points: int) -> dict:
    """The distilled map's shape and how the training lesions ``boxes`` sit on it."""
    shape = map_shape(image_size, stride)
    cells = distinct_cells(boxes, shape, image_size[1], num_points)
    axis = cells_per_axis(shorter_sides(boxes), image_size[1], stride)
    return {"map": name, "map_shape": list(shape), "stride": stride, "training_lesions": int(len(boxes)),
            "cells_per_lesion_median": float(np.median(cells)) if len(cells) else None,
            "cells_per_axis_median": float(np.median(axis)) if len(axis) else None}


__all__ = [
    "COARSE_MAP_CELLS",
    "DistillDiagnostics",
    "coarse_map_warning",
    "describe_choice",
    "describe_diagnostics",
    "distinct_cells",
    "entropy_ratio",
    "map_facts",
    "relative_drift",
    "resolve_distill_feature",
    "shorter_sides",
    "training_boxes",
    "weight_vector",
]


def resolve_distill_feature(config: ModelConfig, sources: list[tuple]) -> tuple[ModelConfig, dict | None]:
    """``config`` (a ModelConfig) with ``distill_feature: auto`` replaced by the map
    :func:`~comoto_cli.networks.backbone.choose_distill_feature` picks from the training boxes of ``sources``
    ((cache, rows) pairs), and what was chosen (None when the field names a map already)."""
    if config.distill_feature != AUTO_FEATURE:
        return config, None
    sides = [shorter_sides(training_boxes(cache, rows)) for cache, rows in sources]
    widths = [cache.image_width for cache, _ in sources]
    try:
        name, stride, cells = choose_distill_feature(config, sides, widths, config.distill_min_cells)
    except ValueError:
        raise UsageError("model.distill_feature auto: the training split holds no lesion box to size the map by; "
                         "name a map instead", path=sources[0][0].path) from None
    choice = {"distill_feature": AUTO_FEATURE, "chosen": name, "stride": stride, "cells_per_axis_median": cells,
              "min_cells": config.distill_min_cells}
    return config.model_copy(update={"distill_feature": name}), choice


def describe_choice(choice: dict) -> str:
    """The console line for an ``auto`` distillation map."""
    return (f"distill_feature auto: {choice['chosen']} (stride {choice['stride']}), where the median training lesion "
            f"spans {choice['cells_per_axis_median']:.1f} cells per axis (distill_min_cells {choice['min_cells']:g})")


def describe_diagnostics(report: dict) -> str:
    """The run summary's line for the last epoch's ``distill_diagnostics``."""
    def number(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}g}"

    height, width = report["map_shape"]
    return (f"distillation: map {report['map']} {height}x{width} (stride {report['stride']}), training lesion points "
            f"in a median {number(report['cells_per_lesion_median'])} cells "
            f"({number(report['cells_per_axis_median'])} per axis); teacher target entropy "
            f"{number(report['teacher_entropy_ratio'])} of flat, KD / detection {number(report['kd_to_detection'])}, "
            f"{'n/a' if report['lesion_step_share'] is None else format(report['lesion_step_share'], '.0%')} of "
            f"steps with lesion points, student drift "
            f"{number(report['student_drift'])}")
