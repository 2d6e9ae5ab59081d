"""``comoto experiment CONFIG``: DBT-only, pretraining, image-level KD, LsKD and LsKD + ImPA at several train
ratios and seeds; a results table (markdown, CSV) and a plot. The library is :mod:`comoto_cli.experiment`."""

from __future__ import annotations

from pathlib import Path

import typer

from comoto_cli.commands.common import console, resolve_config
from comoto_cli.config import ExperimentConfig


def experiment(
    config_file: Path = typer.Argument(..., help="Experiment config (JSON/YAML); see `comoto config schema experiment`."),
    out: Path | None = typer.Option(None, "--out", help="Experiment folder (overrides the config's)."),
) -> None:
    """Reproduce the paper's comparison table; rerun to resume (finished runs are kept)."""
    from comoto_cli.experiment import run_experiment

    run_experiment(resolve_config(ExperimentConfig, config_file, out=out), console=console)
