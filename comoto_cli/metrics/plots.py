"""FROC curve figures (matplotlib, headless Agg backend), written atomically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from comoto_cli.utils.atomic import atomic_path


def plot_froc(
    path: str | Path,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    marks: Sequence[float] = (1, 2, 3, 4),
    title: str = "FROC",
    *,
    xlabel: str = "false positives per volume",
) -> Path:
    """Draw each ``name -> (fps, sensitivities)`` curve; mark and annotate sensitivity at each FP rate of
    ``marks`` (interpolated as the DBTex scorer does) that lies within the curve's range. Returns ``path``."""
    # The Agg canvas directly, not pyplot: no display needed and no global backend state touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    x_max = max([float(m) for m in marks] + [1.0])
    for index, (name, (fps, sens)) in enumerate(curves.items()):
        fps = np.asarray(fps, dtype=np.float64)
        sens = np.asarray(sens, dtype=np.float64)
        if fps.size == 0:
            continue
        color = f"C{index % 10}"
        # Straight segments: the score interpolates linearly between FROC points (numpy.interp).
        axes.plot(fps, sens, "-", color=color, label=name, linewidth=1.5)
        if fps[-1] < x_max:  # interp holds the last value beyond the walked range
            axes.plot([fps[-1], x_max], [sens[-1], sens[-1]], ":", color=color, linewidth=1.0)
        for mark in marks:
            # Beyond the walked range interp holds the last value, as the DBTex score does.
            value = float(np.interp(mark, fps, sens))
            axes.plot([mark], [value], "o", color=color, markersize=5)
            axes.annotate(
                f"{value:.2f}", (mark, value), textcoords="offset points", xytext=(4, 6 - 14 * index),
                fontsize=8, color=color,
            )
    axes.set_xlim(0, x_max * 1.05)
    axes.set_ylim(0, 1.1)  # room for the labels of points at sensitivity 1
    axes.set_xlabel(xlabel)
    axes.set_ylabel("sensitivity")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if curves:
        axes.legend(loc="lower right")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format=path.suffix.lstrip(".") or "png")
    return path
