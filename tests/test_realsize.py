"""Real-size behaviour of preprocessing on the tiny synthetic set: which frames get decoded, how many workers fit
in memory, and that the resize keeps its exact arithmetic one image at a time."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pydicom.pixels
import pytest

from comoto_cli.cache.h5cache import SliceCache
from comoto_cli.config import PreprocessConfig
from comoto_cli.preprocess import pipeline
from comoto_cli.preprocess.resize import resize_area


def test_training_volumes_decode_only_frame_zero_and_their_kept_slices(tiny_synth, tmp_path, monkeypatch):
    asked: dict[str, list[int]] = defaultdict(list)
    real = pydicom.pixels.iter_pixels

    def counting(src, *, indices=None, **kwargs):
        asked[str(Path(src).resolve())].extend(indices)
        return real(src, indices=indices, **kwargs)

    monkeypatch.setattr(pydicom.pixels, "iter_pixels", counting)
    out = tmp_path / "dbt.h5"
    config = PreprocessConfig(modality="dbt", workers=1, image_height=64, image_width=48,
                              split={"val_fraction": 0.25, "test_fraction": 0.25})
    pipeline.preprocess(tiny_synth / "dbt", out, config, progress=False)
    cache = SliceCache(out)
    splits = set()
    for volume in range(cache.num_volumes):
        path = str((tiny_synth / "dbt" / cache.volumes["source"][volume]).resolve())
        rows = cache.volume_slice_rows(volume)
        stored = [int(i) for i in cache.slice_index[rows]]
        frames = int(cache.volumes["num_slices"][volume])
        split = cache.volumes["split"][volume]
        splits.add(split)
        expected = sorted({0, *stored}) if split == "train" else list(range(frames))
        assert sorted(asked[path]) == expected, (split, stored)
        if split == "train":
            assert len(asked[path]) <= 1 + max(1, len(stored)) < frames
    assert splits == {"train", "val", "test"}


def test_auto_workers_fit_cores_and_free_memory(monkeypatch):
    frame = (2457, 1996)
    tasks = [pipeline.VolumeTask(i, "dbt", Path("v.dcm"), "lcc", Path("p.csv"), 2, None, (64, *frame), 2048, 1024,
                                 Path("x")) for i in range(40)]
    per_worker = pipeline.worker_memory_bytes(frame[0] * frame[1])
    assert 300 * 2**20 < per_worker < 1.5 * 2**30  # the README's bound at BCS-DBT size
    monkeypatch.setattr(pipeline, "usable_cores", lambda: 32)
    monkeypatch.setattr(pipeline, "available_memory_bytes", lambda: 10 * per_worker)
    assert pipeline._worker_count(PreprocessConfig(workers=0), tasks) == 8  # 80 % of the memory: memory-bound
    monkeypatch.setattr(pipeline, "available_memory_bytes", lambda: 1000 * per_worker)
    assert pipeline._worker_count(PreprocessConfig(workers=0), tasks) == 32  # core-bound
    assert pipeline._worker_count(PreprocessConfig(workers=0), tasks[:3]) == 3  # never more than the volumes
    monkeypatch.setattr(pipeline, "available_memory_bytes", lambda: per_worker // 2)
    assert pipeline._worker_count(PreprocessConfig(workers=0), tasks) == 1  # always at least one
    monkeypatch.setattr(pipeline, "available_memory_bytes", lambda: None)  # unknown: cores decide
    assert pipeline._worker_count(PreprocessConfig(workers=0), tasks) == 32
    assert pipeline._worker_count(PreprocessConfig(workers=5), tasks) == 5  # an explicit count is kept


def _cumsum_reference(values: np.ndarray, size: int, axis: int) -> np.ndarray:
    """The resize's arithmetic written with numpy's cumsum on a whole stack (its earlier implementation)."""
    length = values.shape[axis]
    if length == size:
        return values
    pad = [(0, 0)] * values.ndim
    pad[axis] = (1, 0)
    integral = np.pad(np.cumsum(values, axis=axis), pad)
    edges = np.arange(size + 1, dtype=np.float64) * (length / size)
    low = np.minimum(np.floor(edges).astype(np.int64), length - 1)
    shape = [1] * values.ndim
    shape[axis] = size + 1
    fraction = (edges - low).reshape(shape)
    below = np.take(integral, low, axis=axis)
    return np.diff(below + fraction * (np.take(integral, low + 1, axis=axis) - below), axis=axis) * (size / length)


@pytest.mark.parametrize("shape,size", [((3, 61, 47), (20, 33)), ((2, 40, 90), (40, 30)), ((1, 30, 20), (75, 20)),
                                        ((2, 57, 44), (31, 44))])
def test_resize_one_image_at_a_time_is_bit_identical_to_the_stacked_cumsum(shape, size):
    images = np.random.default_rng(3).random(shape).astype(np.float32)
    stack = images.astype(np.float64)
    if size[0] / shape[1] <= size[1] / shape[2]:
        reference = _cumsum_reference(_cumsum_reference(stack, size[0], 1), size[1], 2)
    else:
        reference = _cumsum_reference(_cumsum_reference(stack, size[1], 2), size[0], 1)
    np.testing.assert_array_equal(resize_area(images, *size), reference.astype(np.float32))
