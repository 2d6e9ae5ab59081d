"""``comoto distill``: the DBT student with LsKD, or another registered distillation mode (the paper's baselines:
image-level KD, pretraining, DBT only; :mod:`comoto_cli.engine.modes`). The library is
:mod:`comoto_cli.engine.distill`."""

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
from comoto_cli.config import DistillConfig
from comoto_cli.engine.modes import modes_help  # no torch: the help stays fast

# "\\[": a literal bracket, not rich markup (which would swallow "[default: ...]").
MODE_HELP = f"Distillation mode \\[default: {DistillConfig.model_fields['mode'].default}]: {modes_help()}."


def distill(
    cache: Path | None = typer.Option(None, "--cache", help="DBT cache (`comoto preprocess dbt`)."),
    teacher: Path | None = typer.Option(None, "--teacher", help="Teacher checkpoint (best.pt of train-teacher)."),
    teacher_cache: Path | None = typer.Option(None, "--teacher-cache", help="Mammography cache (unpaired batches)."),
    out: Path | None = typer.Option(None, "--out", help="Run folder: checkpoints, metrics.jsonl, config.json."),
    mode: str | None = typer.Option(None, "--mode", help=MODE_HELP),
    train_ratio: float | None = typer.Option(None, "--train-ratio", help="Fraction of training patients (0-1]."),
    config_file: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_OPTION_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last.pt (model, optimiser, epoch, RNG)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Number of epochs."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Slices per step (per process under DDP)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (optim.lr)."),
    alpha: float | None = typer.Option(None, "--alpha", help="Distillation weight."),
    temperature: float | None = typer.Option(None, "--temperature", help="KD temperature T."),
    num_points: int | None = typer.Option(None, "--num-points", help="Lesion points P: 1, 4, 5 or 9."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (also picks the train-ratio subset)."),
    num_workers: int | None = typer.Option(None, "--num-workers", help=NUM_WORKERS_HELP),
    val_every: int | None = typer.Option(None, "--val-every", help=VAL_EVERY_HELP),
    distill_feature: str | None = typer.Option(None, "--distill-feature", help=DISTILL_FEATURE_HELP),
) -> None:
    """Train the DBT student: LsKD from a mammography teacher, or a baseline; best.pt by DBTex mean sensitivity."""
    from comoto_cli.engine.distill import run_distill

    config = resolve_config(
        DistillConfig, config_file, cache=cache, teacher=teacher, teacher_cache=teacher_cache, out=out, mode=mode,
        train_ratio=train_ratio, epochs=epochs, batch_size=batch_size, optim__lr=lr, alpha=alpha,
        temperature=temperature, num_points=num_points, seed=seed, num_workers=num_workers, val_every=val_every,
        model__distill_feature=distill_feature,
    )
    run_distill(config, resume=resume, console=console)
