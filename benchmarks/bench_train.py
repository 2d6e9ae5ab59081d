"""Where a training step's time goes: data loading, forward + backward, and the rest (optimiser step,
gradient bookkeeping), for the tiny ResNet-18 detector with ImPA on a cache's training split.

``run(cache_path)`` times ``steps`` steps after ``warmup`` untimed ones, using the trainer's own pieces
(DataLoader, TrainStep, optimiser). Without a cache path a tiny bright-disk cache is written to a temporary
folder.

    python benchmarks/bench_train.py [cache.h5] [--steps N] [--batch-size B]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

TINY_MODEL = {"backbone": "resnet18", "width": [8, 16, 32, 64], "fpn_channels": 16, "anchor_base_sizes": [16.0, 16.0]}


def _tiny_cache(path: Path, height: int = 128, width: int = 64, images: int = 32) -> Path:
    import numpy as np

    from comoto_cli.cache import CacheWriter, VolumeRecord

    rng = np.random.default_rng(0)
    writer = CacheWriter(path, modality="mammo", image_height=height, image_width=width, config_json="{}",
                         config_hash="bench")
    yy, xx = np.mgrid[0:height, 0:width]
    for index in range(images):
        image = 0.2 + 0.05 * rng.standard_normal((height, width))
        r = rng.uniform(5, 9)
        cy, cx = rng.uniform(r + 2, height - r - 2), rng.uniform(r + 2, width - r - 2)
        image[(yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r] += 0.6
        record = VolumeRecord(patient_id=f"P{index}", study_uid=f"S{index}", view="lcc", split="train",
                              source="", num_slices=1, original_height=height, original_width=width, scale_y=1.0,
                              scale_x=1.0, lesions=[(0, cx - r, cy - r, 2 * r, 2 * r)])
        writer.add_volume(record, [0], np.clip(image, 0, 1)[None],
                          [np.array([[cx - r, cy - r, cx + r, cy + r]], np.float32)], [np.array([0])])
    writer.close()
    return path


def run(cache_path=None, *, steps: int = 20, warmup: int = 3, batch_size: int = 8, num_workers: int = 0,
        impa: bool = True, model: dict | None = None) -> dict:
    import torch

    from comoto_cli.config import TeacherConfig
    from comoto_cli.data.datasets import DetectionDataset, infinite_batches, move_batch
    from comoto_cli.engine.teacher import make_impa_loss
    from comoto_cli.engine.trainer import (
        StepContext,
        TrainStep,
        build_optimizer,
        seed_everything,
        step_generator,
    )
    from comoto_cli.networks.detector import build_detector

    temporary = None
    if cache_path is None:
        temporary = tempfile.TemporaryDirectory()
        cache_path = _tiny_cache(Path(temporary.name) / "bench.h5")
    config = TeacherConfig.model_validate({"model": model or TINY_MODEL, "optim": {"name": "adamw", "lr": 1e-3},
                                           "batch_size": batch_size, "impa": impa, "num_workers": num_workers,
                                           "augment": {"on_device": False}})  # the step runs on the CPU here
    seed_everything(0)
    dataset = DetectionDataset(cache_path, "train", augment=config.augment)
    image_size = dataset.image_size
    detector = build_detector(config.model, image_size).train()
    step_module = TrainStep(detector, torch.nn.ModuleDict(), make_impa_loss(config, image_size) if impa else None)
    optimizer = build_optimizer(detector.parameters(), config.optim)
    batches = infinite_batches(dataset, batch_size=batch_size, num_workers=num_workers)
    device = torch.device("cpu")

    data_s = compute_s = rest_s = 0.0
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        batch = move_batch(next(batches), device)
        t1 = time.perf_counter()
        ctx = StepContext(epoch=0, step=step, step_in_epoch=step, model=detector, extra_modules=step_module.extra_modules,
                          device=device, generator=step_generator(0, 0, step), config=config)
        losses = step_module(batch, ctx)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        t2 = time.perf_counter()
        optimizer.step()
        _ = {k: float(v.detach()) for k, v in losses.items()}  # the loop's logging sync
        t3 = time.perf_counter()
        if step >= warmup:
            data_s += t1 - t0
            compute_s += t2 - t1
            rest_s += t3 - t2
    if temporary is not None:
        temporary.cleanup()
    total_s = data_s + compute_s + rest_s
    return {
        "name": "train_step",
        "image_size": list(image_size),
        "batch_size": batch_size,
        "steps": steps,
        "impa": impa,
        "threads": torch.get_num_threads(),
        "seconds_per_step": total_s / steps,
        "data_seconds_per_step": data_s / steps,
        "forward_backward_seconds_per_step": compute_s / steps,
        "rest_seconds_per_step": rest_s / steps,
        "fraction_data": data_s / total_s,
        "fraction_forward_backward": compute_s / total_s,
        "fraction_rest": rest_s / total_s,
        "images_per_second": batch_size * steps / total_s,
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", nargs="?", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0)
    arguments = parser.parse_args()
    print(json.dumps(run(arguments.cache, steps=arguments.steps, batch_size=arguments.batch_size,
                         num_workers=arguments.num_workers), indent=2))
    sys.exit(0)
