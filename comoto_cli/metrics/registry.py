"""The validation metrics, registered by family: the one place that says what a training run scores.

A :class:`MetricFamily` names the level it scores, the keys it produces and the function that computes them:

``image``   every epoch of ``train-teacher`` (:mod:`comoto_cli.evaluation.validation`, also ``comoto evaluate
            --checkpoint`` on a mammography cache). ``compute(predictions, ground_truth)``: ``predictions[i] =
            {"boxes": (k, 4) xyxy, "scores": (k,)}`` numpy arrays and ``ground_truth[i]`` (m, 4) xyxy boxes of image
            i of the split, both in cache pixels.
``volume``  every epoch of ``distill`` (its ``val_fn``, :mod:`comoto_cli.engine.distill`). ``compute(predictions,
            ground_truth)``: the DBTex predictions table of full-volume inference and ``(boxes, labels)``, the
            split's DBTex boxes and labels tables (column dicts, :mod:`comoto_cli.data.tables`; official frame).

Validation computes every family of its level, in registration order, and writes the keys in the order each family
declares them: that is the order of the ``val`` entry of ``metrics.jsonl``. Every key of a ``selectable`` family
may be the run's ``best_metric`` (``TrainConfig.require_metric`` reads :func:`metric_names`). The trainer picks
``best.pt`` by a strict improvement, lower being better for a name containing "loss" and higher for any other
(``metric_improved`` in :mod:`comoto_cli.engine.trainer`); ``higher_is_better`` states the family's direction and
registration refuses names the trainer would read the other way. A value may be None (undefined, e.g. no lesion):
it is logged as null and never improves the best.

Adding a metric is a function and one :func:`register_metric` call: here for a built-in family, or in a module of
one's own imported before the run starts. The metric functions must not draw random numbers (validation runs
between training epochs and would shift the training trajectory).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from comoto_cli.metrics.coco import COCO_KEYS, coco_metrics
from comoto_cli.metrics.dbtex import METRIC_KEYS, DbtexTables, dbtex_counts, dbtex_metrics
from comoto_cli.metrics.image_froc import FROC_KEYS, froc_metrics
from comoto_cli.utils.registry import Registry

Level = Literal["image", "volume"]
LEVELS: tuple[str, ...] = ("image", "volume")
Compute = Callable[[Any, Any], dict]


@dataclass(frozen=True)
class MetricFamily:
    """One family of validation metrics.

    ``name``: the family's name (registry key); ``level``: "image" (the teacher) or "volume" (the student);
    ``names``: the keys ``compute`` returns, in the order they are logged; ``compute(predictions, ground_truth)``:
    a dict with exactly those keys (floats, ints or None), see the module docstring for each level's arguments;
    ``higher_is_better``: the direction of every key; ``selectable``: whether they may be ``best_metric`` (False for
    sizes logged alongside, such as the number of validation images); ``description``: one line.
    """

    name: str
    level: Level
    names: tuple[str, ...]
    compute: Compute
    higher_is_better: bool = True
    selectable: bool = True
    description: str = ""


_FAMILIES: Registry[MetricFamily] = Registry("metric family")
_NAME = re.compile(r"[a-z0-9][a-z0-9_]*")


def register_metric(family: MetricFamily) -> MetricFamily:
    """Make ``family`` part of its level's validation and its keys possible ``best_metric`` values."""
    if not _NAME.fullmatch(family.name):
        raise ValueError(f"metric family name {family.name!r}: lower-case letters, digits and '_' only")
    if family.level not in LEVELS:
        raise ValueError(f"metric family {family.name!r}: level must be one of {', '.join(LEVELS)}")
    if not callable(family.compute):
        raise ValueError(f"metric family {family.name!r}: compute must be a function (predictions, ground_truth)")
    names = tuple(family.names)
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and _NAME.fullmatch(n) for n in names):
        raise ValueError(f"metric family {family.name!r}: names must be distinct, non-empty, lower-case keys")
    taken = set(output_names(family.level))
    if taken.intersection(names):
        raise ValueError(f"metric family {family.name!r}: {', '.join(sorted(taken.intersection(names)))} already "
                         f"produced at level {family.level}")
    # The trainer reads the direction from the name (engine.trainer.metric_improved): say the same here.
    wrong_way = [name for name in names if ("loss" in name) == family.higher_is_better]
    if wrong_way:
        raise ValueError(f"metric family {family.name!r}: the trainer takes a key containing 'loss' as lower-is-better "
                         f"and any other as higher-is-better; {', '.join(wrong_way)} contradict "
                         f"higher_is_better={family.higher_is_better}")
    return _FAMILIES.add(family.name, replace(family, names=names))


def get_metric_family(name: str) -> MetricFamily:
    return _FAMILIES.lookup(name)


def registered_metrics(level: str | None = None) -> list[MetricFamily]:
    """The families of ``level`` (every family when None), in registration order."""
    return [family for family in _FAMILIES.values() if level is None or family.level == level]


def output_names(level: str) -> tuple[str, ...]:
    """Every key :func:`compute_metrics` returns at ``level``, in order."""
    return tuple(name for family in registered_metrics(level) for name in family.names)


def metric_names(level: str) -> tuple[str, ...]:
    """The keys that may be ``best_metric`` of a run validated at ``level``, in order."""
    return tuple(name for family in registered_metrics(level) if family.selectable for name in family.names)


def compute_metrics(level: str, predictions, ground_truth) -> dict:
    """Every family of ``level`` on ``predictions`` against ``ground_truth``: one dict, keys in the order of
    :func:`output_names`."""
    if level not in LEVELS:
        raise ValueError(f"metric level {level!r}: one of {', '.join(LEVELS)}")
    metrics: dict = {}
    for family in registered_metrics(level):
        values = family.compute(predictions, ground_truth)
        if set(values) != set(family.names):
            raise ValueError(f"metric family {family.name!r} returned {', '.join(sorted(values)) or 'nothing'}; "
                             f"it is registered with {', '.join(family.names)}")
        metrics.update((name, values[name]) for name in family.names)
    return metrics


# ---------------------------------------------------------------------------------------------- built-in families
def image_counts(predictions, ground_truth) -> dict:
    """The size of the validation split: images and ground-truth boxes."""
    return {"num_images": len(ground_truth), "num_lesions": int(sum(len(g) for g in ground_truth))}


def volume_prediction_count(predictions, ground_truth) -> dict:
    """How many detections the student made on the validation volumes."""
    boxes, labels = ground_truth
    tables = DbtexTables(predictions=predictions, boxes=boxes, labels=labels)
    return {"num_predictions": int(dbtex_counts(tables).get("predictions", 0))}


register_metric(MetricFamily(
    name="froc", level="image", names=FROC_KEYS, compute=froc_metrics,
    description="per-image FROC: sensitivity at 1-4 false positives per image and their mean"))
register_metric(MetricFamily(
    name="coco", level="image", names=COCO_KEYS, compute=coco_metrics,
    description="COCO AP over IoU 0.10:0.05:0.50, AP at IoU 0.10 and 0.50, mean recall (MONAI)"))
register_metric(MetricFamily(
    name="image_counts", level="image", names=("num_images", "num_lesions"), compute=image_counts, selectable=False,
    description="validation images and ground-truth boxes"))
register_metric(MetricFamily(
    name="dbtex", level="volume", names=METRIC_KEYS, compute=dbtex_metrics,
    description="the DBTex challenge metric: sensitivity at 2 FP per volume (all) and at 1-4 (positive volumes)"))
register_metric(MetricFamily(
    name="predictions", level="volume", names=("num_predictions",), compute=volume_prediction_count,
    description="number of detections on the validation volumes"))
