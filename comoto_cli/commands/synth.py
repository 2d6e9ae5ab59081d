"""``comoto synth OUT``: a deterministic synthetic dataset in the real BCS-DBT and VinDr-Mammo layouts."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from comoto_cli.commands.common import CONFIG_OPTION_HELP, console, resolve_config


def synth(
    out: Path = typer.Argument(..., help="Output folder (must not exist, or be empty)."),
    size: str | None = typer.Option(None, "--size", help="Preset: tiny (tests), demo, bench. Default: tiny."),
    mammograms: int | None = typer.Option(
        None, "--mammograms", help="Number of mammograms (overrides the preset)."
    ),
    volumes: int | None = typer.Option(
        None, "--volumes", help="Number of DBT volumes (overrides the preset)."
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Random seed; the same seed writes identical files."
    ),
    domain_gap: str | None = typer.Option(
        None, "--domain-gap", help="basic (default) or realistic: limited-angle DBT blur and ripple, mammograms with "
        "finer pixels over a taller field."),
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_OPTION_HELP),
) -> None:
    """Write a synthetic DBT + mammography dataset (DICOM + CSV, real layouts) into OUT."""
    from rich.table import Table

    from comoto_cli.config import SynthConfig
    from comoto_cli.synth import generate_dataset

    settings = resolve_config(
        SynthConfig, config, size=size, mammograms=mammograms, volumes=volumes, seed=seed, domain_gap=domain_gap
    )
    start = time.perf_counter()
    summary = generate_dataset(out, settings, progress=True)
    elapsed = time.perf_counter() - start
    table = Table(title=f"comoto synth -> {out}", show_header=False, title_justify="left")
    table.add_row(
        "DBT (OUT/dbt)",
        f"{summary['dbt_volumes']} volumes of {summary['dbt_patients']} patients, "
        f"{summary['dbt_lesions']} boxed lesions, {summary['dbt_normal_volumes']} normal, "
        f"{summary['dbt_rotated_volumes']} stored rotated, {summary['dbt_compressed_volumes']} JPEG 2000; "
        f"{summary['dbt_shape'][0]}x{summary['dbt_shape'][1]} px",
    )
    table.add_row(
        "Mammography (OUT/mammo)",
        f"{summary['mammograms']} images in {summary['mammo_studies']} studies, "
        f"{summary['mammo_findings']} findings, {summary['mammo_normal_images']} normal images, "
        f"{summary['mammo_test_images']} in VinDr 'test'; "
        f"{summary['mammo_shape'][0]}x{summary['mammo_shape'][1]} px",
    )
    table.add_row("Seed / size / domain gap", f"{settings.seed} / {settings.size} / {settings.domain_gap}")
    table.add_row("Time", f"{elapsed:.1f} s")
    console.print(table)
