"""`comoto train-teacher` end to end on a tiny bright-disk mammography cache: ImPA on/off, logs, checkpoints
that load with weights_only, a run killed with SIGKILL and resumed, determinism, and usage errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL, TRAINING_SUBPROCESS_ENV, build_tiny_cache

pytestmark = pytest.mark.trained  # `make test` reruns these on 2 torch threads


def _config_file(folder: Path, **changes) -> Path:
    config = {"model": TINY_MODEL, "optim": {"name": "adamw", "lr": 1e-3, "scheduler": "cosine"}, "batch_size": 4,
              "val_batch_size": 8, "epochs": 2, "log_every": 1}
    config.update(changes)
    path = folder / "teacher.json"
    path.write_text(json.dumps(config))
    return path


def _cli(*arguments) -> int:
    from comoto_cli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in arguments])
    return exit_info.value.code


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _without_time(history):
    return [{k: v for k, v in record.items() if k != "time"} for record in history]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return build_tiny_cache(tmp_path_factory.mktemp("mammo") / "mammo.h5", train=12, val=4)


@pytest.fixture(scope="module")
def impa_run(tmp_path_factory, cache) -> Path:
    folder = tmp_path_factory.mktemp("impa")
    assert _cli("train-teacher", "--cache", cache, "--out", folder / "run", "--config", _config_file(folder),
                "--impa", "--epochs", 3, "--seed", 7) == 0
    return folder / "run"


def test_impa_run_logs_every_epoch_and_checkpoints(impa_run):
    from comoto_cli.networks.checkpoint import load_detector

    history = _history(impa_run)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for record in history:
        assert {"classification", "box_regression", "impa", "total"} <= set(record["losses"])
        assert record["losses"]["impa"] > 0
        for key in ("sensitivity_at_1_fp", "sensitivity_at_4_fp", "mean_sensitivity", "map", "ap_50"):
            assert key in record["val"]
        assert record["best_metric"] == "mean_sensitivity"
    assert history[-1]["losses"]["total"] < history[0]["losses"]["total"]
    config = json.loads((impa_run / "config.json").read_text())
    assert config["impa"] is True and config["epochs"] == 3 and config["seed"] == 7
    for name in ("best.pt", "last.pt"):
        raw = torch.load(impa_run / name, map_location="cpu", weights_only=True)
        meta = raw["metadata"]
        assert meta["kind"] == "teacher" and meta["cache_config_hash"] == "tinyhash"
        assert "mean_sensitivity" in meta["metrics"] and meta["best_metric"] == "mean_sensitivity"
    assert torch.load(impa_run / "last.pt", weights_only=True)["metadata"]["epoch"] == 3
    detector, checkpoint = load_detector(impa_run / "best.pt")
    best_epoch = checkpoint["metadata"]["epoch"]
    values = [h["val"]["mean_sensitivity"] for h in history]
    assert values[best_epoch - 1] == max(values) and values.index(max(values)) == best_epoch - 1
    assert detector.predict(torch.rand(1, 1, 64, 64))[0]["boxes"].shape[-1] == 4


def test_no_impa_has_no_impa_component_and_same_seed_repeats(tmp_path, cache):
    runs = []
    for name in ("a", "b"):
        assert _cli("train-teacher", "--cache", cache, "--out", tmp_path / name, "--config",
                    _config_file(tmp_path), "--no-impa", "--epochs", 2) == 0
        runs.append(_history(tmp_path / name))
    assert all("impa" not in record["losses"] for record in runs[0])
    assert json.loads((tmp_path / "a" / "config.json").read_text())["impa"] is False
    assert _without_time(runs[0]) == _without_time(runs[1])


def test_killed_run_resumes_to_the_same_result(tmp_path):
    # More images than the other tests so an epoch lasts long enough to kill the process inside the run.
    cache = build_tiny_cache(tmp_path / "bigger.h5", train=32, val=4, seed=1)
    config = _config_file(tmp_path, epochs=5)
    command = [sys.executable, "-m", "comoto_cli", "train-teacher", "--cache", str(cache), "--out",
               str(tmp_path / "killed"), "--config", str(config), "--impa"]
    env = TRAINING_SUBPROCESS_ENV
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = tmp_path / "killed" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    stopped_at = torch.load(last, weights_only=True)["metadata"]["epoch"]
    assert 1 <= stopped_at < 5

    resumed = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    history = _history(tmp_path / "killed")
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert torch.load(tmp_path / "killed" / "best.pt", weights_only=True)["metadata"]["kind"] == "teacher"

    assert _cli("train-teacher", "--cache", cache, "--out", tmp_path / "whole", "--config", config, "--impa") == 0
    assert _without_time(history) == _without_time(_history(tmp_path / "whole"))


def test_usage_errors(tmp_path, cache, impa_run, capsys):
    config = _config_file(tmp_path, epochs=1)
    assert _cli("train-teacher", "--out", tmp_path / "x", "--config", config) == 2
    assert "--cache" in capsys.readouterr().err
    assert _cli("train-teacher", "--cache", cache, "--out", impa_run, "--config", config) == 2
    assert "--resume" in capsys.readouterr().err
    dbt = build_tiny_cache(tmp_path / "dbt.h5", train=4, val=2, modality="dbt")
    assert _cli("train-teacher", "--cache", dbt, "--out", tmp_path / "y", "--config", config) == 2
    assert "mammography" in capsys.readouterr().err
    bad = _config_file(tmp_path, epochs=1, best_metric="accuracy")
    assert _cli("train-teacher", "--cache", cache, "--out", tmp_path / "z", "--config", bad) == 2
    err = capsys.readouterr().err
    assert "best_metric" in err and "mean_sensitivity" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "z").exists() and not (tmp_path / "y").exists()
