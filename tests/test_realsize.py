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
from comoto_cli.transforms.resize import resize_area


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
    assert 350 * 2**20 < per_worker < 1.5 * 2**30  # the README's bound at BCS-DBT size, above the measured peak
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


def test_a_rebuild_decodes_only_the_volumes_whose_inputs_changed(fake, tmp_path):
    import dataclasses
    import os

    from comoto_cli.preprocess.summary import cache_content_hash

    records = fake(patients=6)
    config = PreprocessConfig(image_height=32, image_width=24, workers=1)
    out = tmp_path / "dbt.h5"
    first = pipeline.preprocess(fake.root, out, config, progress=False)
    assert first["computed"] == len(records) and len(fake.decoded) == len(records)
    cache = SliceCache(out)
    train_lesion = next(i for i, r in enumerate(records)
                        if r.boxes and cache.volumes["split"][_row(cache, r)] == "train")

    def rebuild_and_compare(expected_decoded: list[Path]) -> None:
        fake.decoded.clear()
        report = pipeline.preprocess(fake.root, out, config, progress=False)
        assert not report["up_to_date"]
        assert sorted(fake.decoded) == sorted(expected_decoded)
        assert report["computed"] == len(expected_decoded)
        fresh = tmp_path / f"fresh{len(list(tmp_path.glob('fresh*')))}.h5"
        pipeline.preprocess(fake.root, fresh, config, progress=False)
        assert cache_content_hash(out) == cache_content_hash(fresh)

    # A DICOM touched (a new mtime): only that volume is decoded again.
    touched = Path(records[3].path)
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    rebuild_and_compare([touched])
    # A box moved within its slice (a CSV edit): the stored slices stay, only the boxes change; nothing is decoded.
    record = records[train_lesion]
    record.boxes[0] = dataclasses.replace(record.boxes[0], x=record.boxes[0].x + 2.0)
    record.boxes[0].csv.write_text(record.boxes[0].csv.read_text() + "moved\n")  # the CSV's content changed
    rebuild_and_compare([])
    # A lesion moved to another slice of a training volume: that volume keeps other slices, so it is decoded again.
    record.boxes[0] = dataclasses.replace(record.boxes[0], slice=record.boxes[0].slice + 1)
    record.boxes[0].csv.write_text(record.boxes[0].csv.read_text() + "moved again\n")
    rebuild_and_compare([Path(record.path)])


def _row(cache: SliceCache, record) -> int:
    keys = list(zip(cache.volumes["patient_id"], cache.volumes["study_uid"], cache.volumes["view"]))
    return keys.index((record.patient_id, record.study_uid, record.view))
