"""The shared training engine: datasets and augmentation, the sampler, the loop and its hooks, resume,
validation metrics. Tiny ResNet-18 on 64x64 bright-disk images; the whole file runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from comoto_cli.config import AugmentConfig, TrainConfig
from tests.conftest import TINY_MODEL, build_tiny_cache


def tiny_config(**changes) -> TrainConfig:
    values = {"model": TINY_MODEL, "optim": {"name": "adamw", "lr": 1e-3, "scheduler": "none"}, "epochs": 3,
              "batch_size": 4, "val_batch_size": 8, "log_every": 1}
    values.update(changes)
    return TrainConfig.model_validate(values)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    return build_tiny_cache(tmp_path_factory.mktemp("cache") / "tiny.h5")


# ------------------------------------------------------------------------------------------------ datasets
def test_augmentation_keeps_boxes_on_the_lesion(tiny_cache):
    from comoto_cli.data.datasets import DetectionDataset

    augment = AugmentConfig(horizontal_flip=0.5, vertical_flip=0.5, intensity_jitter=0.0)
    dataset = DetectionDataset(tiny_cache, "train", augment=augment, seed=3)
    plain = DetectionDataset(tiny_cache, "train")
    flipped_h = flipped_v = 0
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            sample, original = dataset[index], plain[index]
            image = sample["image"][0].numpy()
            if len(sample["boxes"]) == 0:
                continue
            x0, y0, x1, y1 = sample["boxes"][0].round().int().tolist()
            inside = image[y0:y1, x0:x1].mean()
            mask = np.ones_like(image, dtype=bool)
            mask[y0:y1, x0:x1] = False
            assert inside > image[mask].mean() + 0.3  # the bright disk moved with its box
            ox0, oy0, ox1, oy1 = original["boxes"][0].tolist()
            bx0, by0, bx1, by1 = sample["boxes"][0].tolist()
            flipped_h += not np.isclose(bx0, ox0)
            flipped_v += not np.isclose(by0, oy0)
            assert np.isclose(bx1 - bx0, ox1 - ox0) and np.isclose(by1 - by0, oy1 - oy0)
    assert flipped_h > 0 and flipped_v > 0


def test_augmentation_is_a_function_of_seed_epoch_index(tiny_cache):
    from comoto_cli.data.datasets import DetectionDataset

    first = DetectionDataset(tiny_cache, "train", augment=AugmentConfig(), seed=1)
    second = DetectionDataset(tiny_cache, "train", augment=AugmentConfig(), seed=1)
    torch.manual_seed(123)  # the global RNG must not matter
    a = first[2]
    torch.manual_seed(456)
    b = second[2]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
    changed = 0
    for epoch in range(1, 5):
        second.set_epoch(epoch)
        changed += not torch.equal(second[2]["image"], a["image"])
    assert changed > 0
    assert 0.0 <= float(a["image"].min()) and float(a["image"].max()) <= 1.0


@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_on_device_augmentation_gives_the_loaders_pixels_and_boxes(tiny_cache, jitter):
    """augment.on_device: the loader leaves the pixels alone and move_batch augments them; the batch that reaches the
    model is the same, bit for bit, as with augmentation in the loader."""
    from comoto_cli.data.datasets import DetectionDataset, collate_detection, move_batch

    in_loader = DetectionDataset(tiny_cache, "train", augment=AugmentConfig(intensity_jitter=jitter, on_device=False),
                                 seed=5)
    on_device = DetectionDataset(tiny_cache, "train", augment=AugmentConfig(intensity_jitter=jitter, on_device=True),
                                 seed=5)
    for epoch in range(3):
        in_loader.set_epoch(epoch)
        on_device.set_epoch(epoch)
        indices = range(len(in_loader))
        raw = collate_detection([on_device[i] for i in indices])
        assert "augment" in raw and torch.equal(raw["images"], collate_detection(
            [DetectionDataset(tiny_cache, "train")[i] for i in indices])["images"])  # the loader left the pixels
        expected = move_batch(collate_detection([in_loader[i] for i in indices]), torch.device("cpu"))
        got = move_batch(raw, torch.device("cpu"))
        assert torch.equal(got["images"], expected["images"])
        for a, b in zip(got["targets"], expected["targets"]):
            assert torch.equal(a["boxes"], b["boxes"])
    assert torch.any(raw["augment"][:, 0] == 1) and torch.any(raw["augment"][:, 1] == 1)


@pytest.mark.parametrize("cuda", [False, True])
def test_on_device_auto_follows_the_training_device(tiny_cache, monkeypatch, cuda):
    """The default, "auto": augmentation moves to the device exactly when training runs on a GPU (the engine picks
    CUDA whenever it is available); on the CPU it stays in the loader, where workers run it beside the step."""
    from comoto_cli.data.datasets import DetectionDataset

    assert AugmentConfig().on_device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    sample = DetectionDataset(tiny_cache, "train", augment=AugmentConfig(), seed=0)[0]
    assert ("augment" in sample) is cuda
    assert sample["image"].dtype == (torch.float16 if cuda else torch.float32)
    assert DetectionDataset(tiny_cache, "val").on_device is False  # no augmentation, nothing to move


def test_stored_precision_batches_reach_the_device_as_the_float32_ones(tiny_cache):
    """Unaugmented batches (the LsKD teacher's) may travel as the stored float16: move_batch widens them to the
    float32 pixels the plain loader gives, exactly."""
    from comoto_cli.data.datasets import DetectionDataset, collate_detection, move_batch

    half = DetectionDataset(tiny_cache, "train", stored_precision=True)
    plain = DetectionDataset(tiny_cache, "train")
    indices = range(len(plain))
    raw = collate_detection([half[i] for i in indices])
    assert raw["images"].dtype == torch.float16 and "augment" not in raw
    moved = move_batch(raw, torch.device("cpu"))["images"]
    assert moved.dtype == torch.float32
    assert torch.equal(moved, move_batch(collate_detection([plain[i] for i in indices]), torch.device("cpu"))["images"])


def test_collate_and_lesions_only(tiny_cache):
    from comoto_cli.data.datasets import DetectionDataset, collate_detection

    dataset = DetectionDataset(tiny_cache, "train")
    batch = collate_detection([dataset[i] for i in range(4)])
    assert batch["images"].shape == (4, 1, 64, 64) and batch["images"].dtype == torch.float32
    assert [len(t["boxes"]) for t in batch["targets"]] == [1, 1, 1, 0]
    assert all(t["labels"].dtype == torch.int64 and t["labels"].sum() == 0 for t in batch["targets"])
    lesions = DetectionDataset(tiny_cache, "train", lesions_only=True)
    assert len(lesions) == dataset.num_with_lesions() == 9
    assert all(len(lesions[i]["boxes"]) == 1 for i in range(len(lesions)))


def test_worker_processes_load_the_same_batches(tiny_cache):
    from comoto_cli.data.datasets import DetectionDataset, make_loader, make_sampler

    dataset = DetectionDataset(tiny_cache, "train", augment=AugmentConfig(), seed=2)
    dataset.set_epoch(1)
    dataset.cache.image(0)  # an HDF5 handle open in the main process before the workers fork
    batches = []
    for workers in (0, 2):
        sampler = make_sampler(dataset, seed=2)
        sampler.set_epoch(1)
        loader = make_loader(dataset, batch_size=5, sampler=sampler, num_workers=workers, seed=2)
        batches.append(list(loader))
    assert len(batches[0]) == len(batches[1]) == 3
    for a, b in zip(*batches):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["rows"], b["rows"])
        assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a["targets"], b["targets"]))


def test_sampler_is_seeded_and_splits_ranks(tiny_cache):
    from comoto_cli.data.datasets import DetectionDataset, make_sampler

    dataset = DetectionDataset(tiny_cache, "train")
    one = make_sampler(dataset, seed=5)
    again = make_sampler(dataset, seed=5)
    one.set_epoch(2)
    again.set_epoch(2)
    assert list(one) == list(again) and sorted(one) == list(range(len(dataset)))
    again.set_epoch(3)
    assert list(one) != list(again)
    ranks = [make_sampler(dataset, seed=5, rank=r, world_size=2) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(2)
    assert sorted(list(ranks[0]) + list(ranks[1])) == list(range(len(dataset)))


def test_infinite_batches_cycles_past_one_pass(tiny_cache):
    from comoto_cli.data.datasets import DetectionDataset, infinite_batches

    dataset = DetectionDataset(tiny_cache, "train", lesions_only=True)
    stream = infinite_batches(dataset, batch_size=4, seed=0)
    rows = [next(stream)["rows"].tolist() for _ in range(7)]  # 9 images: 3 batches a pass
    first_pass = sorted(row for batch in rows[:3] for row in batch)
    assert first_pass == sorted(dataset.rows.tolist())
    assert rows[3:6] != rows[:3]  # reshuffled
    again = infinite_batches(dataset, batch_size=4, seed=0)
    assert [next(again)["rows"].tolist() for _ in range(7)] == rows


# ------------------------------------------------------------------------------------------------ validation
def test_detection_metrics_perfect_and_empty():
    from comoto_cli.evaluation.validation import detection_metrics

    truth = [np.array([[10.0, 10.0, 20.0, 20.0]]), np.zeros((0, 4)), np.array([[30.0, 30.0, 40.0, 44.0]])]
    perfect = [{"boxes": g.copy(), "scores": np.full(len(g), 0.9)} for g in truth]
    metrics = detection_metrics(perfect, truth)
    assert metrics["mean_sensitivity"] == pytest.approx(1.0)
    assert metrics["map"] == pytest.approx(1.0) and metrics["ap_50"] == pytest.approx(1.0)
    assert metrics["num_lesions"] == 2 and metrics["num_images"] == 3
    empty = [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0)} for _ in truth]
    metrics = detection_metrics(empty, truth)
    assert metrics["mean_sensitivity"] == pytest.approx(0.0) and metrics["map"] == pytest.approx(0.0)
    wrong = [{"boxes": np.array([[50.0, 0.0, 60.0, 8.0]]), "scores": np.array([0.8])} for _ in truth]
    assert detection_metrics(wrong, truth)["sensitivity_at_4_fp"] == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------------ the loop
def _run(tmp_path: Path, cache: Path, name: str, *, config: TrainConfig, extra: bool = True, resume=False):
    from comoto_cli.data.datasets import DetectionDataset
    from comoto_cli.engine.trainer import seed_everything, train
    from comoto_cli.networks.detector import build_detector

    seed_everything(config.seed)
    model = build_detector(config.model, (64, 64))
    train_set = DetectionDataset(cache, "train", augment=config.augment, seed=config.seed)
    calls = []

    def extra_loss(batch, losses, features, ctx):
        calls.append((ctx.epoch, ctx.step, features.shape[0]))
        assert features.requires_grad and features.shape[0] == batch["images"].shape[0]
        assert set(losses) == {"classification", "box_regression"}
        points = features.mean(dim=(2, 3))  # (B, C)
        return {"toy": 0.01 * ctx.extra_modules["head"](points).pow(2).mean()}

    def val_fn(model):
        assert not model.training
        return {"score": float(sum(p.detach().abs().sum() for p in model.parameters()))}

    summary = train(config, model=model, train_set=train_set, val_fn=val_fn,
                    run_dir=tmp_path / name, extra_loss=extra_loss if extra else None,
                    extra_modules={"head": torch.nn.Linear(model.feature_channels, 3)} if extra else None,
                    resume=resume, metadata={"kind": "test"})
    return summary, calls


def _without_time(history):
    return [{k: v for k, v in record.items() if k != "time"} for record in history]


@pytest.mark.trained
def test_training_reduces_loss_logs_and_checkpoints(tmp_path, tiny_cache):
    from comoto_cli.networks.checkpoint import load_checkpoint

    config = tiny_config(epochs=4, best_metric="score")
    summary, calls = _run(tmp_path, tiny_cache, "run", config=config)
    history = summary["history"]
    first, last = history[0]["losses"], history[-1]["losses"]
    assert last["total"] < 0.7 * first["total"]
    assert last["classification"] < first["classification"]
    assert {"classification", "box_regression", "toy", "total"} <= set(first)
    assert len(calls) == 4 * 3 and [c[1] for c in calls] == list(range(12))  # 12 images / batch 4
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4]
    assert lines == json.loads(json.dumps(history))
    config_json = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config_json["epochs"] == 4 and config_json["model"]["width"] == [8, 16, 32, 64]
    for name in ("last.pt", "best.pt"):
        raw = torch.load(tmp_path / "run" / name, map_location="cpu", weights_only=True)
        assert "head" in raw["extra_states"] and raw["metadata"]["kind"] == "test"
    last_ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    best_ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert last_ckpt["metadata"]["epoch"] == 4 and len(last_ckpt["metadata"]["history"]) == 4
    best_epoch = summary["best_epoch"]
    assert best_ckpt["metadata"]["epoch"] == best_epoch
    scores = [h["val"]["score"] for h in history]
    assert best_epoch == int(np.argmax(scores)) + 1


@pytest.mark.trained
def test_same_seed_same_metrics_and_resume_matches(tmp_path, tiny_cache):
    config = tiny_config(epochs=3, best_metric="score", optim={"name": "sgd", "lr": 0.01, "scheduler": "step",
                                                                "step_size": 1, "gamma": 0.5, "grad_clip": 5.0})
    full, _ = _run(tmp_path, tiny_cache, "a", config=config)
    again, _ = _run(tmp_path, tiny_cache, "b", config=config)
    assert _without_time(full["history"]) == _without_time(again["history"])
    assert [h["lr"] for h in full["history"]] == pytest.approx([0.01, 0.005, 0.0025])

    # a run stopped after epoch 1 (as if killed), with a stale extra metrics line, then resumed
    _run(tmp_path, tiny_cache, "c", config=config.model_copy(update={"epochs": 1}))
    with open(tmp_path / "c" / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"epoch": 2, "partial": True}) + "\n")
    resumed, calls = _run(tmp_path, tiny_cache, "c", config=config, resume=True)
    assert calls[0][:2] == (1, 3)  # continues at epoch 2, global step 3
    assert _without_time(resumed["history"]) == _without_time(full["history"])
    lines = (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_unknown_best_metric_is_a_usage_error(tmp_path, tiny_cache):
    from comoto_cli.errors import UsageError

    with pytest.raises(UsageError, match="best_metric"):
        _run(tmp_path, tiny_cache, "bad", config=tiny_config(epochs=1, best_metric="nope"), extra=False)


def test_metric_improved():
    from comoto_cli.engine.trainer import metric_improved

    assert metric_improved(0.1, None, "mean_sensitivity")
    assert metric_improved(0.2, 0.1, "mean_sensitivity") and not metric_improved(0.1, 0.1, "mean_sensitivity")
    assert metric_improved(0.1, 0.2, "val_loss") and not metric_improved(0.3, 0.2, "val_loss")
    assert not metric_improved(None, 0.1, "map") and not metric_improved(float("nan"), None, "map")


def test_epoch_line_keeps_total_last():
    from comoto_cli.engine.trainer import _format_losses

    # an epoch whose first batch had no lesion point records "total" before the ImPA term appears
    line = _format_losses({"classification": 0.1, "total": 0.9, "impa": 0.5})
    assert line == "classification 0.1000 impa 0.5000 total 0.9000"


def test_resume_refuses_to_stretch_a_cosine_schedule(tmp_path, tiny_cache):
    from comoto_cli.errors import UsageError

    config = tiny_config(epochs=1, best_metric="score", optim={"name": "adamw", "lr": 1e-3, "scheduler": "cosine"})
    _run(tmp_path, tiny_cache, "cos", config=config)
    with pytest.raises(UsageError, match="planned for 1 epochs, not 2"):
        _run(tmp_path, tiny_cache, "cos", config=config.model_copy(update={"epochs": 2}), resume=True)
    assert [json.loads(line)["epoch"] for line in (tmp_path / "cos" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_val_every_validates_on_schedule_and_after_the_last_epoch(tmp_path, tiny_cache):
    config = tiny_config(epochs=5, best_metric="score", val_every=2)
    summary, _ = _run(tmp_path, tiny_cache, "sparse", config=config)
    validated = [record["epoch"] for record in summary["history"] if record["val"]]
    assert validated == [2, 4, 5]
    assert summary["best_epoch"] in validated
    assert not any(record["is_best"] for record in summary["history"] if not record["val"])
