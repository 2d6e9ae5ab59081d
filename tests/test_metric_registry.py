"""The metric registry: a new validation metric is one function and one register_metric call, nothing else. It is
computed by its level's validation, logged in metrics.jsonl after the built-in metrics, and accepted as
best_metric; the built-in families give the keys, in the order, the validation always logged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from comoto_cli.config import DistillConfig, InferenceConfig, TeacherConfig
from comoto_cli.errors import UsageError
from comoto_cli.metrics import registry
from comoto_cli.metrics.registry import MetricFamily, compute_metrics, metric_names, output_names, register_metric
from tests.conftest import TINY_MODEL, build_tiny_cache

IMAGE_METRICS = ("sensitivity_at_1_fp", "sensitivity_at_2_fp", "sensitivity_at_3_fp", "sensitivity_at_4_fp",
                 "mean_sensitivity", "map", "ap_10", "ap_50", "mar")
VOLUME_METRICS = ("sensitivity_at_2_fps_all", "sensitivity_at_1_fps_positive", "sensitivity_at_2_fps_positive",
                  "sensitivity_at_3_fps_positive", "sensitivity_at_4_fps_positive", "mean_sensitivity_positive",
                  "num_predictions")


@pytest.fixture
def registry_restored():
    """Metric families registered by a test are forgotten after it."""
    with registry._FAMILIES.restored():
        yield


def test_built_in_families_give_the_validation_keys_in_order():
    assert metric_names("image") == IMAGE_METRICS
    assert output_names("image") == (*IMAGE_METRICS, "num_images", "num_lesions")
    assert metric_names("volume") == output_names("volume") == VOLUME_METRICS
    truth = [np.array([[10.0, 10.0, 20.0, 20.0]]), np.zeros((0, 4))]
    perfect = [{"boxes": g.copy(), "scores": np.full(len(g), 0.9)} for g in truth]
    assert tuple(compute_metrics("image", perfect, truth)) == output_names("image")


def _toy_image(predictions, ground_truth):
    """Mean number of detections per image."""
    return {"toy_detections": float(np.mean([len(p["scores"]) for p in predictions]))}


def test_a_registered_image_metric_is_validated_logged_and_picks_best(tmp_path, registry_restored):
    from comoto_cli.engine.distill import check_distill_config
    from comoto_cli.engine.teacher import check_teacher_config, run_train_teacher

    calls = []

    def falling(predictions, ground_truth):  # 1.0, then 0.5: the first validated epoch is the best
        calls.append(len(ground_truth))
        return {"toy_score": 1.0 / len(calls)}

    register_metric(MetricFamily(name="toy", level="image", names=("toy_score",), compute=falling))
    assert metric_names("image")[-1] == "toy_score" and "toy_score" not in metric_names("volume")
    cache = build_tiny_cache(tmp_path / "mammo.h5", train=8, val=4)
    config = TeacherConfig.model_validate({
        "model": TINY_MODEL, "optim": {"name": "adamw", "lr": 1e-3, "scheduler": "none"}, "epochs": 2,
        "batch_size": 4, "val_batch_size": 8, "impa": False, "best_metric": "toy_score",
        "cache": str(cache), "out": str(tmp_path / "run")})
    check_teacher_config(config)
    summary = run_train_teacher(config)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [tuple(line["val"]) for line in history] == [(*output_names("image"),)] * 2
    assert list(history[0]["val"])[-1] == "toy_score" and calls == [4, 4]
    assert [line["val"]["toy_score"] for line in history] == [1.0, 0.5]
    assert summary["best_metric"] == "toy_score" and summary["best_epoch"] == 1
    # The student validates volumes: it does not accept an image metric.
    with pytest.raises(UsageError, match="not a validation metric of distill"):
        check_distill_config(DistillConfig.model_validate({"mode": "none", "cache": "x", "out": "y",
                                                           "best_metric": "toy_score"}))


def test_a_registered_volume_metric_is_in_the_students_validation(tmp_path, registry_restored):
    from comoto_cli.cache import SliceCache
    from comoto_cli.engine.distill import check_distill_config, make_volume_val_fn
    from comoto_cli.networks.detector import build_detector
    from tests.conftest import tiny_model_config

    def lesion_volumes(predictions, ground_truth):
        boxes, labels = ground_truth
        return {"toy_lesion_volumes": len(set(boxes["StudyUID"])) / len(labels["StudyUID"])}

    register_metric(MetricFamily(name="toy_volumes", level="volume", names=("toy_lesion_volumes",),
                                 compute=lesion_volumes))
    check_distill_config(DistillConfig.model_validate({"mode": "none", "cache": "x", "out": "y",
                                                       "best_metric": "toy_lesion_volumes"}))
    cache = SliceCache(build_tiny_cache(tmp_path / "dbt.h5", train=4, val=4, modality="dbt"))
    torch.manual_seed(0)
    model = build_detector(tiny_model_config(), (64, 64)).eval()
    metrics = make_volume_val_fn(cache, InferenceConfig(batch_size=4, num_workers=0))(model)
    assert tuple(metrics) == (*VOLUME_METRICS, "toy_lesion_volumes")
    assert metrics["toy_lesion_volumes"] == pytest.approx(3 / 4)  # every 4th tiny image is lesion-free


def test_registration_is_checked(registry_restored):
    register_metric(MetricFamily(name="toy", level="image", names=("toy_detections",), compute=_toy_image))
    with pytest.raises(ValueError, match="already registered"):
        register_metric(MetricFamily(name="toy", level="image", names=("other",), compute=_toy_image))
    with pytest.raises(ValueError, match="already produced"):
        register_metric(MetricFamily(name="again", level="image", names=("map",), compute=_toy_image))
    with pytest.raises(ValueError, match="level"):
        register_metric(MetricFamily(name="flat", level="pixel", names=("x",), compute=_toy_image))
    # The trainer reads "loss" in a name as lower-is-better: the family must say the same.
    with pytest.raises(ValueError, match="higher_is_better"):
        register_metric(MetricFamily(name="fp", level="image", names=("false_positives",), compute=_toy_image,
                                     higher_is_better=False))
    with pytest.raises(ValueError, match="higher_is_better"):
        register_metric(MetricFamily(name="l", level="image", names=("box_loss",), compute=_toy_image))
    register_metric(MetricFamily(name="l", level="image", names=("box_loss",), compute=lambda p, g: {"box_loss": 0.0},
                                 higher_is_better=False))
    assert "box_loss" in metric_names("image")
    # A family returning other keys than it registered is an error, not a silently missing metric.
    register_metric(MetricFamily(name="liar", level="image", names=("a",), compute=lambda p, g: {"b": 1.0}))
    with pytest.raises(ValueError, match="liar"):
        compute_metrics("image", [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0)}], [np.zeros((0, 4))])


def test_unselectable_keys_are_logged_but_not_best_metric():
    from comoto_cli.engine.teacher import check_teacher_config

    config = TeacherConfig.model_validate({"cache": "x", "out": "y", "best_metric": "num_images"})
    with pytest.raises(UsageError, match="not a validation metric of train-teacher"):
        check_teacher_config(config)
    assert "num_images" in output_names("image")


def test_the_registry_module_is_where_the_trainer_reads_directions():
    from comoto_cli.engine.trainer import metric_improved

    for family in registry.registered_metrics():
        for name in family.names:
            assert metric_improved(2.0, 1.0, name) is family.higher_is_better, name

