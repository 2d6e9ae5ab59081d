"""Shared test set-up: tiny, single-threaded, headless."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# `make test` reruns the trained-model tests with COMOTO_TEST_THREADS=2: another reduction order, as another CPU
# gives. Subprocesses that train get the same count (OMP_NUM_THREADS sets torch's) so in- and out-of-process runs
# of one test agree.
TEST_THREADS = int(os.environ.get("COMOTO_TEST_THREADS", "1"))
TRAINING_SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": str(TEST_THREADS)}
# Seed of the test detector's training trajectory (tests/test_predict.py): another seed is another trajectory, as
# another CPU's float results give; the tests must hold for any.
TRAJECTORY_SEED = int(os.environ.get("COMOTO_TEST_SEED", "0"))

import pytest  # noqa: E402


def _cpu_name() -> str:
    """The CPU model (as /proc/cpuinfo names it) and its widest vector extension."""
    import platform

    name, flags = "", ""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in ("model name", "Model") and not name:
                name = value
            if key in ("flags", "Features") and not flags:
                flags = f" {value} "
    except OSError:
        pass
    vector = next((tag for tag in ("avx512f", "avx2", "sve", "asimd") if f" {tag} " in flags), "")
    return f"{name or platform.processor() or 'unknown CPU'} ({platform.machine()}{', ' + vector if vector else ''})"


def pytest_terminal_summary(terminalreporter):
    """Trained-model results depend on the CPU's float arithmetic: say which CPU and thread count this run had
    (a summary line, as ``-q`` hides the report header)."""
    terminalreporter.write_line(f"cpu: {_cpu_name()}, {os.cpu_count()} cores; torch threads: {TEST_THREADS}")


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        yield
        return
    torch.set_num_threads(TEST_THREADS)
    yield


# ------------------------------------------------------------------------------------------------ shared data
# Built once per test session: `comoto synth --size tiny`, both caches, and a tiny teacher. Tests that need
# "a real pipeline" use these instead of each making their own (the suite must stay within minutes on 2 cores).
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from comoto_cli.data.sources import ImageRecord, LesionBox  # noqa: E402

TINY_CACHE_SIZE = {"image_height": 128, "image_width": 128}
# The one tiny detector of the suite (a few thousand parameters); tests change single fields of it.
TINY_MODEL = {"backbone": "resnet18", "width": [8, 16, 32, 64], "fpn_channels": 16, "anchor_base_sizes": [16.0, 16.0]}
TINY_TRAIN = {"epochs": 2, "batch_size": 4, "val_batch_size": 8, "seed": 0,
              "optim": {"name": "adamw", "lr": 0.001, "scheduler": "none"},
              "model": {**TINY_MODEL, "returned_layers": [2, 3, 4]}}


def tiny_model_config(**changes):
    """:data:`TINY_MODEL` as a ModelConfig, with ``changes``."""
    from comoto_cli.config import ModelConfig

    return ModelConfig(**{**TINY_MODEL, **changes})


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


@pytest.fixture(scope="session")
def low_threshold_teacher(tiny_teacher, tmp_path_factory) -> Path:
    """:func:`tiny_teacher` with detector score threshold 0: the 2-epoch teacher scores below the default threshold,
    this copy gives real boxes (evaluation tests)."""
    import json

    import torch

    state = torch.load(tiny_teacher, weights_only=True)
    state["model_config"] = json.dumps({**json.loads(state["model_config"]), "score_threshold": 0.0})
    checkpoint = tmp_path_factory.mktemp("low_threshold") / "low_threshold.pt"
    torch.save(state, checkpoint)
    return checkpoint


# A cache of bright disks written directly (no DICOM): the trainer's and the teacher's tests.
def build_tiny_cache(path: Path, *, height: int = 64, width: int = 64, train: int = 12, val: int = 4,
                     normal_every: int = 4, seed: int = 0, modality: str = "mammo") -> Path:
    """A cache of noisy images, most with one bright disk (the lesion) and its box; every ``normal_every``-th
    image lesion-free. One single-slice 'volume' per image, as mammography caches store them."""
    rng = np.random.default_rng(seed)
    from comoto_cli.cache import CacheWriter, VolumeRecord

    writer = CacheWriter(path, modality=modality, image_height=height, image_width=width, config_json="{}",
                         config_hash="tinyhash")
    yy, xx = np.mgrid[0:height, 0:width]
    for index in range(train + val):
        image = 0.2 + 0.05 * rng.standard_normal((height, width))
        boxes, lesions = [], []
        if index % normal_every != normal_every - 1:
            radius = rng.uniform(5, 8)
            cy, cx = rng.uniform(radius + 2, height - radius - 2), rng.uniform(radius + 2, width - radius - 2)
            image[(yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= radius**2] += 0.6
            boxes.append([cx - radius, cy - radius, cx + radius, cy + radius])
            lesions.append((0, cx - radius, cy - radius, 2 * radius, 2 * radius))
        record = VolumeRecord(patient_id=f"P{index}", study_uid=f"S{index}", view="lcc",
                              split="train" if index < train else "val", source=f"img{index}.dcm", num_slices=1,
                              original_height=height, original_width=width, scale_y=1.0, scale_x=1.0,
                              lesions=lesions, lesion_classes=["Mass"] * len(lesions))
        writer.add_volume(record, [0], np.clip(image, 0, 1)[None], [np.asarray(boxes, np.float32).reshape(-1, 4)],
                          [np.arange(len(boxes))])
    writer.close()
    return Path(path)


# xyxy boxes for the NMS tests (tests/test_networks.py, tests/test_volume_inference.py).
def random_boxes(rng, count: int, quantise: bool) -> np.ndarray:
    """``count`` random boxes, (count, 4) float32; ``quantise`` snaps them to an 8-pixel grid."""
    corner = rng.uniform(0, 200, (count, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(1, 60, (count, 2))], axis=1).astype(np.float32)
    if quantise:  # many identical boxes and exact IoU ties
        boxes = np.round(boxes / 8) * 8
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 8)
    return boxes


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
    """Install a fake BCS-DBT adapter (the default for modality dbt) reading numpy volumes; returns a function
    (re)making the dataset, with ``decoded`` (paths read so far) and ``state``: ``fail_after`` N volumes decoded
    raise a "crash", paths in ``unreadable`` raise InputDataError as an undecodable DICOM does."""
    from comoto_cli.data.adapters.base import PixelSource
    from comoto_cli.data.adapters.bcs_dbt import BcsDbt
    from comoto_cli.errors import InputDataError

    decoded: list[Path] = []
    state: dict = {"unreadable": set(), "records": []}

    def open_pixels(self, path, *, view, csv, row, slices, decoder, accept_modality):
        if Path(path) in state["unreadable"]:
            raise InputDataError("simulated undecodable frame", path=path)
        decoded.append(Path(path))
        if state.get("fail_after") is not None and len(decoded) > state["fail_after"]:
            raise RuntimeError("simulated crash")
        pixels = np.load(path)
        wanted = range(len(pixels)) if slices is None else sorted(set(slices))
        return PixelSource(pixels.shape, False, ((index, pixels[index]) for index in wanted))

    monkeypatch.setattr(BcsDbt, "discover", lambda self, root, config, skipped: list(state["records"]))
    monkeypatch.setattr(BcsDbt, "read_header", lambda self, path, config: tuple(np.load(path, mmap_mode="r").shape))
    monkeypatch.setattr(BcsDbt, "open_pixels", open_pixels)

    def make(**kwargs):
        state["records"] = _fake_dataset(tmp_path / "data", **kwargs)
        return state["records"]

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


# ---------------------------------------------------------------------------------------------- mammogram DICOMs
def write_mammogram_dicom(path: Path, pixels: np.ndarray, *, patient: str, study: str, view: str,
                          intent: str = "FOR PRESENTATION", uid: str | None = None) -> None:
    """A Digital Mammography (For Presentation) DICOM as the mammography datasets store them: 12 of 16 bits,
    MONOCHROME2, ``view`` such as ``lcc`` written as ImageLaterality + ViewPosition (the adapters' tests)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.1.2"
    uid = uid or generate_uid(entropy_srcs=[str(path)])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.Modality, ds.PatientID, ds.StudyInstanceUID = "MG", patient, study
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study, "series"])
    ds.ImageLaterality, ds.ViewPosition = view[0].upper(), view[1:].upper()
    ds.PresentationIntentType = intent
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# ---------------------------------------------------------------------------------------------- real mammograms
# Two encodings of one real mammogram (NEMA MG1, 4664 x 3064, Secondary Capture, Modality RG) beside the repository;
# never committed. Tests that need them skip with the reason where they are absent.
def _real_folder() -> Path | None:
    for folder in (Path(__file__).resolve().parents[2] / "shared" / "data" / "real-mammograms",
                   Path("/work/shared/data/real-mammograms")):
        if (folder / "MG1_J2KI.dcm").is_file() and (folder / "MG1_JPLY.dcm").is_file():
            return folder
    return None


@pytest.fixture
def real(tmp_path) -> Path:
    """Both real mammograms copied into a data root of this test (the shared folder is read-only)."""
    folder = _real_folder()
    if folder is None:
        pytest.skip("the real mammograms (shared/data/real-mammograms beside the repository) are not here")
    root = tmp_path / "data"
    root.mkdir()
    for name in ("MG1_J2KI.dcm", "MG1_JPLY.dcm"):
        shutil.copyfile(folder / name, root / name)
    return root
