"""``evaluate --report``: the lesion review behind report.html, the page itself, and the page rendered in Chromium."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from comoto_cli.data.tables import dbtex_boxes, dbtex_labels
from comoto_cli.metrics.dbtex import DbtexTables, operating_threshold, prediction_hits, score_dbtex
from comoto_cli.metrics.review import review_detections

BOXES = "BCS-DBT-boxes-train-v2.csv"
LABELS = "BCS-DBT-labels-train-v2.csv"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags a sandboxed, offline, GPU-less machine needs (no background connections to refuse).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def _predictions(rows: list[tuple]) -> dict[str, np.ndarray]:
    """rows of (study, view, x, y, w, h, z, score), patient P<study>."""
    columns = list(zip(*rows))
    return {"PatientID": np.array([f"P{s}" for s in columns[0]]), "StudyUID": np.array(columns[0]),
            "View": np.array(columns[1]), "X": np.array(columns[2], float), "Width": np.array(columns[4], float),
            "Y": np.array(columns[3], float), "Height": np.array(columns[5], float), "Z": np.array(columns[6], float),
            "Depth": np.zeros(len(rows)), "Score": np.array(columns[7], float)}


def _review_tables() -> DbtexTables:
    # Four lesions in two views of 40 slices (hit window +-10), boxes 400 pixels apart (beyond the 100-pixel floor).
    boxes = dbtex_boxes(["PA", "PA", "PA", "PB"], ["A", "A", "A", "B"], ["lcc"] * 4,
                        [0, 400, 800, 0], [0, 0, 0, 0], [50] * 4, [50] * 4, [20, 20, 20, 20], [40] * 4)
    labels = dbtex_labels(["PA", "PB", "PC"], ["A", "B", "C"], ["lcc"] * 3)
    predictions = _predictions([
        ("A", "lcc", 2, 2, 50, 50, 21, 0.9),  # hits lesion 0
        ("A", "lcc", 0, 0, 50, 50, 20, 0.5),  # hits lesion 0 again, lower
        ("A", "lcc", 400, 0, 50, 50, 25, 0.05),  # hits lesion 1, below the operating point
        ("A", "lcc", 800, 0, 50, 50, 35, 0.7),  # in plane on lesion 2, 15 slices off: a near miss
        ("B", "lcc", 1500, 1500, 50, 50, 20, 0.8),  # false positives of B (lesion 3 missed, nothing near it)
        ("B", "lcc", 1500, 0, 50, 50, 20, 0.6),
        ("B", "lcc", 0, 1500, 50, 50, 20, 0.3),
        ("C", "lcc", 1500, 1500, 50, 50, 20, 0.95),  # normal view, not in the positive pass
    ])
    return DbtexTables(predictions=predictions, boxes=boxes, labels=labels)


def test_review_follows_the_official_hits_and_operating_point():
    tables = _review_tables()
    review = review_detections(tables, fps_per_volume=1.0, false_positives_per_view=2)
    statuses = [lesion.status for lesion in review.lesions]
    assert statuses == ["found", "found-below", "missed", "missed"]
    assert review.lesions[0].detection.score == 0.9 and review.lesions[0].slice_offset == 1.0
    assert review.lesions[0].centre_distance == pytest.approx(np.hypot(2, 2)) and review.lesions[0].hit_radius == 100
    assert review.lesions[1].detection.score == 0.05
    near = review.lesions[2].detection
    assert near.score == 0.7 and near.hit_box == -1 and review.lesions[2].slice_offset == 15.0
    assert review.lesions[3].detection is None
    # The review finds exactly the lesions the score counts.
    hits = prediction_hits(tables)
    assert {lesion.box_row for lesion in review.lesions if lesion.status != "missed"} == set(hits[hits >= 0])
    # The official FROC points sit at the hitting scores (0.9, 0.5, 0.05). At 1 FP per positive volume (2
    # volumes) 0.9 qualifies (no false positive above it); 0.5 does not (0.8, 0.7 and 0.6 make 1.5 per volume).
    assert review.threshold == operating_threshold(tables, 1.0) == 0.9
    # Top false positives per view, best first, ranked within their view; C's counts too (any view).
    shown = [(fp.study_uid, fp.rank, fp.detection.score) for fp in review.false_positives]
    assert shown == [("C", 1, 0.95), ("B", 1, 0.8), ("A", 1, 0.7), ("B", 2, 0.6)]
    capped = review_detections(tables, false_positives_per_view=2, max_false_positives=3)
    assert len(capped.false_positives) == 3 and capped.false_positives_left_out == 1


def test_operating_threshold_counts_every_prediction_when_false_positives_are_few():
    tables = _review_tables()
    assert operating_threshold(tables, 4.0) < tables.predictions["Score"].min()
    assert score_dbtex(tables)["sensitivity_at_4_fps_positive"] == 0.5


class _Cards(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cards: list[dict] = []
        self.sources: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.cards.append({"class": attrs.get("class", ""), "status": attrs.get("data-status"), "images": 0})
        if tag == "img":
            self.sources.append(attrs.get("src", ""))
            if self.cards:
                self.cards[-1]["images"] += 1
        for name in ("href", "src"):
            if name in attrs and not str(attrs[name]).startswith("data:"):
                self.links.append(attrs[name])


def _run_cli(args: list, capsys) -> tuple[int, str]:
    from comoto_cli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return int(exit_info.value.code or 0), capsys.readouterr().err


@pytest.fixture(scope="module")
def scored_synth(tiny_synth, tmp_path_factory) -> dict:
    """A submission over the tiny synthetic DBT set: a hit for two lesions of three, one wrong-slice detection
    per lesion and a false positive per lesion's view."""
    folder = tmp_path_factory.mktemp("report")
    rows = list(csv.DictReader(open(tiny_synth / "dbt" / BOXES)))
    header = ["PatientID", "StudyUID", "View", "X", "Width", "Y", "Height", "Z", "Depth", "Score"]
    records = []
    for index, row in enumerate(rows):
        key = [row["PatientID"], row["StudyUID"], row["View"]]
        x, y, w, h, z = (float(row[name]) for name in ("X", "Y", "Width", "Height", "Slice"))
        if index % 3 != 2:
            records.append([*key, x + 2, w, y + 2, h, int(z), 0, 0.5 + 0.01 * index])
        records.append([*key, x, w, y, h, int(z) + int(row["VolumeSlices"]), 0, 0.05])
        records.append([*key, 1, 30, 1, 30, 1, 0, 0.2 + 0.01 * index])
    predictions = folder / "pred.csv"
    with open(predictions, "w", newline="") as stream:
        csv.writer(stream).writerows([header, *records])
    return {"predictions": predictions, "boxes": tiny_synth / "dbt" / BOXES, "labels": tiny_synth / "dbt" / LABELS,
            "lesions": len(rows), "folder": folder}


def _report(scored: dict, out: Path, cache: Path | None, capsys, *extra) -> tuple[int, str]:
    args = ["evaluate", "--predictions", scored["predictions"], "--boxes", scored["boxes"], "--labels",
            scored["labels"], "--out", out, "--bootstrap", "20", "--report", *extra]
    return _run_cli(args + (["--cache", cache] if cache else []), capsys)


def test_report_has_a_card_per_lesion_with_its_pictures(scored_synth, tiny_caches, tmp_path, capsys):
    out = tmp_path / "ev"
    code, err = _report(scored_synth, out, tiny_caches["dbt"], capsys)
    assert code == 0, err
    parser = _Cards()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    lesion_cards = [card for card in parser.cards if "lesion-card" in card["class"]]
    assert len(lesion_cards) == scored_synth["lesions"]
    assert all(card["images"] == 2 for card in parser.cards)  # every view of the synthetic set is cached
    assert parser.links == [], "the page must load nothing from elsewhere"
    assert all(source.startswith(("data:image/jpeg;base64,", "data:image/png;base64,")) for source in parser.sources)
    found = sum(card["status"] != "missed" for card in lesion_cards)
    assert found == json.loads((out / "metrics.json").read_text())["counts"]["lesions_found"]
    # Missed lesions come first.
    statuses = [card["status"] for card in lesion_cards]
    assert statuses == sorted(statuses, key=["missed", "found-below", "found"].index)
    fp_cards = [card for card in parser.cards if "fp-card" in card["class"]]
    views = {(row["StudyUID"], row["View"]) for row in csv.DictReader(open(scored_synth["labels"]))}
    assert 0 < len(fp_cards) <= 2 * len(views)


def test_report_without_a_cache_has_no_pictures(scored_synth, tmp_path, capsys):
    out = tmp_path / "ev"
    code, err = _report(scored_synth, out, None, capsys, "--report-false-positives", "0")
    assert code == 0, err
    parser = _Cards()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    assert len(parser.cards) == scored_synth["lesions"]  # no false-positive cards asked for
    assert len(parser.sources) == 1  # the FROC curve only
    assert "no images given (--cache)" in (out / "report.html").read_text(encoding="utf-8")


def test_report_usage_errors(scored_synth, tiny_caches, tmp_path, capsys):
    args = ["evaluate", "--predictions", scored_synth["predictions"], "--boxes", scored_synth["boxes"],
            "--labels", scored_synth["labels"], "--cache", tiny_caches["dbt"], "--out", tmp_path / "a"]
    code, err = _run_cli(args, capsys)
    assert code == 2 and "add --report" in err
    code, err = _report(scored_synth, tmp_path / "b", tiny_caches["mammo"], capsys)
    assert code == 2 and "mammo" in err and "mammo.h5" in err
    assert not (tmp_path / "b" / "report.html").exists()


def test_report_of_a_checkpoint(low_threshold_teacher, tiny_caches, tmp_path, capsys):
    checkpoint = low_threshold_teacher
    out = tmp_path / "ev"
    code, err = _run_cli(["evaluate", "--checkpoint", checkpoint, "--cache", tiny_caches["dbt"], "--split", "val",
                          "--out", out, "--bootstrap", "0", "--report"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    parser = _Cards()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    assert sum("lesion-card" in card["class"] for card in parser.cards) == metrics["counts"]["boxes"]
    assert any("fp-card" in card["class"] for card in parser.cards)
    assert all(card["images"] == 2 for card in parser.cards)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium); "
                    ".ci/run installs it where it can")
def test_report_renders_in_chromium(scored_synth, tiny_caches, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "ev"
    code, err = _report(scored_synth, out, tiny_caches["dbt"], capsys)
    assert code == 0, err
    page = (out / "report.html").resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-dom'}",
                          "--virtual-time-budget=10000", "--dump-dom", page],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parser = _Cards()
    parser.feed(dom.stdout)
    check = next(attrs for tag, attrs in _tags(dom.stdout) if attrs.get("id") == "render-check")
    # What the page's own script counted after the browser laid it out and decoded its pictures.
    assert int(check["data-lesion-cards"]) == scored_synth["lesions"]
    assert int(check["data-images"]) == len(parser.sources) > scored_synth["lesions"]
    assert int(check["data-images-decoded"]) == int(check["data-images"])
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-shot'}",
                    "--window-size=1400,2000", f"--screenshot={shot}", page],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1400)
    # Pictures are dark, the page is white: a rendered report has both.
    assert (pixels < 40).mean() > 0.02 and (pixels > 240).mean() > 0.3


def _tags(text: str):
    tags = []

    class Collector(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append((tag, dict(attrs)))

    Collector().feed(text)
    return tags


def test_a_near_miss_says_why_it_missed(tmp_path):
    """A detection on lesion A's centre but 16 slices off (window +-15) hits lesion B, 100 px away on its own slice:
    A's card must say the slice window, not that a nearer lesion took the hit."""
    from comoto_cli.evaluation.html_report import write_html_report

    boxes = dbtex_boxes(["P", "P"], ["S", "S"], ["lcc", "lcc"], [0.0, 100.0], [0.0, 0.0], [50.0, 50.0],
                        [50.0, 50.0], [10.0, 26.0], [60.0, 60.0])
    labels = dbtex_labels(["P"], ["S"], ["lcc"])
    tables = DbtexTables(predictions=_predictions([("S", "lcc", 0, 0, 50, 50, 26, 0.9)]), boxes=boxes, labels=labels)
    tables.predictions["PatientID"] = np.array(["P"])
    review = write_html_report(tmp_path / "r.html", tables, {**score_dbtex(tables), "counts": {}}, images=None,
                               froc_png=None, title="t", inputs={}, progress=False)
    assert [lesion.status for lesion in review.lesions] == ["missed", "found"]
    assert review.lesions[0].detection.hit_box == 1
    page = (tmp_path / "r.html").read_text()
    assert "near miss, outside the slice window" in page and "counted for a nearer lesion" not in page
