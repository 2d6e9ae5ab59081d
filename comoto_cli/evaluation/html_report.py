"""``report.html``: one self-contained page to look at after ``comoto evaluate --report``.

The DBTex numbers with their interval, the FROC curve, then a card per ground-truth lesion (its central slice,
whole and zoomed, the lesion's box and the detection that found it or came closest; missed lesions first) and a
card per top false positive of each view. Every picture is embedded as a data URI and the page loads nothing
else, so it opens from a mail attachment or an air-gapped workstation. A small inline script counts the cards
and decoded pictures into ``#render-check`` (what the browser test reads).
"""

from __future__ import annotations

import base64
import html
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from comoto_cli import __version__
from comoto_cli.cache.h5cache import SliceCache
from comoto_cli.errors import UsageError
from comoto_cli.evaluation.report_images import CacheImages, Outline, overview_jpeg, zoom_jpeg
from comoto_cli.metrics.dbtex import METRIC_KEYS, DbtexTables
from comoto_cli.metrics.plots import plot_froc
from comoto_cli.metrics.report import froc_curves
from comoto_cli.metrics.review import DetectionReview, FalsePositiveReview, LesionReview, review_detections
from comoto_cli.utils.atomic import atomic_path

TRUTH_COLOR = "#2ecc40"
DETECTION_COLOR = "#ffb000"
STATUS_ORDER = {"missed": 0, "found-below": 1, "found": 2}
STATUS_TEXT = {"found": "found", "found-below": "found below the operating point", "missed": "missed"}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { margin-bottom: 0.2em; } .muted { color: #666; font-size: 0.9em; }
table.metrics { border-collapse: collapse; margin: 1em 0; } table.metrics td { padding: 2px 12px; }
table.metrics td.value { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 12px; }
figure.card { margin: 0; border: 1px solid #ccc; border-radius: 6px; padding: 8px; background: #fafafa; }
figure.card .pictures { display: flex; gap: 6px; align-items: flex-start; }
figure.card img { background: #000; max-width: 220px; }
.placeholder { width: 200px; height: 120px; background: #eee; color: #888; display: flex;
  align-items: center; justify-content: center; font-size: 0.85em; text-align: center; }
figcaption { font-size: 0.85em; margin-top: 6px; line-height: 1.4; }
.badge { display: inline-block; padding: 0 6px; border-radius: 4px; color: #fff; font-weight: 600; }
.status-found .badge { background: #2e8b57; } .status-found-below .badge { background: #d98c00; }
.status-missed .badge { background: #c0392b; } .fp .badge { background: #555; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 2px solid; vertical-align: middle; }
"""

_CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var decoded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var check = document.getElementById("render-check");
  check.dataset.lesionCards = document.querySelectorAll("figure.lesion-card").length;
  check.dataset.falsePositiveCards = document.querySelectorAll("figure.fp-card").length;
  check.dataset.images = images.length;
  check.dataset.imagesDecoded = decoded;
  check.textContent = decoded + " of " + images.length + " pictures shown";
});
"""


def _img(data: bytes, mime: str, alt: str) -> str:
    return f'<img src="data:{mime};base64,{base64.b64encode(data).decode("ascii")}" alt="{html.escape(alt)}">'


def _pictures(images: CacheImages | None, study_uid: str, view: str, slice_index: float,
              focus: tuple[float, ...], outlines: list[Outline]) -> tuple[str, str]:
    """(the pictures' HTML, a note on the slice shown)."""
    shown = images.read(study_uid, view, slice_index) if images is not None else None
    if shown is None:
        reason = "no images given (--cache)" if images is None else "view not in the cache"
        return f'<div class="placeholder">{reason}</div>', ""
    note = "" if shown.slice == round(slice_index) else f" (nearest cached slice {shown.slice})"
    return (_img(overview_jpeg(shown, outlines), "image/jpeg", "whole slice")
            + _img(zoom_jpeg(shown, focus, outlines), "image/jpeg", "zoomed"), note)


def _where(patient_id: str, study_uid: str, view: str) -> str:
    return f"<b>{html.escape(patient_id)}</b> {html.escape(view)}<br><span class='muted'>{html.escape(study_uid)}</span>"


def _lesion_card(lesion: LesionReview, images: CacheImages | None) -> str:
    outlines = [Outline(lesion.box, TRUTH_COLOR)]
    if lesion.detection is not None:
        outlines.append(Outline(lesion.detection.box, DETECTION_COLOR))
    pictures, note = _pictures(images, lesion.study_uid, lesion.view, lesion.slice, lesion.box, outlines)
    x, y, width, height = lesion.box
    detection = lesion.detection
    if detection is None:
        found = "no detection near it"
    else:
        within = abs(lesion.slice_offset) <= lesion.volume_slices / 4
        kind = "best hit" if lesion.status != "missed" else (
            "near miss, counted for a nearer lesion of this view" if within else "near miss, outside the slice window")
        found = (f"{kind}: score {detection.score:.3f}; centre {lesion.centre_distance:.0f} px away (hit radius "
                 f"{lesion.hit_radius:.0f}), slice offset {lesion.slice_offset:+.1f} (hit window "
                 f"&plusmn;{lesion.volume_slices / 4:g})")
    return (
        f'<figure class="card lesion-card status-{lesion.status}" data-status="{lesion.status}">'
        f'<div class="pictures">{pictures}</div><figcaption>'
        f'<span class="badge">{STATUS_TEXT[lesion.status]}</span> {_where(lesion.patient_id, lesion.study_uid, lesion.view)}'
        f"<br>slice {lesion.slice} of {lesion.volume_slices}{note}; box {x:g}, {y:g}, {width:g} &times; {height:g}"
        f"<br>{found}</figcaption></figure>"
    )


def _false_positive_card(fp: FalsePositiveReview, images: CacheImages | None, truth: dict) -> str:
    detection = fp.detection
    outlines = [Outline(box, TRUTH_COLOR) for box in truth.get((fp.study_uid, fp.view), [])]
    outlines.append(Outline(detection.box, DETECTION_COLOR))
    pictures, note = _pictures(images, fp.study_uid, fp.view, detection.slice, detection.box, outlines)
    return (
        f'<figure class="card fp-card fp"><div class="pictures">{pictures}</div><figcaption>'
        f'<span class="badge">false positive #{fp.rank}</span> {_where(fp.patient_id, fp.study_uid, fp.view)}'
        f"<br>score {detection.score:.3f}, slice {detection.slice:g}{note}</figcaption></figure>"
    )


def _metrics_rows(payload: dict[str, Any]) -> Iterator[str]:
    for key in METRIC_KEYS:
        yield f"<tr><td>{key}</td><td class='value'>{payload[key]:.4f}</td></tr>"
    ci = payload.get("mean_sensitivity_positive_ci95")
    if ci and None not in ci:
        yield f"<tr><td>mean_sensitivity_positive, 95 % patient-bootstrap interval</td>" \
              f"<td class='value'>{ci[0]:.4f} &ndash; {ci[1]:.4f}</td></tr>"
    for key, value in payload.get("counts", {}).items():
        yield f"<tr><td>{key}</td><td class='value'>{value}</td></tr>"


def _page(title: str, inputs: dict[str, str], payload: dict, froc_png: bytes | None, review: DetectionReview,
          lesion_cards: Iterable[str], fp_cards: Iterable[str]) -> Iterator[str]:
    statuses = {s: sum(lesion.status == s for lesion in review.lesions) for s in STATUS_ORDER}
    yield (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
           f"<p class='muted'>comoto {__version__}; "
           + "; ".join(f"{html.escape(k)}: {html.escape(v)}" for k, v in inputs.items())
           + "</p><p id='render-check' class='muted'></p>")
    yield f"<h2>DBTex metrics</h2><table class='metrics'>{''.join(_metrics_rows(payload))}</table>"
    if froc_png is not None:
        yield f"<h2>FROC</h2>{_img(froc_png, 'image/png', 'FROC curve')}"
    yield (f"<h2>Lesions ({len(review.lesions)})</h2><p>"
           + ", ".join(f"{count} {STATUS_TEXT[s]}" for s, count in statuses.items())
           + f". The operating point is {review.fps_per_volume:g} false positives per volume (score &ge; "
           f"{review.threshold:.4g}). Missed lesions first. <span class='swatch' style='border-color:{TRUTH_COLOR}'>"
           f"</span> ground truth, <span class='swatch' style='border-color:{DETECTION_COLOR}'></span> detection; "
           "each card shows the lesion's central slice, whole and zoomed.</p><div class='grid'>")
    yield from lesion_cards
    left_out = (f" ({review.false_positives_left_out} more left out)" if review.false_positives_left_out else "")
    yield (f"</div><h2>Highest-scoring false positives ({len(review.false_positives)}{left_out})</h2>"
           "<p>Per view, its top false positives on the slice of the detection; every box of the view drawn.</p>"
           "<div class='grid'>")
    yield from fp_cards
    yield f"</div><script>{_CHECK_SCRIPT}</script></body></html>\n"


def write_html_report(path: str | Path, tables: DbtexTables, payload: dict[str, Any], *,
                      images: CacheImages | None, froc_png: bytes | None, title: str, inputs: dict[str, str],
                      false_positives_per_view: int = 2, progress: bool = True) -> DetectionReview:
    """Write the report of ``tables`` (scored into ``payload`` by :func:`comoto_cli.metrics.report.
    write_dbtex_report`) to ``path`` atomically; pictures from ``images`` when given. Returns the review."""
    review = review_detections(tables, false_positives_per_view=false_positives_per_view)
    lesions = sorted(review.lesions, key=lambda lesion: (STATUS_ORDER[lesion.status], lesion.box_row))
    truth: dict[tuple[str, str], list] = {}
    for lesion in review.lesions:
        truth.setdefault((lesion.study_uid, lesion.view), []).append(lesion.box)
    cards = _CardCounter(len(lesions) + len(review.false_positives), progress)
    lesion_cards = (cards(_lesion_card(lesion, images)) for lesion in lesions)
    fp_cards = (cards(_false_positive_card(fp, images, truth)) for fp in review.false_positives)
    try:
        with atomic_path(Path(path)) as temporary, open(temporary, "w", encoding="utf-8") as stream:
            for part in _page(title, inputs, payload, froc_png, review, lesion_cards, fp_cards):
                stream.write(part)
    finally:
        cards.close()
    return review


def write_evaluation_report(out_dir: str | Path, tables: DbtexTables, payload: dict[str, Any], *,
                            cache: SliceCache | None, inputs: dict[str, str], false_positives_per_view: int = 2,
                            progress: bool = True) -> Path:
    """``out_dir/report.html`` for ``evaluate --report``: pictures from ``cache`` when given (a DBT cache holding
    the scored views), the FROC curve drawn afresh. Returns the report's path."""
    with tempfile.TemporaryDirectory() as folder:
        froc_png = plot_froc(Path(folder) / "froc.png", froc_curves(tables), title="DBTex FROC").read_bytes()
    path = Path(out_dir) / "report.html"
    write_html_report(path, tables, payload, images=None if cache is None else CacheImages(cache),
                      froc_png=froc_png, title="CoMoTo evaluation report", inputs=inputs,
                      false_positives_per_view=false_positives_per_view, progress=progress)
    return path


def write_csv_report(out_dir: str | Path, tables: DbtexTables, payload: dict[str, Any], cache_path: Path | None,
                     inputs: dict[str, str], false_positives_per_view: int = 2) -> Path:
    """:func:`write_evaluation_report` for a scored submission CSV; pictures from the DBT cache at ``cache_path``."""
    if cache_path is None:
        return write_evaluation_report(out_dir, tables, payload, cache=None, inputs=inputs,
                                       false_positives_per_view=false_positives_per_view)
    cache = SliceCache(cache_path)
    try:
        require_dbt_cache(cache)
        return write_evaluation_report(out_dir, tables, payload, cache=cache, inputs=inputs,
                                       false_positives_per_view=false_positives_per_view)
    finally:
        cache.close()


def check_report_cache(cache_path: Path) -> None:
    """The picture source of a report exists, is a readable cache and holds DBT volumes (one line otherwise)."""
    cache = SliceCache(cache_path)
    try:
        require_dbt_cache(cache)
    finally:
        cache.close()


def require_dbt_cache(cache: SliceCache) -> None:
    if cache.modality != "dbt":
        raise UsageError(f"report.html reviews DBT volumes; this cache holds {cache.modality} images (per-image "
                         "evaluation writes metrics.json, froc.png and predictions.csv only)", path=cache.path)


class _CardCounter:
    """Counts cards as they are drawn, behind a rich progress bar when ``progress``."""

    def __init__(self, total: int, progress: bool):
        self._progress = None
        if progress and total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("report pictures"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self._progress.start()
            self._task = self._progress.add_task("report", total=total)

    def __call__(self, card: str) -> str:
        if self._progress is not None:
            self._progress.advance(self._task)
        return card

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
