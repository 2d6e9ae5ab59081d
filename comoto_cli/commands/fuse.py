"""``comoto fuse P1.csv P2.csv ... --out F.csv``: one DBTex submission from several models' (weighted box fusion)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from comoto_cli.commands.common import console
from comoto_cli.errors import UsageError


def fuse(
    predictions: Annotated[list[Path], typer.Argument(
        help="DBTex prediction CSVs of the models to ensemble (e.g. the seeds' or folds' evaluate outputs).",
        show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Fused DBTex CSV to write.", show_default=False)],
    iou: Annotated[float, typer.Option("--iou", help="In-plane IoU above which boxes fuse.")] = 0.55,
    slice_window: Annotated[float, typer.Option(
        "--slice-window", help="Slices apart at most for boxes to fuse.")] = 2.0,
    max_boxes: Annotated[int, typer.Option("--max-boxes", help="Fused boxes kept per volume, best first.")] = 100,
) -> None:
    """Weighted box fusion of several models' detections, volume by volume: overlapping boxes of different
    models on nearby slices become one, at their score-weighted mean position, scored by the mean score times
    the fraction of models that found it. Score the result with `comoto evaluate --predictions`."""
    if len(predictions) < 2:
        raise UsageError("fuse needs at least two prediction CSVs")
    if not 0.0 < iou < 1.0 or slice_window < 0 or max_boxes < 1:
        raise UsageError("--iou must lie in (0, 1), --slice-window be >= 0 and --max-boxes >= 1")
    from comoto_cli.data.tables import read_dbtex_predictions, write_dbtex_predictions
    from comoto_cli.inference.ensemble import fuse_predictions

    tables = [read_dbtex_predictions(path) for path in predictions]
    fused = fuse_predictions(tables, iou=iou, slice_window=slice_window, max_boxes=max_boxes)
    write_dbtex_predictions(out, fused)
    console.print(f"wrote [bold]{out}[/]: {len(fused['Score'])} fused boxes from {len(tables)} models "
                  f"({sum(len(t['Score']) for t in tables)} boxes)")
