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
    # COMOTO_TEST_THREADS reruns the suite with another reduction order, as another CPU would give.
    torch.set_num_threads(int(os.environ.get("COMOTO_TEST_THREADS", "1")))
    yield


# ------------------------------------------------------------------------------------------------ shared data
# Built once per test session: `comoto synth --size tiny`, both caches, and a tiny teacher. Tests that need
# "a real pipeline" use these instead of each making their own (the suite must stay within minutes on 2 cores).
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from comoto_cli.data import dicom_io, sources  # noqa: E402
from comoto_cli.data.sources import ImageRecord, LesionBox  # noqa: E402

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


# ---------------------------------------------------------------------------------------------- fake dataset
# The preprocess pipeline in-process on numpy volumes behind fake readers (test_preprocess, test_shards).
def _fake_dataset(root: Path, patients: int = 6, slices: int = 9, rows: int = 60, cols: int = 44,
                  order_seed: int | None = None) -> list[ImageRecord]:
    """Volumes as .npy files; even patients have one bright lesion per view at a known slice."""
    root.mkdir(parents=True, exist_ok=True)
    boxes_csv = root / "boxes.csv"
    boxes_csv.write_text("PatientID,StudyUID,View,Slice,X,Y,Width,Height\n")
    rng = np.random.default_rng(0)
    records = []
    for p in range(patients):
        for view in ("lcc", "rmlo"):
            volume = rng.random((slices, rows, cols)).astype(np.float32) * 0.3
            path = root / f"P{p:02d}_{view}.npy"
            boxes = []
            if p % 2 == 0:
                centre = 2 + p % 5
                x, y, w, h = 7.0 + p, 11.0, 13.0, 17.0
                volume[centre, int(y):int(y + h), int(x):int(x + w)] += 0.6
                boxes.append(LesionBox(slice=centre, x=x, y=y, width=w, height=h, cls="cancer", csv=boxes_csv,
                                       row=2 + len(records)))
            np.save(path, volume)
            records.append(ImageRecord(patient_id=f"P{p:02d}", study_uid=f"S{p}", view=view, path=path,
                                       source=path.name, label="cancer" if boxes else "normal", boxes=boxes,
                                       volume_slices=slices, split=None, csv=root / "paths.csv", row=2 + len(records)))
    if order_seed is not None:
        records = [records[i] for i in np.random.default_rng(order_seed).permutation(len(records))]
    return records


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Install fake readers; returns a function (re)making the dataset and the list of decoded paths."""
    decoded: list[Path] = []
    state: dict = {}

    def read_volume(path, view, row=None, csv=None):
        decoded.append(Path(path))
        if state.get("fail_after") is not None and len(decoded) > state["fail_after"]:
            raise RuntimeError("simulated crash")
        return dicom_io.DbtVolume(pixels=np.load(path), flipped=False, path=Path(path))

    monkeypatch.setattr(dicom_io, "read_dbt_header", lambda path: tuple(np.load(path, mmap_mode="r").shape))
    monkeypatch.setattr(dicom_io, "read_dbt_volume", read_volume)

    class Frames:  # the streaming reader's interface over a fake volume
        def __init__(self, volume):
            self.shape, self.flipped, self.pixels = volume.pixels.shape, volume.flipped, volume.pixels

        def frames(self, indices=None):
            for index in range(len(self.pixels)) if indices is None else sorted(set(indices)):
                yield index, self.pixels[index]

    monkeypatch.setattr(dicom_io, "open_dbt", lambda path, view, row=None, csv=None, decoder="auto":
                        Frames(read_volume(path, view, row, csv)))

    def make(**kwargs):
        records = _fake_dataset(tmp_path / "data", **kwargs)
        monkeypatch.setattr(sources, "discover_bcs_dbt", lambda root, **kw: list(records))
        return records

    make.decoded = decoded
    make.state = state
    make.root = tmp_path / "data"
    return make


@pytest.fixture
def kill_after_first_part():
    """``kill(arguments, out)``: run ``comoto ARGUMENTS`` (a preprocess writing ``out``) in a session of its own and
    SIGKILL it, workers included, as soon as its first work file exists; asserts it was still running then."""
    import signal
    import subprocess
    import sys
    import time

    def kill(arguments: list[str], out: Path) -> None:
        process = subprocess.Popen([sys.executable, "-m", "comoto_cli", *arguments], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                   start_new_session=True)
        deadline = time.monotonic() + 60
        while (not list(Path(f"{out}.parts").glob("*/*.part.h5")) and process.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.002)
        running = process.poll() is None
        if running:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        assert running and process.returncode == -signal.SIGKILL  # killed mid-run, not finished

    return kill
