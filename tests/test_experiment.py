"""`comoto experiment`: a miniature comparison runs end to end, writes its table and resumes without redoing."""

from __future__ import annotations

import csv
import json
import math

import pytest

from comoto_cli.cache import SliceCache
from comoto_cli.cli import main
from comoto_cli.config import ExperimentConfig
from comoto_cli.errors import UsageError
from comoto_cli.experiment import evaluation_config, method_label, patients_for_half_width, seed_half_width, seed_interval
from tests.conftest import TINY_CACHE_SIZE, TINY_TRAIN


def test_seed_interval():
    mean, low, high = seed_interval([0.5, 0.7, 0.6])
    assert mean == pytest.approx(0.6) and low < 0.6 < high
    assert seed_interval([0.4]) == (0.4, 0.4, 0.4)
    assert seed_interval([0.0, 1.0]) == (0.5, 0.0, 1.0)  # clipped to the range of a sensitivity
    assert seed_half_width([0.1, 0.3]) == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))
    assert math.isnan(seed_half_width([0.2]))


def test_patients_for_a_half_width_scale_as_a_standard_error():
    assert patients_for_half_width(0.025, 40, 0.025) == 40
    assert patients_for_half_width(0.05, 40, 0.025) == 160  # half the width: four times the patients
    assert patients_for_half_width(0.0125, 40, 0.025) == 10
    assert patients_for_half_width(0.1, 7, 0.025) == 112
    assert patients_for_half_width(float("nan"), 40, 0.025) is None


@pytest.mark.trained
def test_miniature_experiment(tmp_path, tiny_synth, capsys):
    split = {"val_fraction": 0.25, "test_fraction": 0.25}
    config = {
        "out": str(tmp_path / "exp"),
        "synth": None,
        "dbt_root": str(tiny_synth / "dbt"),
        "mammo_root": str(tiny_synth / "mammo"),
        "preprocess_dbt": {**TINY_CACHE_SIZE, "workers": 1, "split": split},
        "preprocess_mammo": {**TINY_CACHE_SIZE, "workers": 1, "split": split},
        "teacher": {**TINY_TRAIN, "epochs": 1},
        "student": {**TINY_TRAIN, "epochs": 1},
        "methods": ["none", "lesion+impa"],
        "train_ratios": [1.0],
        "seeds": [0],
        "bootstrap": 20,
        "inference": {"skip_edge_slices": 1, "nms_window_slices": "detected"},
    }
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(config))
    with pytest.raises(SystemExit) as info:
        main(["experiment", str(path)])
    assert info.value.code == 0
    out = tmp_path / "exp"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["method"] for row in rows] == ["none", "lesion+impa"]
    for row in rows:
        assert 0.0 <= float(row["mean_sensitivity_positive"]) <= 1.0
    assert (out / "results.png").stat().st_size > 0
    assert "LsKD + ImPA" in (out / "results.md").read_text()
    assert (out / "teachers" / "impa" / "best.pt").exists() and not (out / "teachers" / "plain").exists()
    # The paired comparison with DBT only (pretraining is not among the methods): recomputed from the runs' saved
    # predictions, it is the difference of their scores on the same seed.
    # The experiment's inference settings reach every student's validation and its test evaluation.
    run = out / "students" / "none_r1_s0"
    assert json.loads((run / "config.json").read_text())["val_inference"]["skip_edge_slices"] == 1
    evaluation = evaluation_config(ExperimentConfig.model_validate(config), run, out / "dbt.h5", 0).inference
    assert (evaluation.skip_edge_slices, evaluation.nms_window_slices, evaluation.batch_size) == (1, "detected", 8)
    (paired,) = list(csv.DictReader((out / "paired.csv").open()))
    assert (paired["method"], paired["baseline"]) == ("lesion+impa", "none")
    by_method = {row["method"]: float(row["mean_sensitivity_positive"]) for row in rows}
    assert float(paired["difference"]) == pytest.approx(by_method["lesion+impa"] - by_method["none"], abs=1e-9)
    assert float(paired["ci95_low"]) <= float(paired["difference"]) <= float(paired["ci95_high"])
    cache = SliceCache(out / "dbt.h5")
    patients = int(paired["test_patients"])
    assert patients == len(set(cache.volumes["patient_id"][cache.volumes_in_split("test")])) > 0
    if paired["patients_for_goal"]:  # empty when no resample held a lesion (nan half-width)
        assert int(paired["patients_for_goal"]) == patients_for_half_width(float(paired["half_width"]), patients, 0.025)
    assert (out / "paired.png").stat().st_size > 0 and "Paired differences" in (out / "results.md").read_text()
    # Rerun: every run is finished, nothing is trained again.
    stamp = (out / "students" / "none_r1_s0" / "best.pt").stat().st_mtime_ns
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["experiment", str(path)])
    assert info.value.code == 0
    assert (out / "students" / "none_r1_s0" / "best.pt").stat().st_mtime_ns == stamp
    assert "experiment: DBT only" not in capsys.readouterr().out


def test_every_run_is_checked_before_anything_runs(tmp_path, monkeypatch):
    from comoto_cli import experiment

    monkeypatch.setattr(experiment, "_prepare_data", lambda *args: pytest.fail("a bad experiment went on"))
    base = {"out": str(tmp_path / "exp"), "methods": ["none", "lesion+impa"], "train_ratios": [1.0], "seeds": [0]}
    for changes, fragment in [({"student": {"best_metric": "mean_sensitivity"}}, "best_metric: 'mean_sensitivity'"),
                              ({"teacher": {"best_metric": "num_predictions"}}, "of train-teacher"),
                              ({"methods": ["lesion", "none+impa"]}, "mode none uses no teacher")]:
        with pytest.raises(UsageError, match=fragment):
            experiment.run_experiment(ExperimentConfig.model_validate({**base, **changes}))
    assert not (tmp_path / "exp").exists()


def test_method_labels_come_from_the_mode_registry():
    assert [method_label(m) for m in ("none", "pretrain", "image", "lesion", "lesion+impa", "image+impa")] == [
        "DBT only", "Mammography pretraining", "Image-level KD", "LsKD", "LsKD + ImPA (CoMoTo)", "Image-level KD + ImPA"]


def test_plot_marks_every_seed(tmp_path, monkeypatch):
    """The results plot draws one dot per run (seed) besides the bars, so a 3-seed spread is visible."""
    import matplotlib.axes

    from comoto_cli import experiment
    from comoto_cli.config import ExperimentConfig

    config = ExperimentConfig.model_validate({"out": str(tmp_path), "methods": ["none", "lesion"],
                                              "train_ratios": [0.1, 1.0], "seeds": [0, 1, 2]})
    records = [{"method": m, "train_ratio": r, "seed": s, "mean_sensitivity_positive": 0.1 * s + r / 2,
                "sensitivity_at_2_fps_all": 0.3}
               for m in config.methods for r in config.train_ratios for s in config.seeds]
    dots = []
    original = matplotlib.axes.Axes.scatter
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter",
                        lambda self, x, y, **kw: (dots.extend(zip(x, y)), original(self, x, y, **kw))[1])
    experiment._plot(tmp_path / "results.png", experiment.summarise(records, config), records, config)
    assert len(dots) == len(records)
    assert sorted(y for _, y in dots) == pytest.approx(sorted(r["mean_sensitivity_positive"] for r in records))
    assert (tmp_path / "results.png").stat().st_size > 0


def test_each_distilling_method_is_paired_with_pretraining_from_its_own_teacher(tmp_path):
    from comoto_cli.experiment import comparisons, run_folder

    config = ExperimentConfig.model_validate({
        "out": str(tmp_path), "seeds": [0], "train_ratios": [0.1], "paired_baselines": ["pretrain"],
        "same_teacher_baseline": "pretrain", "variants": {"alpha0": {"alpha": 0}},
        "methods": ["pretrain", "pretrain+impa", "lesion", "lesion+impa", "lesion+impa:alpha0"]})
    pairs = comparisons(config)
    assert ("lesion+impa", "pretrain+impa") in pairs and ("lesion", "pretrain") in pairs
    assert ("lesion+impa:alpha0", "pretrain+impa") in pairs
    assert ("pretrain+impa", "pretrain") in pairs  # ImPA's own contribution, through paired_baselines
    assert ("pretrain+impa", "pretrain+impa") not in pairs and len(pairs) == len(set(pairs))
    # The variant reaches its run's config, its folder and its label; the teacher stays the ImPA one.
    from comoto_cli.experiment import _student_config

    student = _student_config(config, "lesion+impa:alpha0", 0.1, 0, tmp_path / "d.h5", tmp_path / "m.h5")
    assert student.alpha == 0 and student.mode == "lesion" and student.teacher.parent.name == "impa"
    assert run_folder(config, "lesion+impa:alpha0", 0.1, 0).name == "lesion-impa_alpha0_r0.1_s0"
    assert method_label("lesion+impa:alpha0") == "LsKD + ImPA [alpha0]"  # with the KD term off it is not CoMoTo


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"methods": ["lesion:nope"]}, "no variant 'nope'"),
    ({"variants": {"bad": {"model": {}}}}, "changes model, which the experiment sets"),
    ({"variants": {"Bad!": {"alpha": 1}}}, "lower-case"),
    ({"same_teacher_baseline": "pretrainn"}, "pretrain"),
])
def test_bad_variants_are_refused_when_the_config_is_read(tmp_path, changes, fragment):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=fragment):
        ExperimentConfig.model_validate({"out": str(tmp_path), **changes})


def test_teacher_and_student_maps_are_settled_before_anything_trains(tmp_path):
    from comoto_cli.experiment import _student_config, with_resolved_maps

    def config(student_model: dict) -> ExperimentConfig:
        return ExperimentConfig.model_validate({
            "out": str(tmp_path), "teacher": {"model": {"backbone": "resnet18", "distill_feature": "fpn0"}},
            "student": {"model": {"backbone": "resnet18", **student_model}}})

    # Named for the teacher alone: the student distils on it, whether auto or unset.
    resolved = with_resolved_maps(config({"distill_feature": "auto"}), tmp_path / "d.h5", tmp_path / "m.h5", None)
    assert resolved.student.model.distill_feature == "fpn0"
    unset = with_resolved_maps(config({}), tmp_path / "d.h5", tmp_path / "m.h5", None)
    student = _student_config(unset, "lesion", 1.0, 0, tmp_path / "d.h5", tmp_path / "m.h5")
    assert "distill_feature" not in student.model.model_fields_set  # distill takes the teacher's
    with pytest.raises(UsageError, match="not the teachers' map 'fpn0'"):
        with_resolved_maps(config({"distill_feature": "backbone"}), tmp_path / "d.h5", tmp_path / "m.h5", None)


def test_the_combined_half_width_adds_seeds_and_patients_in_quadrature():
    from comoto_cli.experiment import combined_half_width

    assert combined_half_width(0.03, 0.04) == pytest.approx(0.05)
    assert combined_half_width(0.03, float("nan")) == 0.03  # one seed: the patients alone
