"""Weighted box fusion of several models' DBTex tables (``comoto fuse``)."""

from __future__ import annotations

import numpy as np
import pytest

from comoto_cli.data.tables import read_dbtex_predictions, write_dbtex_predictions
from comoto_cli.inference.ensemble import fuse_predictions


def _table(rows: list[tuple]) -> dict[str, np.ndarray]:
    """rows of (study, x, y, w, h, z, score), view lcc, patient P<study>."""
    columns = list(zip(*rows)) if rows else [[]] * 7
    return {"PatientID": np.array([f"P{s}" for s in columns[0]], dtype=str),
            "StudyUID": np.array(columns[0], dtype=str), "View": np.array(["lcc"] * len(rows), dtype=str),
            "X": np.array(columns[1], float), "Y": np.array(columns[2], float), "Width": np.array(columns[3], float),
            "Height": np.array(columns[4], float), "Z": np.array(columns[5], np.int64),
            "Depth": np.zeros(len(rows), np.int64), "Score": np.array(columns[6], float)}


def test_agreeing_boxes_fuse_to_their_weighted_mean_and_lone_boxes_are_discounted():
    a = _table([("S1", 100, 100, 40, 40, 10, 0.9), ("S1", 500, 500, 30, 30, 20, 0.8)])
    b = _table([("S1", 104, 100, 40, 40, 11, 0.3)])
    c = _table([("S1", 102, 102, 40, 40, 10, 0.6), ("S2", 10, 10, 20, 20, 3, 0.5)])
    fused = fuse_predictions([a, b, c], iou=0.55, slice_window=2)
    assert fused["StudyUID"].tolist() == ["S1", "S1", "S2"]
    # The three models' boxes of the first lesion: one box at the score-weighted mean, scored by the mean score.
    weights = np.array([0.9, 0.3, 0.6])
    assert fused["X"][0] == pytest.approx(np.dot(weights, [100, 104, 102]) / weights.sum())
    assert fused["Y"][0] == pytest.approx(np.dot(weights, [100, 100, 102]) / weights.sum())
    assert fused["Z"][0] == round(np.dot(weights, [10, 11, 10]) / weights.sum())
    assert fused["Score"][0] == pytest.approx(weights.mean())
    # Found by one model of three: a third of its score.
    assert fused["Score"][1] == pytest.approx(0.8 / 3) and fused["X"][1] == 500
    assert fused["Score"][2] == pytest.approx(0.5 / 3)


def test_one_model_cannot_vote_twice_and_far_slices_do_not_fuse():
    a = _table([("S1", 100, 100, 40, 40, 10, 0.9), ("S1", 101, 100, 40, 40, 10, 0.7)])
    b = _table([("S1", 100, 100, 40, 40, 30, 0.8)])  # same place, 20 slices away
    fused = fuse_predictions([a, b], iou=0.55, slice_window=2)
    assert sorted(fused["Score"].tolist()) == pytest.approx(sorted([0.45, 0.35, 0.4]))
    assert fuse_predictions([a, a], max_boxes=1)["Score"].tolist() == pytest.approx([0.9])


def test_fusing_a_model_with_itself_changes_nothing_but_the_order(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(f"S{rng.integers(3)}", *rng.uniform(0, 900, 2).round(1), 40.0, 30.0, int(rng.integers(0, 40)),
             round(float(rng.uniform(0.01, 1)), 4)) for _ in range(60)]
    table = _table(rows)
    # Boxes of one model that overlap do not fuse with each other; with itself every box fuses with its twin.
    fused = fuse_predictions([table, table], max_boxes=1000)
    key = lambda t: sorted(zip(t["StudyUID"], t["X"].round(6), t["Y"].round(6), t["Z"], t["Score"].round(9)))  # noqa: E731
    assert key(fused) == key(table)
    write_dbtex_predictions(tmp_path / "a.csv", table)
    from comoto_cli.cli import main

    with pytest.raises(SystemExit) as info:
        main(["fuse", str(tmp_path / "a.csv"), str(tmp_path / "a.csv"), "--out", str(tmp_path / "f.csv"),
              "--max-boxes", "1000"])
    assert info.value.code == 0
    assert key(read_dbtex_predictions(tmp_path / "f.csv")) == key(table)
    with pytest.raises(SystemExit) as info:
        main(["fuse", str(tmp_path / "a.csv"), "--out", str(tmp_path / "g.csv")])
    assert info.value.code == 2 and not (tmp_path / "g.csv").exists()
