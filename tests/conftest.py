"""Shared test set-up: tiny, single-threaded, headless."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        yield
        return
    torch.set_num_threads(1)
    yield


# ------------------------------------------------------------------------------------------------ shared data
# Built once per test session: `comoto synth --size tiny`, both caches, and a tiny teacher. Tests that need
# "a real pipeline" use these instead of each making their own (the suite must stay within minutes on 2 cores).
from pathlib import Path  # noqa: E402

TINY_CACHE_SIZE = {"image_height": 128, "image_width": 128}
TINY_MODEL = {"backbone": "resnet18", "width": [8, 16, 32, 64], "fpn_channels": 16, "returned_layers": [2, 3, 4],
              "anchor_base_sizes": [16, 16]}
TINY_TRAIN = {"epochs": 2, "batch_size": 4, "val_batch_size": 8, "seed": 0,
              "optim": {"name": "adamw", "lr": 0.001, "scheduler": "none"}, "model": TINY_MODEL}


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    from comoto_cli.config import SynthConfig
    from comoto_cli.synth import generate_dataset

    folder = tmp_path_factory.mktemp("tiny_synth") / "data"
    generate_dataset(folder, SynthConfig(size="tiny", seed=0), progress=False)
    return folder


@pytest.fixture(scope="session")
def tiny_caches(tiny_synth, tmp_path_factory) -> dict[str, Path]:
    from comoto_cli.config import PreprocessConfig
    from comoto_cli.preprocess.pipeline import preprocess

    folder = tmp_path_factory.mktemp("tiny_caches")
    caches = {"dbt": folder / "dbt.h5", "mammo": folder / "mammo.h5"}
    split = {"val_fraction": 0.25, "test_fraction": 0.25}
    preprocess(tiny_synth / "dbt", caches["dbt"],
               PreprocessConfig(modality="dbt", workers=1, split=split, **TINY_CACHE_SIZE), progress=False)
    preprocess(tiny_synth / "mammo", caches["mammo"],
               PreprocessConfig(modality="mammo", workers=1, split=split, **TINY_CACHE_SIZE), progress=False)
    return caches


@pytest.fixture(scope="session")
def tiny_teacher(tiny_caches, tmp_path_factory) -> Path:
    """best.pt of a 2-epoch tiny teacher with ImPA."""
    from comoto_cli.config import TeacherConfig
    from comoto_cli.engine.teacher import run_train_teacher

    out = tmp_path_factory.mktemp("tiny_teacher") / "teacher"
    config = TeacherConfig.model_validate({**TINY_TRAIN, "cache": str(tiny_caches["mammo"]), "out": str(out)})
    run_train_teacher(config)
    return out / "best.pt"
