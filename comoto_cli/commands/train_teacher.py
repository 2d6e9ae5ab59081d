"""``comoto train-teacher``: the RetinaNet teacher on a mammography cache, with ImPA by default.
The library is :mod:`comoto_cli.engine.teacher`.

ImPA (intra-modal point alignment, docs/design.md section 3) is an ``extra_loss`` of the shared trainer: on each
batch, the lesion points of the images that have boxes are pulled together and pushed away from random
background points. Validation every epoch on the cache's val split: per-image FROC and COCO AP; ``best.pt`` by
``best_metric``. Under ``torchrun --nproc_per_node N`` the same command trains with DDP.
"""

from __future__ import annotations

from pathlib import Path

import typer

from comoto_cli.commands.common import (
    CONFIG_OPTION_HELP,
    DISTILL_FEATURE_HELP,
    NUM_WORKERS_HELP,
    VAL_EVERY_HELP,
    console,
    resolve_config,
)
from comoto_cli.config import TeacherConfig
from comoto_cli.networks.backbones import backbones_help  # no torch: the help stays fast


def train_teacher(
    cache: Path | None = typer.Option(None, "--cache", help="Mammography cache (`comoto preprocess mammo`)."),
    out: Path | None = typer.Option(None, "--out", help="Run folder: checkpoints, metrics.jsonl, config.json."),
    config_file: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_OPTION_HELP),
    impa: bool | None = typer.Option(None, "--impa/--no-impa", help="Intra-modal point alignment loss \\[default: on]."),
    epochs: int | None = typer.Option(None, "--epochs", help="Number of epochs."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last.pt (model, optimiser, epoch, RNG)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Images per step (per process under DDP)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (optim.lr)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed."),
    backbone: str | None = typer.Option(None, "--backbone", help=f"Feature extractor: {backbones_help()}."),
    num_workers: int | None = typer.Option(None, "--num-workers", help=NUM_WORKERS_HELP),
    val_every: int | None = typer.Option(None, "--val-every", help=VAL_EVERY_HELP),
    distill_feature: str | None = typer.Option(None, "--distill-feature", help=DISTILL_FEATURE_HELP),
) -> None:
    """Train the mammography teacher (RetinaNet, ImPA by default); best.pt by validation mean sensitivity."""
    config = resolve_config(
        TeacherConfig, config_file, cache=cache, out=out, impa=impa, epochs=epochs, batch_size=batch_size,
        optim__lr=lr, seed=seed, model__backbone=backbone, num_workers=num_workers, val_every=val_every,
        model__distill_feature=distill_feature,
    )
    from comoto_cli.engine.teacher import run_train_teacher

    run_train_teacher(config, resume=resume, console=console)
