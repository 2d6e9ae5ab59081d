"""The DBTex evaluation report: metrics.json, froc.png and a printed table, shared by every evaluate path.

``comoto evaluate --predictions ...`` and checkpoint evaluation both end here, so their outputs agree.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from comoto_cli.metrics.dbtex import (
    METRIC_KEYS,
    DbtexTables,
    bootstrap_mean_sensitivity,
    dbtex_counts,
    froc_points,
    score_dbtex,
)
from comoto_cli.metrics.plots import plot_froc
from comoto_cli.utils.atomic import ensure_writable_dir, write_json_atomic


def _json_number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _bootstrap_with_progress(tables: DbtexTables, n: int, seed: int, console: Console) -> tuple[float, float]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("bootstrap"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:
        task = progress.add_task("bootstrap", total=n)
        return bootstrap_mean_sensitivity(tables, n, seed, progress=lambda done: progress.update(task, completed=done))


def froc_curves(tables: DbtexTables) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The 'all' and 'positive' FROC curves up to 4 false positives per volume, as froc.png draws them."""
    return {
        "all": froc_points(tables, positive_only=False, max_fps=4.0),
        "positive": froc_points(tables, positive_only=True, max_fps=4.0),
    }


def metrics_table(payload: dict[str, Any], title: str = "DBTex metrics") -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in METRIC_KEYS:
        table.add_row(key, f"{payload[key]:.4f}")
    ci = payload.get("mean_sensitivity_positive_ci95")
    if ci is not None and None not in ci:
        table.add_row("mean_sensitivity_positive 95% CI", f"[{ci[0]:.4f}, {ci[1]:.4f}]")
    for key, value in payload.get("counts", {}).items():
        table.add_row(key, str(value))
    return table


def write_dbtex_report(
    out_dir: str | Path,
    tables: DbtexTables,
    bootstrap: int,
    seed: int,
    *,
    froc: bool = True,
    console: Console | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score ``tables``, write ``out_dir/metrics.json`` (the six DBTex numbers, ``mean_sensitivity_positive_ci95``
    from ``bootstrap`` patient resamples -- null when 0 -- and counts), ``out_dir/froc.png`` (curves 'all' and
    'positive', up to 4 FP/volume) when ``froc``, print a table, and return the metrics.json payload.
    ``extra`` entries are added to the payload (e.g. the checkpoint path)."""
    out_dir = ensure_writable_dir(out_dir)
    console = console or Console(highlight=False)
    metrics = score_dbtex(tables)
    payload: dict[str, Any] = dict(metrics)
    if bootstrap > 0:
        low, high = _bootstrap_with_progress(tables, bootstrap, seed, Console(stderr=True))
        payload["mean_sensitivity_positive_ci95"] = [_json_number(low), _json_number(high)]
    else:
        payload["mean_sensitivity_positive_ci95"] = None
    payload["bootstrap"] = {"resamples": int(bootstrap), "seed": int(seed), "unit": "patient"}
    payload["counts"] = dbtex_counts(tables)
    if extra:
        payload.update(extra)
    if froc:
        plot_froc(out_dir / "froc.png", froc_curves(tables), marks=(1, 2, 3, 4), title="DBTex FROC")
    write_json_atomic(out_dir / "metrics.json", payload)
    console.print(metrics_table(payload))
    return payload
