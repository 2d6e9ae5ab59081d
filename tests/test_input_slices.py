"""2.5-D input (model.input_slices): the training cache stores each training slice's neighbours as context, the
dataset and volume inference give a slice with its neighbours as channels (clamped at the volume's ends), and a
2.5-D student starts from a 2-D teacher with the same response to a grey image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from comoto_cli.cache import SliceCache
from comoto_cli.config import AugmentConfig, InferenceConfig, PreprocessConfig
from comoto_cli.data.datasets import DetectionDataset, augment_sample, collate_detection, move_batch
from comoto_cli.errors import InputDataError
from comoto_cli.inference.volume import detect_cache, detect_volume, read_range, slice_range
from comoto_cli.networks.backbone import fit_first_conv
from comoto_cli.networks.detector import build_detector
from comoto_cli.preprocess.pipeline import preprocess, preprocess_config_hash, with_context
from tests.conftest import TINY_CACHE_SIZE, TINY_TRAIN, tiny_model_config

SPLIT = {"val_fraction": 0.25, "test_fraction": 0.25}


def test_context_slices_are_the_clamped_neighbours_not_the_training_slices():
    stored, context = with_context([0, 5], 8, 1)
    assert stored == [0, 1, 4, 5, 6] and context == {1, 4, 6}
    assert with_context([7], 8, 2) == ([5, 6, 7], frozenset({5, 6}))
    assert with_context([3], 8, 0) == ([3], frozenset())
    assert with_context([2, 3], 8, 1) == ([1, 2, 3, 4], frozenset({1, 4}))  # a training slice is never context


@pytest.fixture(scope="module")
def context_caches(tiny_synth, tmp_path_factory):
    """The tiny DBT set with one context slice each side, and without context but with the lesion slices' neighbours
    stored as training slices (the same pixels for those slices)."""
    folder = tmp_path_factory.mktemp("context")
    caches = {}
    for name, fields in (("context", {"context_slices": 1}), ("plain", {}), ("offset", {"lesion_slice_offset": 1})):
        caches[name] = folder / f"{name}.h5"
        preprocess(tiny_synth / "dbt", caches[name],
                   PreprocessConfig(modality="dbt", workers=1, split=SPLIT, **fields, **TINY_CACHE_SIZE), progress=False)
    return caches


def _samples(cache: SliceCache) -> set[tuple[int, int]]:
    rows = cache.slices_in_split("train")
    return {(int(cache.slice_volume[r]), int(cache.slice_index[r])) for r in rows}


def test_context_cache_keeps_the_same_samples_and_stores_their_neighbours(context_caches):
    context, plain, offset = (SliceCache(context_caches[k]) for k in ("context", "plain", "offset"))
    assert context.context_slices == 1 and plain.context_slices == 0
    assert not plain.slice_context.any() and context.slice_context.any()
    assert _samples(context) == _samples(plain)  # the training samples are unchanged
    assert np.all(context.box_count[context.slice_context] == 0)  # a neighbour channel carries no boxes
    from comoto_cli.preprocess.summary import cache_summary

    summary = cache_summary(context_caches["context"])
    assert summary["total"]["context_slices"] == int(context.slice_context.sum())
    assert summary["splits"]["train"]["slices"] - summary["splits"]["train"]["context_slices"] == len(_samples(plain))
    assert cache_summary(context_caches["plain"])["total"]["context_slices"] == 0
    rows = context.slices_in_split("train")
    windows = context.window_rows(rows, 1)
    for row, window in zip(rows, windows):
        volume, index = int(context.slice_volume[row]), int(context.slice_index[row])
        last = int(context.volumes["num_slices"][volume]) - 1
        assert window[1] == row
        assert [int(context.slice_volume[w]) for w in window] == [volume] * 3
        assert [int(context.slice_index[w]) for w in window] == [max(index - 1, 0), index, min(index + 1, last)]
    # The context pixels are the slices' own: the offset cache stores the lesion slices' neighbours as samples.
    by_key = {(int(offset.slice_volume[r]), int(offset.slice_index[r])): r for r in range(offset.num_slices)}
    compared = 0
    for row in np.flatnonzero(context.slice_context):
        key = (int(context.slice_volume[row]), int(context.slice_index[row]))
        if key in by_key:
            np.testing.assert_array_equal(context.images_f16(int(row)), offset.images_f16(by_key[key]))
            compared += 1
    assert compared > 0


def test_context_slices_zero_keeps_the_config_hash():
    plain = PreprocessConfig()
    assert "context_slices" not in json.loads(plain.model_dump_json())
    assert preprocess_config_hash(plain) == preprocess_config_hash(PreprocessConfig(context_slices=0))
    assert preprocess_config_hash(plain) != preprocess_config_hash(PreprocessConfig(context_slices=1))
    assert "input_slices" not in tiny_model_config().model_dump_json()  # old checkpoints and runs read the same


def test_a_window_without_stored_neighbours_is_one_clear_error(context_caches):
    with pytest.raises(InputDataError, match="context_slices >= 1"):
        DetectionDataset(context_caches["plain"], "train", input_slices=3)
    with pytest.raises(InputDataError, match="context_slices >= 2"):
        DetectionDataset(context_caches["context"], "train", input_slices=5)


def test_a_2_5d_sample_is_its_slice_and_neighbours_augmented_alike(context_caches):
    augment = AugmentConfig(horizontal_flip=0.5, vertical_flip=0.5, intensity_jitter=0.1, on_device=False)
    flat = DetectionDataset(context_caches["context"], "train", augment=augment, seed=3)
    deep = DetectionDataset(context_caches["context"], "train", augment=augment, seed=3, input_slices=3)
    cache = deep.cache
    flips = set()
    for index in range(len(deep)):
        sample, reference = deep[index], flat[index]
        assert sample["image"].shape == (3, *TINY_CACHE_SIZE.values())
        torch.testing.assert_close(sample["image"][1:2], reference["image"], rtol=0, atol=0)
        torch.testing.assert_close(sample["boxes"], reference["boxes"], rtol=0, atol=0)
        # Every channel went through the same flips and jitter as the middle one.
        rng = np.random.default_rng([3, 0, index])
        draws = rng.random(4)
        flips.add((bool(draws[0] < 0.5), bool(draws[1] < 0.5)))
        for channel, row in enumerate(cache.window_rows(deep.rows[index:index + 1], 1)[0]):
            expected, _ = augment_sample(cache.image(int(row)), np.zeros((0, 4), np.float32), augment,
                                         np.random.default_rng([3, 0, index]))
            np.testing.assert_array_equal(sample["image"][channel].numpy(), expected)
    assert len(flips) > 1  # the check saw flipped and unflipped samples
    # On the device: the same pixels for every channel (augment.on_device, the GPU default).
    on_device = DetectionDataset(context_caches["context"], "train", seed=3, input_slices=3,
                                 augment=augment.model_copy(update={"on_device": True}))
    batch = collate_detection([on_device[i] for i in range(len(on_device))])
    augmented = move_batch(batch, torch.device("cpu"))["images"]
    for index in range(len(deep)):
        torch.testing.assert_close(augmented[index], deep[index]["image"], rtol=0, atol=0)
    # Unaugmented, each channel is its stored slice.
    plain = DetectionDataset(context_caches["context"], "train", input_slices=3)
    for index in range(len(plain)):
        window = cache.window_rows(plain.rows[index:index + 1], 1)[0]
        expected = np.stack([cache.image(int(r)) for r in window])
        np.testing.assert_array_equal(plain[index]["image"].numpy(), expected)


def test_a_2_5d_student_from_a_2d_teacher_answers_a_grey_image_the_same():
    torch.manual_seed(0)
    teacher = build_detector(tiny_model_config(), (64, 64), load_weights=False).eval()
    student = build_detector(tiny_model_config(input_slices=3), (64, 64), load_weights=False).eval()
    assert student.backbone.body.conv1.weight.shape[1] == 3
    from comoto_cli.engine.distill import fitted_to

    student.load_state_dict(fitted_to(teacher.state_dict(), student.state_dict()))
    grey = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = teacher.backbone(grey)
        for images in (grey, grey.expand(-1, 3, -1, -1)):  # a mammogram, or three equal slices
            for name, value in student.backbone(images).items():
                torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5)
    weight = torch.randn(4, 1, 7, 7)
    assert torch.allclose(fit_first_conv(fit_first_conv(weight, 5), 1), weight, atol=1e-6)
    assert fit_first_conv(weight, 1) is weight
    rgb = torch.randn(4, 3, 7, 7)  # e.g. ImageNet filters into a 5-slice model: the same grey response
    grey = torch.rand(1, 1, 16, 16)
    conv = torch.nn.functional.conv2d
    torch.testing.assert_close(conv(grey.expand(-1, 5, -1, -1), fit_first_conv(rgb, 5)),
                               conv(grey.expand(-1, 3, -1, -1), rgb), rtol=1e-4, atol=1e-5)
    assert fit_first_conv(rgb, 3) is rgb


def test_a_teacher_whose_input_cannot_take_the_students_slices_is_one_usage_error(tmp_path):
    from comoto_cli.engine.distill import with_input_slices
    from comoto_cli.errors import UsageError

    assert with_input_slices(tiny_model_config(), 5, tmp_path).input_slices == 5
    with pytest.raises(UsageError, match="input_slices must be 1 or 3"):
        with_input_slices(tiny_model_config(input_norm="imagenet"), 5, tmp_path / "teacher.pt")


class _Recorder:
    """A stand-in 2.5-D model: records the batches it is given, detects nothing."""

    def __init__(self, slices: int, size=(8, 6)):
        self.config = tiny_model_config(input_slices=slices)
        self.image_size = size
        self.batches: list[torch.Tensor] = []

    def eval(self):
        return self

    def to(self, device):
        return self

    def predict(self, batch, flip=False):
        self.batches.append(batch.clone())
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)} for _ in batch]


class _AscendingSource:
    """A lazy slice source that fails unless it is read once, in ascending contiguous ranges."""

    def __init__(self, volume: np.ndarray, first: int):
        self.volume, self.shape, self.next = volume, volume.shape, first

    def __getitem__(self, index: slice) -> np.ndarray:
        assert index.start == self.next, (index, self.next)
        self.next = index.stop
        return self.volume[index]


@pytest.mark.parametrize("slices,count,skip,batch", [(3, 9, 0, 4), (3, 9, 2, 3), (5, 9, 1, 1), (5, 9, 0, 16),
                                                      (3, 1, 0, 4), (5, 4, 3, 2), (5, 2, 0, 1)])
def test_volume_inference_reads_once_and_gives_each_slice_its_neighbours(slices, count, skip, batch):
    volume = np.random.default_rng(slices + skip).random((count, 8, 6)).astype(np.float32)
    model = _Recorder(slices)
    config = InferenceConfig(skip_edge_slices=skip, batch_size=batch)
    reads = read_range(count, skip, slices // 2)
    source = _AscendingSource(volume, reads.start)
    detect_volume(model, source, config=config)
    assert source.next == reads.stop  # every needed slice read, once
    seen = torch.cat(model.batches).numpy()
    wanted = slice_range(count, skip)
    assert seen.shape == (len(wanted), slices, 8, 6) and len(wanted) > 0
    for position, index in enumerate(wanted):
        neighbours = np.clip(np.arange(index - slices // 2, index + slices // 2 + 1), 0, count - 1)
        np.testing.assert_array_equal(seen[position], volume[neighbours])


def test_streamed_cache_inference_gives_the_same_windows(context_caches):
    """detect_cache reading ahead in a worker process gives the detector the same windows as reading in turn."""
    cache = SliceCache(context_caches["context"])
    seen = {}
    for workers in (0, 1):
        model = _Recorder(3, size=(cache.image_height, cache.image_width))
        detect_cache(model, cache, "test", InferenceConfig(skip_edge_slices=1, batch_size=3, num_workers=workers),
                     progress=False)
        seen[workers] = torch.cat(model.batches)
    assert seen[0].shape[1] == 3 and len(seen[0]) > 0
    torch.testing.assert_close(seen[0], seen[1], rtol=0, atol=0)


@pytest.mark.slow
def test_a_2_5d_student_trains_from_the_teacher_evaluates_and_exports(context_caches, tiny_caches, tiny_teacher,
                                                                      tmp_path):
    from comoto_cli.cli import main
    from comoto_cli.inference.export import read_metadata

    out = tmp_path / "student"
    config = {**TINY_TRAIN, "epochs": 1, "model": {**TINY_TRAIN["model"], "input_slices": 3}}
    path = tmp_path / "student.json"
    path.write_text(json.dumps(config))
    for mode in ("pretrain", "lesion"):
        with pytest.raises(SystemExit) as info:
            main(["distill", "--config", str(path), "--cache", str(context_caches["context"]), "--teacher",
                  str(tiny_teacher), "--teacher-cache", str(tiny_caches["mammo"]), "--mode", mode,
                  "--out", str(out / mode)])
        assert info.value.code == 0
        checkpoint = torch.load(out / mode / "best.pt", weights_only=True)
        assert json.loads(checkpoint["model_config"])["input_slices"] == 3
        assert checkpoint["model_state"]["detector.network.feature_extractor.body.conv1.weight"].shape[1] == 3
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--checkpoint", str(out / "lesion" / "best.pt"), "--cache", str(context_caches["context"]),
              "--split", "test", "--out", str(tmp_path / "evaluation")])
    assert info.value.code == 0
    assert json.loads((tmp_path / "evaluation" / "metrics.json").read_text())["split"] == "test"
    exported = tmp_path / "student.torchscript.pt"
    with pytest.raises(SystemExit) as info:
        main(["export", str(out / "lesion" / "best.pt"), "--out", str(exported)])
    assert info.value.code == 0
    assert read_metadata(exported)["input"]["shape"][1] == 3
    module = torch.jit.load(str(exported))
    logits, _ = module(torch.rand(1, 3, *TINY_CACHE_SIZE.values()))
    assert torch.isfinite(logits).all()


def test_context_shards_merge_to_the_single_run(context_caches, tiny_synth, tmp_path):
    """The context flags travel through ``--shard`` and ``cache merge`` like the rest of the cache."""
    from comoto_cli.preprocess.merge import merge_caches
    from comoto_cli.preprocess.summary import cache_content_hash

    config = PreprocessConfig(modality="dbt", workers=1, split=SPLIT, context_slices=1, **TINY_CACHE_SIZE)
    shards = []
    for index in (1, 2):
        shards.append(tmp_path / f"shard{index}.h5")
        preprocess(tiny_synth / "dbt", shards[-1], config, shard=(index, 2), progress=False)
    merge_caches(tmp_path / "merged.h5", shards, progress=False)
    assert cache_content_hash(tmp_path / "merged.h5") == cache_content_hash(context_caches["context"])
    np.testing.assert_array_equal(SliceCache(tmp_path / "merged.h5").slice_context,
                                  SliceCache(context_caches["context"]).slice_context)
