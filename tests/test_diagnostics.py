"""What distillation sees (comoto_cli.engine.diagnostics): lesion cells on a known map, the ``auto`` map choice, the
teacher target's entropy, and ``distill_diagnostics`` in a tiny run's metrics.jsonl."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from comoto_cli.config import DistillConfig, TeacherConfig
from comoto_cli.engine.diagnostics import (
    coarse_map_warning,
    distinct_cells,
    entropy_ratio,
    map_facts,
    relative_drift,
    weight_vector,
)
from comoto_cli.engine.distill import run_distill
from comoto_cli.engine.teacher import run_train_teacher
from comoto_cli.errors import UsageError
from comoto_cli.losses import lesion_points
from comoto_cli.networks.backbone import cells_per_axis, choose_distill_feature, map_shape
from comoto_cli.networks.detector import build_detector
from tests.conftest import TINY_TRAIN, tiny_model_config

DIAGNOSTIC_KEYS = {"map", "map_shape", "stride", "cells_per_lesion_median", "cells_per_axis_median",
                   "teacher_entropy_ratio", "kd_to_detection", "lesion_step_share", "student_drift"}


# ---------------------------------------------------------------------------------------------- the map and lesions
@pytest.mark.parametrize(("box", "cells"), [
    ((0, 0, 7, 7), 1),        # inside one 8-px cell: all nine points in it
    ((0, 0, 16, 16), 9),      # cells 0..2 on both axes: corners, centre and midpoints all apart
    ((0, 0, 8, 20), 6),       # columns {0, 1} (the centre truncates to 0), rows {0, 1, 2}
    ((60, 60, 200, 200), 1),  # clamped into the last cell of an 8 x 8 map
])
def test_distinct_cells_on_a_known_map(box, cells):
    # A 64 x 64 image at stride 8: an 8 x 8 map, 8 px a cell.
    assert map_shape((64, 64), 8) == (8, 8)
    assert distinct_cells(np.array([box], float), (8, 8), 64, 9).tolist() == [cells]


def test_distinct_cells_are_the_cells_lesion_points_read():
    """The count is taken on the cells lesion_points samples: a map whose every cell holds its own value gives as
    many distinct point values as distinct cells."""
    rng = np.random.default_rng(0)
    features = torch.arange(8 * 8, dtype=torch.float32).reshape(1, 1, 8, 8)
    for _ in range(20):
        x0, y0 = rng.uniform(0, 50, 2)
        box = np.array([[x0, y0, x0 + rng.uniform(1, 30), y0 + rng.uniform(1, 30)]])
        points = lesion_points(features, [torch.as_tensor(box, dtype=torch.float32)], (64, 64), 9)
        assert len(torch.unique(points)) == distinct_cells(box, (8, 8), 64, 9)[0]


def test_map_shape_matches_the_network():
    for name, stride in (("fpn1", 16), ("backbone", 32), ("pool", 64)):
        detector = build_detector(tiny_model_config(distill_feature=name), (128, 192))
        assert detector.distill_features(torch.zeros(1, 1, 128, 192)).shape[-2:] == map_shape((128, 192), stride)


@pytest.mark.parametrize(("side", "expected"), [
    (70.0, "backbone"),  # stride 32: 70 * 6 / 192 = 2.2 cells; the ResNet stage before the FPN level at equal stride
    (40.0, "fpn1"),      # stride 32: 1.25; stride 16: 2.5
    (20.0, "fpn0"),      # stride 16: 1.25; stride 8: 2.5
    (5.0, "fpn0"),       # no map reaches 2 cells: the finest
])
def test_auto_picks_the_coarsest_map_the_median_lesion_fits(side, expected):
    config = tiny_model_config(returned_layers=[2, 3, 4])
    sides = np.array([side * 0.5, side, side, side * 3])  # median = side
    name, stride, cells = choose_distill_feature(config, [sides], [192], 2.0)
    assert name == expected
    assert cells == pytest.approx(float(np.median(cells_per_axis(sides, 192, stride))))


def test_auto_fits_the_smallest_lesions_of_all_caches():
    config = tiny_model_config(returned_layers=[2, 3, 4])
    large, small = np.full(5, 70.0), np.full(5, 20.0)
    assert choose_distill_feature(config, [large], [192], 2.0)[0] == "backbone"
    assert choose_distill_feature(config, [large, small], [192, 192], 2.0)[0] == "fpn0"
    assert choose_distill_feature(config, [large, np.zeros(0)], [192, 192], 2.0)[0] == "backbone"
    with pytest.raises(ValueError, match="no training lesion"):
        choose_distill_feature(config, [np.zeros(0)], [192], 2.0)


def test_a_too_coarse_map_warns_naming_the_map_that_fits():
    config = tiny_model_config(returned_layers=[2, 3, 4])
    sides = [np.full(3, 20.0)]
    line = coarse_map_warning("backbone", 0.6, config, sides, [192])
    assert line.startswith("warning:") and "\n" not in line
    assert "0.6 cells per axis" in line and "fpn0 (stride 8) would give 2.5" in line
    assert coarse_map_warning("fpn0", 2.5, config, sides, [192]) is None


def test_map_facts_counts_the_training_lesions():
    boxes = np.array([[0, 0, 16, 16], [0, 0, 7, 7], [0, 0, 8, 20]], float)
    facts = map_facts("fpn0", 8, (64, 64), boxes, 9)
    assert facts["map_shape"] == [8, 8] and facts["training_lesions"] == 3
    assert facts["cells_per_lesion_median"] == 6.0
    assert facts["cells_per_axis_median"] == pytest.approx(8 / 8)  # shorter sides 16, 7, 8 -> median 8 px


# ---------------------------------------------------------------------------------------------- per step
def test_entropy_ratio_is_one_for_a_flat_target_and_small_for_a_peaked_one():
    flat = torch.full((4, 9), 0.66)
    assert entropy_ratio(flat, 4.0) == pytest.approx(1.0)
    peaked = torch.zeros(4, 9)
    peaked[:, 4] = 100.0
    assert entropy_ratio(peaked, 4.0) < 0.01
    # A lower temperature sharpens the same points.
    points = torch.randn(16, 9)
    assert entropy_ratio(points, 0.25) < entropy_ratio(points, 4.0) < 1.0
    assert math.isclose(entropy_ratio(points * 0 + 1, 0.1), 1.0, rel_tol=1e-6)


def test_relative_drift():
    model = torch.nn.Linear(3, 2)
    start = weight_vector(model)
    assert relative_drift(model, start) == 0.0
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)
    assert relative_drift(model, start) == pytest.approx(0.5, rel=1e-5)


# ---------------------------------------------------------------------------------------------- in a distill run
def _student(tiny_caches, teacher, out, mode="lesion", **changes) -> DistillConfig:
    return DistillConfig.model_validate({**TINY_TRAIN, "cache": str(tiny_caches["dbt"]), "teacher": str(teacher),
                                         "teacher_cache": str(tiny_caches["mammo"]), "out": str(out), "mode": mode,
                                         **changes})


@pytest.mark.trained
@pytest.mark.parametrize("mode", ["lesion", "pretrain"])
def test_every_epoch_line_has_distill_diagnostics(tmp_path, tiny_caches, tiny_teacher, mode, capsys):
    out = tmp_path / mode
    run_distill(_student(tiny_caches, tiny_teacher, out, mode))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        report = line["distill_diagnostics"]
        assert set(report) >= DIAGNOSTIC_KEYS
        assert report["map"] == "backbone" and report["stride"] == 32
        assert report["map_shape"] == [4, 4]  # 128 x 128 at stride 32
        assert 1 <= report["cells_per_lesion_median"] <= 9
        assert report["student_drift"] > 0
        if mode == "lesion":
            assert 0 < report["lesion_step_share"] <= 1
            assert 0 < report["teacher_entropy_ratio"] <= 1
            assert report["kd_to_detection"] > 0
            assert report["teacher_cells_per_lesion_median"] >= 1
        else:
            assert report["lesion_step_share"] is None  # no KD term to have lesion points for
            assert report["teacher_entropy_ratio"] is None and report["kd_to_detection"] is None
    # The student moves further from its start over training.
    assert lines[1]["distill_diagnostics"]["student_drift"] > lines[0]["distill_diagnostics"]["student_drift"]
    printed = capsys.readouterr().out
    assert "distillation: map backbone 4x4 (stride 32)" in printed
    # The too-coarse warning is for a mode that distils; pretraining reads no lesion points.
    assert ("warning: the median" in printed) == (mode == "lesion")


@pytest.mark.trained
def test_the_tiny_lesions_on_layer4_warn(tmp_path, tiny_caches, tiny_teacher, capsys):
    # The tiny set's lesions are well under 64 px, 2 cells of a stride-32 map at 128 x 128.
    run_distill(_student(tiny_caches, tiny_teacher, tmp_path / "run", epochs=1))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: the median")]
    assert len(warnings) == 1 and "of the distilled map backbone" in warnings[0]


@pytest.mark.trained
def test_auto_teacher_and_student_agree_and_a_mismatch_is_one_usage_error(tmp_path, tiny_caches):
    model = {**TINY_TRAIN["model"], "distill_feature": "auto"}
    teacher_out = tmp_path / "teacher"
    run_train_teacher(TeacherConfig.model_validate({**TINY_TRAIN, "epochs": 1, "model": model,
                                                    "cache": str(tiny_caches["mammo"]), "out": str(teacher_out)}))
    from comoto_cli.networks.checkpoint import load_checkpoint

    teacher = load_checkpoint(teacher_out / "best.pt")
    chosen = teacher["metadata"]["distill_feature_choice"]["chosen"]
    assert teacher["model_config"].distill_feature == chosen != "auto"
    # A student left unset distils on the teacher's map; one naming another map is refused in one line.
    student = _student(tiny_caches, teacher_out / "best.pt", tmp_path / "same", epochs=1)
    run_distill(student)
    assert load_checkpoint(tmp_path / "same" / "best.pt")["model_config"].distill_feature == chosen
    other = "backbone" if chosen != "backbone" else "fpn0"
    with pytest.raises(UsageError) as error:
        run_distill(_student(tiny_caches, teacher_out / "best.pt", tmp_path / "other", epochs=1,
                             model={**TINY_TRAIN["model"], "distill_feature": other}))
    message = str(error.value)
    assert "\n" not in message and f"trained on the distillation map {chosen!r}" in message and other in message
    assert not (tmp_path / "other" / "last.pt").exists()


def test_feature_maps_are_every_candidate_at_its_stride():
    from comoto_cli.networks.backbone import distill_candidates

    config = tiny_model_config()
    detector = build_detector(config, (128, 192))
    maps = detector.backbone.feature_maps(torch.zeros(2, 1, 128, 192))
    assert set(maps) == {name for name, _ in distill_candidates(config)}
    for name, stride in distill_candidates(config):
        assert tuple(maps[name].shape[-2:]) == map_shape((128, 192), stride)
    assert torch.equal(maps["backbone"], detector.distill_features(torch.zeros(2, 1, 128, 192)))
