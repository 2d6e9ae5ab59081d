"""``comoto predict``: detect lesions in DICOM files (DBT volumes or mammograms) with a trained checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from comoto_cli.commands.common import CONFIG_OPTION_HELP, console, resolve_config
from comoto_cli.config import PredictConfig
from comoto_cli.inference.formats import formats_help  # no torch: the help stays fast


def predict(
    inputs: Annotated[Optional[list[Path]], typer.Argument(  # noqa: UP045 - typer needs Optional here
        help="DICOM files or folders (searched recursively for *.dcm, *.dicom and extension-less DICOM files).",
        show_default=False)] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--checkpoint", help="Trained checkpoint (best.pt of train-teacher or distill).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--out", help="Output file, in --format; a folder for folder formats (dicom-sr: one DICOM SR per input).",
        show_default=False)] = None,
    fmt: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--format", help=f"Output format: {formats_help()}.", show_default=False)] = None,
    overlays: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--overlays", help="Folder for one PNG per input showing its top detections.", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--batch-size", help="Slices per forward pass (default 16; on CPU at most 2048 x 1024 pixels per pass, "
                         "to bound memory).", show_default=False)] = None,
    skip_edge_slices: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--skip-edge-slices", help="DBT slices skipped at each end (default 0; the reference skips 4).",
        show_default=False)] = None,
    flip_tta: Annotated[Optional[bool], typer.Option(  # noqa: UP045
        "--flip-tta/--no-flip-tta", help="Horizontal-flip test-time augmentation: each slice and its mirror, "
        "detections merged (twice the time; default off).", show_default=False)] = None,
    accept_modality: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--accept-modality", metavar="MODALITY", help="Read Secondary Capture / generic X-ray inputs with this "
        "Modality (e.g. RG: digitised film) as mammograms or DBT volumes: you vouch that they are. Repeatable. "
        "Default: only Modality MG.", show_default=False)] = None,
    config_file: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--config", help=CONFIG_OPTION_HELP, show_default=False)] = None,
) -> None:
    """Write DBTex-style detections (official reader frame, full resolution) for every input."""
    config = resolve_config(
        PredictConfig, config_file, checkpoint=checkpoint, inputs=list(inputs) if inputs else None, out=out,
        format=fmt, overlays=overlays, inference__batch_size=batch_size,
        inference__skip_edge_slices=skip_edge_slices, inference__flip_tta=flip_tta,
        accept_modality=accept_modality or None,
    )
    from comoto_cli.inference.predict import run_predict

    table, num_inputs = run_predict(config)
    where = f"; overlays in [bold]{config.overlays}[/]" if config.overlays else ""
    console.print(f"wrote {len(table)} detection(s) for {num_inputs} input(s) to [bold]{config.out}[/]{where}")
