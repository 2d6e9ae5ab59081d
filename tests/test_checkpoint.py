"""Safe checkpoints: round trips, refusal of code-executing pickles, architecture checks, RNG state."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from comoto_cli.config import ModelConfig
from comoto_cli.errors import CheckpointError
from comoto_cli.networks.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    load_detector,
    restore_rng_state,
    save_checkpoint,
)
from comoto_cli.networks.detector import build_detector
from tests.conftest import tiny_model_config

SIZE = (64, 64)


tiny_config = tiny_model_config


def batch():
    images = torch.rand(2, 1, *SIZE, generator=torch.Generator().manual_seed(0))
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 30.0, 44.0]]), "labels": torch.zeros(1, dtype=torch.int64)},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


def trained(config: ModelConfig):
    torch.manual_seed(0)
    detector = build_detector(config, SIZE)
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    images, targets = batch()
    losses, _ = detector.forward_train(images, targets)
    (losses["classification"] + losses["box_regression"]).backward()
    optimizer.step()
    scheduler.step()
    return detector, optimizer, scheduler


def test_round_trip_model_optimizer_scheduler(tmp_path):
    config = tiny_config()
    detector, optimizer, scheduler = trained(config)
    projection = torch.nn.Linear(9, 9)
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(
        path,
        model_state=detector.state_dict(),
        model_config=config,
        image_size=SIZE,
        metadata={"epoch": np.int64(3), "metrics": {"mean_sensitivity": np.float32(0.5)}, "cache": tmp_path},
        optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(),
        extra_states={"projection": projection.state_dict()},
    )
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left behind

    restored, checkpoint = load_detector(path, expected=config)
    images, _ = batch()
    detector.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(detector.distill_features(images), restored.distill_features(images))
    before, after = detector.predict(images), restored.predict(images)
    assert all(
        torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
        for a, b in zip(before, after)
    )

    assert checkpoint["model_config"] == config
    assert checkpoint["image_size"] == SIZE
    assert checkpoint["metadata"] == {
        "epoch": 3,
        "metrics": {"mean_sensitivity": 0.5},
        "cache": str(tmp_path),
    }

    new_detector = build_detector(config, SIZE)
    new_optimizer = torch.optim.SGD(new_detector.parameters(), lr=0.01, momentum=0.9)
    new_optimizer.load_state_dict(checkpoint["optimizer_state"])
    old_buffers = [s["momentum_buffer"] for s in optimizer.state_dict()["state"].values()]
    new_buffers = [s["momentum_buffer"] for s in new_optimizer.state_dict()["state"].values()]
    assert len(old_buffers) == len(new_buffers) > 0
    assert all(torch.equal(a, b) for a, b in zip(old_buffers, new_buffers))
    new_scheduler = torch.optim.lr_scheduler.StepLR(new_optimizer, step_size=1, gamma=0.5)
    new_scheduler.load_state_dict(checkpoint["scheduler_state"])
    assert new_scheduler.get_last_lr() == scheduler.get_last_lr() == [0.005]
    new_projection = torch.nn.Linear(9, 9)
    new_projection.load_state_dict(checkpoint["extra_states"]["projection"])
    assert torch.equal(new_projection.weight, projection.weight)


def test_inference_settings_may_differ_architecture_may_not(tmp_path):
    config = tiny_config()
    path = tmp_path / "best.pt"
    save_checkpoint(
        path,
        model_state=build_detector(config, SIZE).state_dict(),
        model_config=config,
        image_size=SIZE,
        metadata={},
    )
    detector, _ = load_detector(path, expected=tiny_config(score_threshold=0.5))
    assert detector.detector.box_selector.score_thresh == 0.5
    with pytest.raises(CheckpointError, match=r"model\.width") as info:
        load_detector(path, expected=tiny_config(width=[8, 16, 32, 32]))
    assert "model.backbone" not in str(info.value)
    with pytest.raises(CheckpointError, match=r"model\.backbone.*resnet18.*resnet34"):
        load_detector(path, expected=tiny_config(backbone="resnet34"))


def _write_evil(path, marker, protocol=None):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    if protocol is None:
        torch.save({"model_state": Evil(), "model_config": "{}", "image_size": [64, 64]}, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump({"model_state": Evil()}, handle, protocol=protocol)


@pytest.mark.parametrize("protocol", [None, 2, 4])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    _write_evil(path, marker, protocol)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    if protocol != 4:  # a protocol-4 raw pickle already fails on its framing, before the global
        assert "refusing to load" in str(info.value) and "arbitrary objects" in str(info.value)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError):
        load_detector(path)
    assert not marker.exists()


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    config = tiny_config()
    good = tmp_path / "good.pt"
    save_checkpoint(
        good,
        model_state=build_detector(config, SIZE).state_dict(),
        model_config=config,
        image_size=SIZE,
        metadata={},
    )
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="missing model_state"):
        load_checkpoint(foreign)


def test_a_checkpoint_names_its_backbone(tmp_path):
    """The backbone is stored by name and rebuilt from the registry; a checkpoint whose backbone is not registered
    in this process (a plug-in not imported) says so."""
    config = tiny_config(backbone="resnet34")
    path = tmp_path / "best.pt"
    state = build_detector(config, SIZE).state_dict()
    save_checkpoint(path, model_state=state, model_config=config, image_size=SIZE, metadata={})
    detector, checkpoint = load_detector(path)
    assert checkpoint["model_config"].backbone == "resnet34" and '"backbone":"resnet34"' in checkpoint["model_config_json"]
    assert all(torch.equal(value, state[key]) for key, value in detector.state_dict().items())
    payload = torch.load(path, weights_only=True)
    payload["model_config"] = payload["model_config"].replace('"resnet34"', '"my-plugin-net"')
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"not a valid model configuration \(backbone: Value error, unknown "
                                              r"backbone 'my-plugin-net'; registered: resnet18, resnet34"):
        load_checkpoint(path)


def test_state_dict_mismatch(tmp_path):
    config = tiny_config()
    state = build_detector(config, SIZE).state_dict()
    removed = next(iter(state))
    del state[removed]
    path = tmp_path / "partial.pt"
    save_checkpoint(path, model_state=state, model_config=config, image_size=SIZE, metadata={})
    with pytest.raises(CheckpointError, match="1 missing") as info:
        load_detector(path)
    assert removed in str(info.value)


def test_unsafe_values_are_rejected_before_writing(tmp_path):
    path = tmp_path / "x.pt"

    class Opaque:
        pass

    with pytest.raises(TypeError):
        save_checkpoint(
            path,
            model_state={"w": torch.zeros(1)},
            model_config=tiny_config(),
            image_size=SIZE,
            metadata={},
            extra_states={"thing": {"x": Opaque()}},
        )
    assert list(tmp_path.iterdir()) == []


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    state = capture_rng_state()
    path = tmp_path / "rng.pt"
    save_checkpoint(
        path, model_state={}, model_config=tiny_config(), image_size=SIZE, metadata={}, rng_state=state
    )
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    restore_rng_state(load_checkpoint(path)["rng_state"])
    second = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2] and first[3] == second[3]
    with pytest.raises(CheckpointError):
        restore_rng_state({"torch": "nonsense"})


def test_malicious_fixture_really_executes_when_loaded_unsafely(tmp_path):
    # Control for the refusal test: the crafted files do run code under a plain unpickler.
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    _write_evil(path, marker, protocol=2)
    with open(path, "rb") as handle:
        pickle.load(handle)
    assert marker.exists()
    marker.unlink()
    _write_evil(path, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()
