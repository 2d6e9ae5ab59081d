"""Volume inference: batching, edge slices, volume NMS, mapping back to the official frame, and inference over
a cache split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comoto_cli.cache.h5cache import CacheWriter, SliceCache, VolumeRecord
from comoto_cli.config import InferenceConfig
from comoto_cli.errors import InputDataError, UsageError
from comoto_cli.inference.volume import (
    DBTEX_COLUMNS,
    detect_cache,
    detect_volume,
    slice_range,
    top_volume_nms,
    volume_predictions,
)
from tests.conftest import random_boxes, tiny_model_config

HEIGHT, WIDTH = 64, 32


class SliceCodedModel(torch.nn.Module):
    """A fake detector: each slice's constant pixel value encodes its index (value = index / 100); the model
    returns the boxes listed for that index in ``plan`` and records every index it was shown."""

    def __init__(self, plan: dict[int, list[tuple[list[float], float]]]):
        super().__init__()
        self.image_size = (HEIGHT, WIDTH)
        self.plan = plan
        self.seen: list[int] = []
        self.batches: list[int] = []

    def predict(self, images: torch.Tensor, flip: bool = False):
        assert images.ndim == 4 and images.shape[1] == 1
        self.batches.append(images.shape[0])
        outputs = []
        for image in images:
            index = round(float(image.mean()) * 100)
            self.seen.append(index)
            boxes = [box for box, _ in self.plan.get(index, [])]
            scores = [score for _, score in self.plan.get(index, [])]
            outputs.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "scores": torch.tensor(scores, dtype=torch.float32)})
        return outputs


def coded_volume(num_slices: int) -> np.ndarray:
    return np.broadcast_to((np.arange(num_slices, dtype=np.float32) / 100)[:, None, None],
                           (num_slices, HEIGHT, WIDTH)).copy()


def tiny_detector(**changes):
    from comoto_cli.networks.detector import build_detector

    torch.manual_seed(0)
    model = build_detector(tiny_model_config(**changes), (HEIGHT * 2, WIDTH * 2)).eval()
    # An untrained RetinaNet scores every anchor near its prior (0.01); lift the classification bias so that
    # many anchors pass the score threshold and top-k, NMS and the detection cap all have work to do.
    head = model.detector.network.classification_head
    last = [module for module in head.modules() if isinstance(module, torch.nn.Conv2d)][-1]
    last.bias.data.fill_(-0.4)
    return model


# ---------------------------------------------------------------------------------------------- slices
def test_slice_range_skips_edges_but_keeps_short_volumes():
    assert list(slice_range(10, 0)) == list(range(10))
    assert list(slice_range(10, 4)) == [4, 5]
    assert list(slice_range(9, 4)) == [4]
    assert list(slice_range(5, 4)) == [2]  # too short to skip 4 at each end: the central slice remains
    assert list(slice_range(1, 4)) == [0]


def test_edge_slices_are_skipped_and_batches_respect_batch_size():
    plan = {0: [([1, 1, 9, 9], 0.9)], 5: [([1, 1, 9, 9], 0.8)], 9: [([1, 1, 9, 9], 0.7)]}
    model = SliceCodedModel(plan)
    detections = detect_volume(model, coded_volume(12), config=InferenceConfig(batch_size=3, skip_edge_slices=2),
                               device="cpu")
    assert model.seen == list(range(2, 10))
    assert max(model.batches) == 3 and sum(model.batches) == 8
    assert detections["slice_index"].tolist() == [5, 9]  # slice 0 was skipped
    np.testing.assert_allclose(detections["scores"], [0.8, 0.7])


def test_wrong_slice_size_is_a_clear_error():
    model = SliceCodedModel({})
    with pytest.raises(InputDataError, match="expects 64x32"):
        detect_volume(model, np.zeros((3, 32, 32), np.float32), config=InferenceConfig(), device="cpu")


def test_boxes_map_back_to_the_official_frame_after_volume_nms():
    box = [10.0, 20.0, 30.0, 40.0]  # cache frame xyxy
    plan = {
        2: [(box, 0.6)],
        3: [(box, 0.7), ([0.0, 0.0, 4.0, 4.0], 0.2)],  # slice 3's box beats slice 2's (same box, 1 slice away)
        12: [(box, 0.5)],  # 9 slices from slice 3: outside the +-4 window of a 16-slice volume
    }
    scale_y, scale_x = 0.25, 0.5  # cache pixels per official pixel
    rows = volume_predictions(SliceCodedModel(plan), coded_volume(16), scale_y=scale_y, scale_x=scale_x,
                              num_slices=16, config=InferenceConfig(), device="cpu")
    assert list(rows) == list(DBTEX_COLUMNS[3:])
    order = np.argsort(-rows["Score"])
    assert rows["Z"][order].tolist() == [3, 12, 3]
    np.testing.assert_allclose(rows["Score"][order], [0.7, 0.5, 0.2], rtol=1e-6)
    assert rows["Depth"].tolist() == [0, 0, 0]
    top = order[0]
    # Official frame: x / scale_x, y / scale_y; X, Y top-left, Width, Height sizes.
    assert (rows["X"][top], rows["Y"][top], rows["Width"][top], rows["Height"][top]) == pytest.approx(
        (20.0, 80.0, 40.0, 80.0))
    small = order[2]
    assert (rows["X"][small], rows["Y"][small], rows["Width"][small], rows["Height"][small]) == pytest.approx(
        (0.0, 0.0, 8.0, 16.0))


def test_max_boxes_per_volume_keeps_the_best():
    plan = {index: [([index, index, index + 5.0, index + 5.0], index / 100)] for index in range(0, 40, 8)}
    rows = volume_predictions(SliceCodedModel(plan), coded_volume(40), scale_y=1.0, scale_x=1.0,
                              config=InferenceConfig(max_boxes_per_volume=2), device="cpu")
    assert sorted(rows["Z"].tolist()) == [24, 32]


# ---------------------------------------------------------------------------------------------- volume NMS
def test_top_volume_nms_equals_volume_nms_on_everything():
    from comoto_cli.inference.volume_nms import volume_nms

    rng = np.random.default_rng(1)
    for trial in range(30):
        count, num_slices = int(rng.integers(0, 2000)), int(rng.integers(1, 50))
        slices = rng.integers(0, num_slices, count)
        boxes = random_boxes(rng, count, quantise=trial % 2 == 0)
        scores = rng.random(count).astype(np.float32)
        if trial % 3 == 0:
            scores = np.round(scores * 20) / 20
        config = InferenceConfig(max_boxes_per_volume=int(rng.choice([1, 10, 100])))
        expected = volume_nms(slices, boxes, scores, num_slices, iou_threshold=config.nms_iou,
                              min_score=config.nms_min_score, window_fraction=config.nms_window_fraction,
                              max_boxes=config.max_boxes_per_volume)
        np.testing.assert_array_equal(top_volume_nms(slices, boxes, scores, num_slices, config), expected)


# ---------------------------------------------------------------------------------------------- real detector
def test_batch_size_does_not_change_results():
    model = tiny_detector(detections_per_image=30)
    volume = np.random.default_rng(0).random((7, HEIGHT * 2, WIDTH * 2), dtype=np.float32)
    results = [volume_predictions(model, volume, scale_y=0.5, scale_x=0.25,
                                  config=InferenceConfig(batch_size=size, skip_edge_slices=1), device="cpu")
               for size in (1, 3, 16)]
    assert len(results[0]["Score"]) > 10
    assert set(results[0]["Z"].tolist()) <= set(range(1, 6))
    for other in results[1:]:
        assert other["Z"].tolist() == results[0]["Z"].tolist()
        for name in ("X", "Y", "Width", "Height", "Score"):
            np.testing.assert_allclose(other[name], results[0][name], rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------- cache
def write_cache(path, volumes: list[tuple[str, str, int, bool]]):
    """Volumes (patient, split, slices, all_slices): coded slices; a training volume may store only some."""
    writer = CacheWriter(path, modality="dbt", image_height=HEIGHT, image_width=WIDTH, config_json="{}",
                         config_hash="test")
    for patient, split, num_slices, complete in volumes:
        indices = list(range(num_slices)) if complete else [num_slices // 2]
        record = VolumeRecord(patient_id=patient, study_uid=f"study-{patient}", view="lcc", split=split,
                              source=f"{patient}.dcm", num_slices=num_slices, original_height=HEIGHT * 4,
                              original_width=WIDTH * 2, scale_y=0.25, scale_x=0.5)
        images = coded_volume(num_slices)[indices]
        writer.add_volume(record, indices, images, [np.zeros((0, 4))] * len(indices),
                          [np.zeros(0, np.int64)] * len(indices))
    writer.close()
    return SliceCache(path)


def test_detect_cache_covers_every_volume_of_the_split(tmp_path):
    cache = write_cache(tmp_path / "c.h5", [("p1", "test", 10, True), ("p2", "val", 8, True),
                                            ("p3", "test", 12, True), ("p4", "train", 9, False)])
    plan = {4: [([2.0, 4.0, 12.0, 14.0], 0.9)]}
    table = detect_cache(SliceCodedModel(plan), cache, "test", InferenceConfig(batch_size=4), "cpu", progress=False)
    assert list(table) == list(DBTEX_COLUMNS)
    assert table["PatientID"].tolist() == ["p1", "p3"]
    assert table["StudyUID"].tolist() == ["study-p1", "study-p3"]
    assert table["Z"].tolist() == [4, 4]
    assert table["X"].tolist() == pytest.approx([4.0, 4.0]) and table["Y"].tolist() == pytest.approx([16.0, 16.0])
    assert table["Width"].tolist() == pytest.approx([20.0, 20.0])
    assert table["Height"].tolist() == pytest.approx([40.0, 40.0])
    with pytest.raises(UsageError, match="stores 1 of its 9 slices"):
        detect_cache(SliceCodedModel(plan), cache, "train", InferenceConfig(), "cpu", progress=False)
    cache.close()


def test_slices_read_ahead_by_worker_processes_give_the_same_predictions(tmp_path):
    cache = write_cache(tmp_path / "c.h5", [("p1", "test", 10, True), ("p2", "val", 8, True),
                                            ("p3", "test", 12, True), ("p4", "train", 9, False)])
    cache.images(slice(0, 1))  # an open HDF5 handle in the parent: the workers must open their own
    plan = {index: [([2.0 + index, 4.0, 12.0 + index, 14.0], 0.5 + index / 100)] for index in range(12)}
    for skip in (0, 2):
        config = InferenceConfig(batch_size=3, skip_edge_slices=skip, num_workers=0)
        inline_model, ahead_model = SliceCodedModel(plan), SliceCodedModel(plan)
        inline = detect_cache(inline_model, cache, "test", config, "cpu", progress=False)
        ahead = detect_cache(ahead_model, cache, "test", config.model_copy(update={"num_workers": 2}), "cpu",
                              progress=False)
        # The model reads each slice's index from its pixels: the streamed slices came in the same order.
        assert ahead_model.seen == inline_model.seen and len(inline_model.seen) == 22 - 4 * skip
        assert len(inline["Score"]) > 0
        for column in DBTEX_COLUMNS:
            assert np.array_equal(inline[column], ahead[column]), column
    cache.close()


def test_automatic_loader_workers_follow_the_device_and_the_cores(monkeypatch):
    from comoto_cli.utils import system

    monkeypatch.setattr(system, "usable_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert system.loader_workers("auto", "cpu") == 0  # the model's threads use the cores
    assert system.loader_workers("auto", "cuda") == 8  # 15 free cores, at most 8
    assert system.loader_workers("auto", "cuda", loaders=2) == 4  # distill: DBT and mammography loaders
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four GPU processes share the node
    assert system.loader_workers("auto", "cuda") == 3
    monkeypatch.setattr(system, "usable_cores", lambda: 1)
    assert system.loader_workers("auto", "cuda") == 0
    assert system.loader_workers(5, "cpu") == 5  # an explicit count is kept


def test_automatic_validation_schedule_thins_out_on_large_validation_sets():
    from comoto_cli.engine.trainer import AUTO_VAL_EVERY, LARGE_VALIDATION, resolve_val_every

    assert resolve_val_every("auto", 12) == 1
    assert resolve_val_every("auto", LARGE_VALIDATION + 1) == AUTO_VAL_EVERY > 1
    assert resolve_val_every(3, 10_000) == 3
