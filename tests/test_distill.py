"""`comoto distill`: all four modes end to end on tiny synthetic data, the teacher left untouched, resume."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from comoto_cli.cli import main
from comoto_cli.config import DistillConfig
from comoto_cli.data.datasets import move_batch
from comoto_cli.engine import modes
from comoto_cli.engine.distill import patient_subset, run_distill
from comoto_cli.errors import UsageError
from tests.conftest import TINY_TRAIN, TRAINING_SUBPROCESS_ENV

pytestmark = pytest.mark.trained  # `make test` reruns these on 2 torch threads

DISTILL_TERMS = {"lesion": "lskd", "image": "image_kd"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _config(tiny_caches, teacher, out: Path, mode: str, **changes) -> DistillConfig:
    payload = {**TINY_TRAIN, "cache": str(tiny_caches["dbt"]), "teacher": str(teacher),
               "teacher_cache": str(tiny_caches["mammo"]), "out": str(out), "mode": mode, **changes}
    return DistillConfig.model_validate(payload)


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["lesion", "image", "pretrain", "none"])
def test_every_mode_trains_and_logs_its_losses(tmp_path, tiny_caches, tiny_teacher, mode, monkeypatch):
    from comoto_cli.engine import distill
    from comoto_cli.networks.checkpoint import load_checkpoint, load_detector

    teacher_hash = _sha256(tiny_teacher)
    teacher_state = {k: v.clone() for k, v in load_checkpoint(tiny_teacher)["model_state"].items()}
    initial: dict[str, torch.Tensor] = {}  # the student's weights as training starts
    real_train = distill.train

    def recording_train(*args, **kwargs):
        initial.update({k: v.detach().clone() for k, v in kwargs["model"].state_dict().items()})
        return real_train(*args, **kwargs)

    monkeypatch.setattr(distill, "train", recording_train)
    out = tmp_path / mode
    summary = run_distill(_config(tiny_caches, tiny_teacher, out, mode))
    history = _history(out)
    assert [line["epoch"] for line in history] == [1, 2]
    for line in history:
        losses = line["losses"]
        assert losses["classification"] > 0 and losses["box_regression"] >= 0
        term = DISTILL_TERMS.get(mode)
        if term is None:
            assert not set(DISTILL_TERMS.values()) & set(losses), f"{mode} must not log a distillation loss"
        else:
            assert losses[term] > 0, f"{mode}: distillation loss {term} should be logged and non-zero"
        assert set(line["val"]) >= {"mean_sensitivity_positive", "sensitivity_at_2_fps_all"}
    # The teacher is read, never written: file and weights bit-identical.
    assert _sha256(tiny_teacher) == teacher_hash
    after = load_checkpoint(tiny_teacher)["model_state"]
    assert all(torch.equal(teacher_state[k], after[k]) for k in teacher_state)
    best = load_checkpoint(out / "best.pt")
    assert best["metadata"]["mode"] == mode and best["metadata"]["kind"] == "student"
    assert summary["best_epoch"] in (1, 2)
    if mode in ("lesion", "image"):
        assert "projection" in best["extra_states"]
    # Initialised from the teacher in every mode but `none`: the weights training starts from are the teacher's,
    # tensor for tensor; `none` starts from a fresh initialisation of the same architecture.
    assert set(initial) == set(teacher_state)
    # `image` sizes its projection with a forward pass of the student in train mode before training, which moves
    # the BatchNorm running statistics: its learned parameters are compared, every tensor in the other modes.
    parameters = {name for name, _ in load_detector(tiny_teacher)[0].named_parameters()}
    compared = [k for k in teacher_state if mode != "image" or k in parameters]
    same = [torch.equal(initial[k], teacher_state[k]) for k in compared]
    if mode == "none":
        assert sum(same) < len(same) // 2, f"{sum(same)} of {len(same)} tensors equal the teacher's"
    else:
        assert compared and all(same), [k for k, equal in zip(compared, same) if not equal][:5]
        assert best["model_config"] == load_checkpoint(tiny_teacher)["model_config"]


def test_train_ratio_is_a_seeded_patient_subset(tmp_path, tiny_caches, tiny_teacher):
    patients = np.array([f"P{i:03d}" for i in range(40)] * 2, dtype=object)
    a = patient_subset(patients, 0.1, seed=3)
    assert len(a) == 4 and len(set(a)) == 4
    assert np.array_equal(a, patient_subset(patients[::-1], 0.1, seed=3))  # row order does not matter
    assert not np.array_equal(a, patient_subset(patients, 0.1, seed=4))
    assert len(patient_subset(patients, 1.0, seed=0)) == 40

    out = tmp_path / "low"
    run_distill(_config(tiny_caches, tiny_teacher, out, "none", epochs=1, train_ratio=0.5))
    subset = json.loads((out / "train_subset.json").read_text())
    assert subset["train_ratio"] == 0.5 and 1 <= len(subset["patients"]) < 3


def test_usage_errors_are_one_line(tmp_path, tiny_caches, tiny_teacher, capsys):
    cases = [
        (["distill", "--cache", str(tiny_caches["dbt"]), "--out", str(tmp_path / "a"), "--mode", "lesion"],
         "--teacher"),
        (["distill", "--cache", str(tiny_caches["mammo"]), "--out", str(tmp_path / "b"), "--mode", "none"],
         "DBT cache"),
        (["distill", "--cache", str(tiny_caches["dbt"]), "--out", str(tmp_path / "c"), "--mode", "magic"],
         "mode"),
        (["distill", "--cache", str(tiny_caches["dbt"]), "--out", str(tmp_path / "d"), "--train-ratio", "0"],
         "train_ratio"),
        (["distill", "--out", str(tmp_path / "e"), "--mode", "none"], "--cache"),
        (["distill", "--cache", str(tiny_caches["dbt"]), "--mode", "none"], "--out"),
        (["distill", "--cache", str(tiny_caches["dbt"]), "--out", str(tmp_path / "f"), "--mode", "image",
          "--teacher", str(tiny_teacher)], "--teacher-cache"),
    ]
    for arguments, fragment in cases:
        with pytest.raises(SystemExit) as info:
            main(arguments)
        assert info.value.code in (1, 2)
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1, err
    assert not any(tmp_path.iterdir()), "a usage error must stop the run before it writes anything"


def test_best_metric_is_checked_before_training(tmp_path, tiny_caches, tiny_teacher, monkeypatch):
    from comoto_cli.engine import distill

    monkeypatch.setattr(distill, "train", lambda *a, **k: pytest.fail("trained with a bad best_metric"))
    with pytest.raises(UsageError) as info:
        run_distill(_config(tiny_caches, tiny_teacher, tmp_path / "run", "none", best_metric="mean_sensitivity"))
    message = str(info.value)
    assert "best_metric" in message and "mean_sensitivity_positive" in message and "num_predictions" in message
    assert not (tmp_path / "run").exists()


@pytest.fixture
def registry_restored():
    """Modes registered by a test are forgotten after it."""
    with modes._MODES.restored():
        yield


def _build_mean_match(setup: modes.ModeSetup):
    """A toy mode: pull the student's mean feature (through a learnable scale) to the teacher's on mammography."""

    def mean_match(batch, losses, features, ctx):
        mammo = move_batch(next(setup.teacher_batches), ctx.device)
        with torch.no_grad():
            target = setup.teacher.distill_features(mammo["images"]).float().mean()
        student = ctx.extra_modules["scale"](features.float().mean().reshape(1, 1))
        return {"mean_match": ((student - target) ** 2).sum()}

    return mean_match, {"scale": torch.nn.Linear(1, 1)}


def test_a_registered_mode_runs_through_config_cli_and_distill(tmp_path, tiny_caches, tiny_teacher, registry_restored,
                                                             capsys):
    """One register_mode call, nothing else: the config accepts the mode and `comoto distill` trains with it."""
    modes.register_mode(modes.DistillMode(
        name="mean-match", label="Mean matching", description="toy: match the teacher's mean feature",
        init="teacher", teacher_images="all", build=_build_mean_match))
    assert DistillConfig.model_validate({"mode": "mean-match"}).mode == "mean-match"
    out = tmp_path / "run"
    config = tmp_path / "student.json"
    config.write_text(json.dumps({**TINY_TRAIN, "epochs": 1}))
    with pytest.raises(SystemExit) as info:
        main(["distill", "--cache", str(tiny_caches["dbt"]), "--teacher", str(tiny_teacher), "--teacher-cache",
              str(tiny_caches["mammo"]), "--out", str(out), "--mode", "mean-match", "--config", str(config)])
    assert info.value.code == 0, capsys.readouterr().err
    assert _history(out)[0]["losses"]["mean_match"] >= 0
    from comoto_cli.networks.checkpoint import load_checkpoint

    last = load_checkpoint(out / "last.pt")
    assert last["metadata"]["mode"] == "mean-match" and "scale" in last["extra_states"]
    assert last["metadata"]["teacher_images"] > 0  # all mammography training images, not lesion ones only
    # What it needs is checked like the built-in modes' needs.
    with pytest.raises(UsageError, match="--teacher-cache"):
        run_distill(_config(tiny_caches, tiny_teacher, tmp_path / "other", "mean-match", teacher_cache=None))
    with pytest.raises(ValueError, match="already registered"):
        modes.register_mode(modes.DistillMode(name="mean-match", label="x", description="x"))


def test_unknown_mode_lists_the_registered_ones(registry_restored):
    with pytest.raises(ValueError) as info:
        DistillConfig.model_validate({"mode": "magic"})
    assert all(name in str(info.value) for name in ("lesion", "image", "pretrain", "none"))
    modes.register_mode(modes.DistillMode(name="magic", label="Magic", description="no extra loss"))
    assert DistillConfig.model_validate({"mode": "magic"}).mode == "magic"
    with pytest.raises(ValueError, match="lower-case"):
        modes.register_mode(modes.DistillMode(name="a+b", label="x", description="x"))


def test_the_registry_loads_without_torch_and_its_factories_resolve():
    """The CLI reads the registry for its help, which must not load torch; built-in factories load on use."""
    code = "import sys, comoto_cli.engine.modes, comoto_cli.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    for mode in modes.registered_modes():
        assert mode.build is None or callable(mode.factory()), mode.name


def test_kill_and_resume(tmp_path, tiny_caches, tiny_teacher):
    config = tmp_path / "student.json"
    config.write_text(json.dumps({**TINY_TRAIN, "epochs": 4}))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "comoto_cli", "distill", "--cache", str(tiny_caches["dbt"]), "--teacher",
               str(tiny_teacher), "--teacher-cache", str(tiny_caches["mammo"]), "--out", str(out), "--mode",
               "lesion", "--config", str(config)]
    env = TRAINING_SUBPROCESS_ENV
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    running = process.poll() is None  # checked before the kill: a finished run would make the resume vacuous
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert running and process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert (out / "last.pt").exists(), "the run should have finished at least one epoch before the kill"
    from comoto_cli.networks.checkpoint import load_checkpoint

    killed_at = load_checkpoint(out / "last.pt")["metadata"]["epoch"]
    assert 1 <= killed_at < 4, f"last.pt says epoch {killed_at} at the kill: not mid-run"
    subprocess.run(command + ["--resume"], check=True, stdout=subprocess.DEVNULL, env=env)
    history = _history(out)
    assert [line["epoch"] for line in history] == [1, 2, 3, 4]
    assert load_checkpoint(out / "last.pt")["metadata"]["epoch"] == 4
    assert load_checkpoint(out / "best.pt")["metadata"]["kind"] == "student"
