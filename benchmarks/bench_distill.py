"""Distillation overhead: one LsKD (``--mode lesion``) training step next to a DBT-only step (``none``) and
next to (DBT-only step + the teacher's forward on an unpaired mammography batch), measured in one run.

LsKD adds a frozen teacher forward (backbone only, no gradient) and a few point gathers; the ratio
``lesion / (none + teacher forward)`` near 1 says the overhead is the teacher forward and nothing else.
Also the cache loader's throughput (slices/s, with augmentation) next to what a training step consumes.
"""

from __future__ import annotations

import time
from pathlib import Path


def _time_interleaved(step_fns: dict, rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns round by round.

    Timing one variant after the other let the machine's drift (turbo, other tenants) land on one side of the
    ratio: two runs of the same code gave LsKD/none 1.01x and 1.39x. Taking turns puts any drift on both."""
    import statistics

    for _ in range(warmup):
        for step_fn in step_fns.values():
            step_fn()
    times: dict[str, list[float]] = {name: [] for name in step_fns}
    for _ in range(rounds):
        for name, step_fn in step_fns.items():
            started = time.perf_counter()
            step_fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def run(dbt_cache: Path, mammo_cache: Path, model: dict, *, batch_size: int = 8, steps: int = 24,
        warmup: int = 3) -> dict:
    import torch

    from comoto_cli.config import DistillConfig
    from comoto_cli.data.datasets import DetectionDataset, infinite_batches, move_batch
    from comoto_cli.engine.distill import make_lesion_kd_loss
    from comoto_cli.engine.trainer import StepContext, TrainStep, build_optimizer, seed_everything, step_generator
    from comoto_cli.losses import PointProjection
    from comoto_cli.networks.detector import build_detector

    seed_everything(0)
    config = DistillConfig.model_validate({"model": model, "batch_size": batch_size,
                                           "optim": {"name": "adamw", "lr": 1e-3},
                                           "augment": {"on_device": False}})  # the step runs on the CPU here
    dbt = DetectionDataset(dbt_cache, "train", augment=config.augment, lesions_only=True)
    mammo = DetectionDataset(mammo_cache, "train", lesions_only=True)
    student_size, teacher_size = dbt.image_size, mammo.image_size
    device = torch.device("cpu")
    teacher = build_detector(config.model, teacher_size).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)

    # A fixed set of batches, so every variant sees the same data and loading is not part of the step time.
    dbt_batches = infinite_batches(dbt, batch_size=batch_size, seed=0)
    fixed = [move_batch(next(dbt_batches), device) for _ in range(4)]
    mammo_stream = infinite_batches(mammo, batch_size=batch_size, seed=1)
    mammo_fixed = [move_batch(next(mammo_stream), device) for _ in range(4)]

    def cycle(items):
        while True:
            yield from items

    def make_step(extra_loss, extra_modules):
        student = build_detector(config.model, student_size)
        student.load_state_dict(teacher.state_dict())
        extras = torch.nn.ModuleDict(extra_modules)
        module = TrainStep(student, extras, extra_loss).train()
        optimizer = build_optimizer(list(student.parameters()) + list(extras.parameters()), config.optim)
        batches = cycle(fixed)
        counter = {"step": 0}

        def step():
            ctx = StepContext(epoch=0, step=counter["step"], step_in_epoch=counter["step"], model=student,
                              extra_modules=extras, device=device, generator=step_generator(0, 0, counter["step"]),
                              config=config)
            losses = module(next(batches), ctx)
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            counter["step"] += 1

        return step

    none_step = make_step(None, {})
    lesion_step = make_step(
        make_lesion_kd_loss(config, teacher, cycle(mammo_fixed), student_size, teacher_size),
        {"projection": PointProjection(config.num_points)})
    teacher_batches = cycle(mammo_fixed)

    def teacher_forward():
        with torch.no_grad():
            teacher.distill_features(next(teacher_batches)["images"])

    timed = _time_interleaved({"none": none_step, "lesion": lesion_step, "teacher": teacher_forward}, steps, warmup)
    none_s, lesion_s, teacher_s = timed["none"], timed["lesion"], timed["teacher"]

    # Loader: slices/s through the Dataset (HDF5 read + decompress + augmentation), single process.
    loader_dataset = DetectionDataset(dbt_cache, "train", augment=config.augment)
    count = min(len(loader_dataset), 200)
    started = time.perf_counter()
    for index in range(count):
        loader_dataset[index % len(loader_dataset)]
    loader_rate = count / (time.perf_counter() - started)
    consumed_rate = batch_size / none_s
    return {
        "batch_size": batch_size, "image_size_student": list(student_size), "image_size_teacher": list(teacher_size),
        "none_step_s": none_s, "lesion_step_s": lesion_s, "teacher_forward_s": teacher_s,
        "lesion_over_none": lesion_s / none_s,
        "lesion_over_none_plus_teacher": lesion_s / (none_s + teacher_s),
        "loader_slices_per_s": loader_rate, "training_consumes_slices_per_s": consumed_rate,
        "loader_over_consumption": loader_rate / consumed_rate,
    }
