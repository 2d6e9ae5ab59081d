"""DBTex scorer: vectorised implementation vs a plain loop reference of the official semantics, hand-built
cases for every rule, invariants, CSV reading/writing, bootstrap and the `comoto evaluate` CSV path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comoto_cli.data.tables import (
    DBTEX_BOX_COLUMNS,
    DBTEX_LABEL_COLUMNS,
    dbtex_boxes,
    dbtex_labels,
    read_dbtex_predictions,
    write_dbtex_predictions,
)
from comoto_cli.errors import InputDataError
from comoto_cli.metrics import dbtex
from comoto_cli.metrics.dbtex import (
    METRIC_KEYS,
    DbtexTables,
    bootstrap_mean_sensitivity,
    dbtex_metrics,
    froc_points,
    read_dbtex_csvs,
    score_dbtex,
)


# ---------------------------------------------------------------------------------------------- reference
def reference_score(tables: DbtexTables) -> dict[str, float]:
    """The official rules (docs/design.md section 2) written as plain loops, one prediction at a time."""
    pred, box, lab = tables.predictions, tables.boxes, tables.labels
    n_boxes = len(box["X"])
    boxes_of: dict[tuple[str, str], list[int]] = {}
    for j in range(n_boxes):
        boxes_of.setdefault((str(box["StudyUID"][j]), str(box["View"][j])), []).append(j)
    keys = [(str(pred["StudyUID"][i]), str(pred["View"][i])) for i in range(len(pred["Score"]))]
    scores = [float(s) for s in pred["Score"]]

    hit_of: list[int | None] = []
    for i, key in enumerate(keys):
        px = pred["X"][i] + pred["Width"][i] / 2
        py = pred["Y"][i] + pred["Height"][i] / 2
        pz = pred["Z"][i] + pred["Depth"][i] / 2
        candidates = boxes_of.get(key, [])
        best = None
        for j in candidates:
            z_limit = box["VolumeSlices"][candidates[0]] / 4  # the view's first box row
            gx = box["X"][j] + box["Width"][j] / 2
            gy = box["Y"][j] + box["Height"][j] / 2
            gz = box["Slice"][j]
            radius = max(math.sqrt(box["Width"][j] ** 2 + box["Height"][j] ** 2) / 2, 100)
            planar = math.sqrt((px - gx) ** 2 + (py - gy) ** 2)
            if planar <= radius and abs(pz - gz) <= z_limit:
                distance = math.sqrt((px - gx) ** 2 + (py - gy) ** 2 + (pz - gz) ** 2)
                if best is None or distance < best[0]:
                    best = (distance, j)
        hit_of.append(None if best is None else best[1])

    if scores:
        thresholds = [max(scores) + 1.0] + [s for s, h in zip(scores, hit_of) if h is not None] + [min(scores) - 1.0]
    else:
        thresholds = []
    thresholds.sort(reverse=True)

    def walk(members: list[int], n_volumes: int, max_fps: float):
        fps, tprs = [], []
        for t in thresholds:
            found, false_positives = set(), 0
            for i in members:
                if scores[i] >= t:
                    if hit_of[i] is None:
                        false_positives += 1
                    else:
                        found.add(hit_of[i])
            tprs.append(len(found) / n_boxes)
            fps.append(false_positives / n_volumes)
            if fps[-1] > max_fps:
                break
        return (fps, tprs) if fps else ([0.0], [0.0])

    label_keys = [(str(lab["StudyUID"][r]), str(lab["View"][r])) for r in range(len(lab["View"]))]
    fps, tprs = walk(list(range(len(scores))), len(label_keys), 2.0)
    result = {"sensitivity_at_2_fps_all": float(np.interp(2.0, fps, tprs))}
    positive = [i for i, k in enumerate(keys) if k in boxes_of]
    fps, tprs = walk(positive, sum(k in boxes_of for k in label_keys), 4.0)
    values = [float(np.interp(f, fps, tprs)) for f in (1.0, 2.0, 3.0, 4.0)]
    for f, v in zip((1, 2, 3, 4), values):
        result[f"sensitivity_at_{f}_fps_positive"] = v
    result["mean_sensitivity_positive"] = float(np.mean(values))
    return result


# ---------------------------------------------------------------------------------------------- builders
def make_tables(preds: list[tuple], boxes: list[tuple], labels: list[tuple]) -> DbtexTables:
    """preds: (study, view, X, W, Y, H, Z, D, score); boxes: (study, view, X, Y, W, H, Slice, VolumeSlices);
    labels: (study, view). PatientID = study name up to the first '.'."""

    def patient(study: str) -> str:
        return study.split(".")[0]

    def columns(rows, names, text=2):
        out = {"PatientID": np.array([patient(r[0]) for r in rows], dtype=str)}
        out["StudyUID"] = np.array([r[0] for r in rows], dtype=str)
        out["View"] = np.array([r[1] for r in rows], dtype=str)
        for k, name in enumerate(names):
            out[name] = np.array([float(r[text + k]) for r in rows], dtype=np.float64)
        return out

    return DbtexTables(
        predictions=columns(preds, ["X", "Width", "Y", "Height", "Z", "Depth", "Score"]),
        boxes=columns(boxes, ["X", "Y", "Width", "Height", "Slice", "VolumeSlices"]),
        labels=columns(labels, []),
    )


def assert_same(ours: dict[str, float], ref: dict[str, float]) -> None:
    assert list(ours) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert ours[key] == pytest.approx(ref[key], abs=1e-9), key


@st.composite
def dbtex_cases(draw):
    """Small worlds on an integer grid (exact arithmetic, frequent ties and boundary hits)."""
    n_volumes = draw(st.integers(1, 4))
    volumes = [(f"P{draw(st.integers(0, 2))}.{v}", ("lcc", "rmlo")[v % 2]) for v in range(n_volumes)]
    boxes = []
    for study, view in volumes:
        for _ in range(draw(st.integers(0, 3))):
            boxes.append((study, view, draw(st.integers(0, 300)), draw(st.integers(0, 300)),
                          draw(st.integers(0, 300)), draw(st.integers(0, 300)), draw(st.integers(0, 20)),
                          draw(st.integers(4, 40))))
    if not boxes:
        study, view = volumes[0]
        boxes.append((study, view, 100, 100, 50, 50, 10, 40))
    labels = [v for v in volumes if draw(st.booleans()) or v == (boxes[0][0], boxes[0][1])]
    labels += [(f"P9.{k}", "lcc") for k in range(draw(st.integers(0, 2)))]  # normal volumes, no predictions
    preds = []
    targets = volumes + [("P8.0", "lcc")]  # the last one has no labels row and no boxes
    first_volume_slices = {}
    for b in boxes:
        first_volume_slices.setdefault((b[0], b[1]), b[7])
    for _ in range(draw(st.integers(0, 14))):
        score = draw(st.sampled_from([0.1, 0.25, 0.5, 0.75, 0.9]) | st.floats(0, 1))
        width, height, depth = draw(st.integers(0, 80)), draw(st.integers(0, 80)), draw(st.integers(0, 4))
        if draw(st.booleans()):  # aimed at a lesion, on or near the hit boundaries
            study, view, bx, by, bw, bh, slice_, _ = boxes[draw(st.integers(0, len(boxes) - 1))]
            limit = first_volume_slices[(study, view)] / 4
            radius = max(math.sqrt(bw * bw + bh * bh) / 2, 100)
            dx, dy = draw(st.sampled_from([(0, 0), (100, 0), (100.5, 0), (60, -80), (0, -99.5), (radius, 0),
                                           (0, radius + 0.5), (30, 40)]) | st.tuples(st.integers(-150, 150),
                                                                                    st.integers(-150, 150)))
            dz = draw(st.sampled_from([0, limit, -limit, limit + 0.25, -limit - 0.5]) | st.integers(-12, 12))
            x = bx + bw / 2 + dx - width / 2
            y = by + bh / 2 + dy - height / 2
            z = slice_ + dz - depth / 2
            preds.append((study, view, x, width, y, height, z, depth, score))
        else:
            study, view = targets[draw(st.integers(0, len(targets) - 1))]
            preds.append((study, view, draw(st.integers(0, 500)), width, draw(st.integers(0, 500)), height,
                          draw(st.integers(0, 25)), depth, score))
    return make_tables(preds, boxes, labels)


# ---------------------------------------------------------------------------------------------- property tests
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dbtex_cases())
def test_vectorised_scorer_matches_loop_reference(tables):
    assert_same(score_dbtex(tables), reference_score(tables))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dbtex_cases(), st.randoms(use_true_random=False))
def test_prediction_and_label_row_order_does_not_matter(tables, rnd):
    base = score_dbtex(tables)
    n_pred = len(tables.predictions["Score"])
    n_lab = len(tables.labels["View"])
    p_order = np.array(rnd.sample(range(n_pred), n_pred), dtype=np.int64)
    l_order = np.array(rnd.sample(range(n_lab), n_lab), dtype=np.int64)
    shuffled = DbtexTables(
        predictions={k: v[p_order] for k, v in tables.predictions.items()},
        boxes=tables.boxes,
        labels={k: v[l_order] for k, v in tables.labels.items()},
    )
    assert score_dbtex(shuffled) == base


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dbtex_cases(), st.floats(0.0, 1.0))
def test_far_low_score_false_positive_never_raises_sensitivity(tables, fraction):
    base = score_dbtex(tables)
    pred = tables.predictions
    low = (float(pred["Score"].min()) if pred["Score"].size else 0.5) - 0.5 * fraction - 1e-3
    study, view = str(tables.boxes["StudyUID"][0]), str(tables.boxes["View"][0])
    extra = {"PatientID": study.split(".")[0], "StudyUID": study, "View": view,
             "X": 1e6, "Width": 10.0, "Y": 1e6, "Height": 10.0, "Z": 0.0, "Depth": 0.0, "Score": low}
    more = DbtexTables(
        predictions={k: np.append(v, extra[k]).astype(v.dtype) for k, v in pred.items()},
        boxes=tables.boxes,
        labels=tables.labels,
    )
    worse = score_dbtex(more)
    for key in METRIC_KEYS:
        assert worse[key] <= base[key] + 1e-12, key


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dbtex_cases(), st.lists(st.integers(0, 3), min_size=4, max_size=4))
def test_bootstrap_weights_equal_explicit_renamed_copies(tables, multiplicity):
    """Drawing a patient k times == k copies of its volumes under new StudyUIDs (the documented semantics)."""
    matched = dbtex._match(tables)
    patients = sorted(set(np.concatenate([tables.labels["PatientID"], tables.boxes["PatientID"],
                                          tables.predictions["PatientID"]]).tolist()))
    weight_of = {p: multiplicity[i % 4] for i, p in enumerate(patients)}
    if not any(weight_of[str(p)] for p in tables.boxes["PatientID"]):
        return
    if not any(weight_of[str(p)] and (s, v) in set(zip(tables.boxes["StudyUID"], tables.boxes["View"]))
               for p, s, v in zip(tables.labels["PatientID"], tables.labels["StudyUID"], tables.labels["View"])):
        return

    def copies(table):
        rows = [(i, c) for i in range(len(table["View"])) for c in range(weight_of[str(table["PatientID"][i])])]
        index = np.array([i for i, _ in rows], dtype=np.int64)
        out = {k: v[index] for k, v in table.items()}
        out["StudyUID"] = np.array([f"{table['StudyUID'][i]}#{c}" for i, c in rows], dtype=str)
        return out

    explicit = DbtexTables(predictions=copies(tables.predictions), boxes=copies(tables.boxes),
                           labels=copies(tables.labels))
    names = np.array(patients)
    volume_weight = np.array([weight_of[str(names[p])] for p in matched.volume_patient], dtype=np.int64)
    weighted = dbtex._metrics_from_match(matched, volume_weight)
    for key in METRIC_KEYS:
        assert weighted[key] == pytest.approx(score_dbtex(explicit)[key], abs=1e-12), key


# ---------------------------------------------------------------------------------------------- hand-built cases
NORMAL = [("N.1", "lcc"), ("N.2", "rcc")]


def test_several_lesions_in_one_view_and_repeated_hits():
    boxes = [("A.1", "lcc", 100, 100, 50, 50, 10, 40), ("A.1", "lcc", 900, 900, 50, 50, 10, 40)]
    preds = [
        ("A.1", "lcc", 100, 50, 100, 50, 10, 0, 0.9),  # lesion 0
        ("A.1", "lcc", 110, 50, 100, 50, 10, 0, 0.8),  # lesion 0 again: neither TP nor FP
        ("A.1", "lcc", 105, 50, 100, 50, 10, 0, 0.7),  # lesion 0 again
        ("A.1", "lcc", 500, 50, 500, 50, 10, 0, 0.6),  # FP
        ("A.1", "lcc", 900, 50, 900, 50, 10, 0, 0.5),  # lesion 1
    ]
    tables = make_tables(preds, boxes, [("A.1", "lcc")] + NORMAL)
    fps, tprs = froc_points(tables, positive_only=True)
    # thresholds: 1.9, .9, .8, .7, .5, -.5 -> found 0,1,1,1,2,2 ; FPs 0,0,0,0,1,1 (1 positive volume)
    assert tprs.tolist() == [0.0, 0.5, 0.5, 0.5, 1.0, 1.0]
    assert fps.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    result = score_dbtex(tables)
    assert result["sensitivity_at_1_fps_positive"] == 1.0
    assert_same(result, reference_score(tables))


def test_overlapping_lesions_prediction_goes_to_nearest():
    # Two overlapping GT boxes; both predictions are within range of both lesions.
    boxes = [("A.1", "lcc", 100, 100, 100, 100, 10, 40), ("A.1", "lcc", 140, 100, 100, 100, 10, 40)]
    near_second = ("A.1", "lcc", 180, 20, 140, 20, 10, 0, 0.9)  # centre (190, 150): nearer box 1 (190, 150)
    near_first = ("A.1", "lcc", 140, 20, 140, 20, 10, 0, 0.8)  # centre (150, 150): nearer box 0 (150, 150)
    tables = make_tables([near_second, near_first], boxes, [("A.1", "lcc")])
    assert dbtex._match(tables).pred_gt.tolist() == [1, 0]
    assert score_dbtex(tables)["mean_sensitivity_positive"] == 1.0
    # Equidistant from both: the first box of the view in file order wins.
    middle = ("A.1", "lcc", 160, 20, 140, 20, 10, 0, 0.9)  # centre (170, 150)
    tables = make_tables([middle], boxes, [("A.1", "lcc")])
    assert dbtex._match(tables).pred_gt.tolist() == [0]
    tables = make_tables([middle], boxes[::-1], [("A.1", "lcc")])
    assert dbtex._match(tables).pred_gt.tolist() == [0]  # row 0 is now the other lesion


@pytest.mark.parametrize(("z", "depth", "hits"), [(20, 0, True), (0, 0, True), (20, 1, False), (21, 0, False),
                                                  (18, 4, True), (19, 4, False)])
def test_z_limit_is_volume_slices_over_four_inclusive(z, depth, hits):
    # VolumeSlices 40 -> |dz| <= 10 around Slice 10; the second box row's VolumeSlices (8) is ignored.
    boxes = [("A.1", "lcc", 100, 100, 50, 50, 10, 40), ("A.1", "lcc", 2000, 2000, 50, 50, 10, 8)]
    tables = make_tables([("A.1", "lcc", 100, 50, 100, 50, z, depth, 0.5)], boxes, [("A.1", "lcc")])
    assert (dbtex._match(tables).pred_gt[0] == 0) == hits


@pytest.mark.parametrize(("dx", "w", "h", "hits"), [
    (100, 20, 20, True), (100.5, 20, 20, False),  # small lesion: the 100-pixel floor
    (250, 300, 400, True), (250.5, 300, 400, False),  # big lesion: half diagonal 250 > 100
    (60, 0, 0, True),
])
def test_in_plane_radius(dx, w, h, hits):
    boxes = [("A.1", "lcc", 1000 - w / 2, 1000 - h / 2, w, h, 10, 40)]  # centre (1000, 1000)
    pred = ("A.1", "lcc", 1000 + dx - 5, 10, 1000 - 5, 10, 10, 0, 0.5)  # centre (1000 + dx, 1000)
    tables = make_tables([pred], boxes, [("A.1", "lcc")])
    assert (dbtex._match(tables).pred_gt[0] == 0) == hits
    diagonal = make_tables([("A.1", "lcc", 1060 - 5, 10, 1080 - 5, 10, 10, 0, 0.5)], boxes, [("A.1", "lcc")])
    assert dbtex._match(diagonal).pred_gt[0] == 0  # distance (60, 80) = 100 exactly


def test_score_ties_keep_duplicate_thresholds():
    boxes = [("A.1", "lcc", 100, 100, 50, 50, 10, 40), ("B.1", "lcc", 100, 100, 50, 50, 10, 40)]
    preds = [
        ("A.1", "lcc", 100, 50, 100, 50, 10, 0, 0.5),  # hit
        ("B.1", "lcc", 100, 50, 100, 50, 10, 0, 0.5),  # hit, same score
        ("A.1", "lcc", 700, 50, 700, 50, 10, 0, 0.5),  # FP, same score
    ]
    tables = make_tables(preds, boxes, [("A.1", "lcc"), ("B.1", "lcc")])
    fps, tprs = froc_points(tables, positive_only=True)
    assert tprs.tolist() == [0.0, 1.0, 1.0, 1.0]  # 1.5, 0.5, 0.5, -0.5: the tie appears twice
    assert fps.tolist() == [0.0, 0.5, 0.5, 0.5]
    assert_same(score_dbtex(tables), reference_score(tables))


def test_normal_and_unlabelled_volume_predictions_count_only_in_all():
    boxes = [("A.1", "lcc", 100, 100, 50, 50, 10, 40)]
    hit = ("A.1", "lcc", 100, 50, 100, 50, 10, 0, 0.5)
    labels = [("A.1", "lcc"), ("N.1", "lcc")]
    base = score_dbtex(make_tables([hit], boxes, labels))
    assert base["sensitivity_at_2_fps_all"] == 1.0
    # Five FPs on the normal volume scoring above the hit: 'all' (2 volumes) has points (0, 0), (2.5, 1),
    # so sensitivity at 2 FP/volume = 2 / 2.5.
    fps_on_normal = [("N.1", "lcc", 10 * k, 5, 10, 5, 1, 0, 0.9) for k in range(5)]
    tables = make_tables([hit] + fps_on_normal, boxes, labels)
    result = score_dbtex(tables)
    assert result["sensitivity_at_2_fps_all"] == pytest.approx(0.8, abs=1e-12)
    for key in METRIC_KEYS[1:]:
        assert result[key] == base[key]  # normal volumes are outside the positive subset
    # The same FPs on a volume absent from the labels also count in 'all' (the official behaviour).
    moved = [("X.9", "lcc", *p[2:]) for p in fps_on_normal]
    assert score_dbtex(make_tables([hit] + moved, boxes, labels))["sensitivity_at_2_fps_all"] == pytest.approx(0.8)
    assert_same(result, reference_score(tables))


def test_volumes_without_predictions_and_no_predictions_at_all():
    boxes = [("A.1", "lcc", 100, 100, 50, 50, 10, 40), ("B.1", "rcc", 100, 100, 50, 50, 10, 40)]
    labels = [("A.1", "lcc"), ("B.1", "rcc")]
    tables = make_tables([("A.1", "lcc", 100, 50, 100, 50, 10, 0, 0.5)], boxes, labels)
    assert score_dbtex(tables)["mean_sensitivity_positive"] == 0.5
    empty = make_tables([], boxes, labels)
    assert all(value == 0.0 for value in score_dbtex(empty).values())


def test_all_curve_to_four_fps_gives_the_same_two_fps_value():
    rng = np.random.default_rng(3)
    boxes = [(f"P{k}.1", "lcc", 100, 100, 60, 60, 10, 40) for k in range(10)]
    preds = [(f"P{rng.integers(10)}.1", "lcc", float(rng.integers(0, 400)), 20, float(rng.integers(0, 400)), 20,
              10, 0, float(rng.random())) for _ in range(80)]
    tables = make_tables(preds, boxes, [(b[0], "lcc") for b in boxes])
    fps, tprs = froc_points(tables, positive_only=False, max_fps=4.0)
    assert fps[-1] > 2.0
    assert float(np.interp(2.0, fps, tprs)) == score_dbtex(tables)["sensitivity_at_2_fps_all"]
    assert np.all(np.diff(fps) >= 0) and np.all(np.diff(tprs) >= 0)


def test_zero_denominators_are_clear_errors():
    boxes = [("A.1", "lcc", 100, 100, 50, 50, 10, 40)]
    with pytest.raises(InputDataError, match="positive subset is empty"):
        score_dbtex(make_tables([], boxes, [("N.1", "lcc")]))
    with pytest.raises(InputDataError, match="no boxes"):
        score_dbtex(make_tables([], [], [("N.1", "lcc")]))


# ---------------------------------------------------------------------------------------------- bootstrap
def _bootstrap_tables() -> DbtexTables:
    rng = np.random.default_rng(0)
    boxes = [(f"P{k}.1", "lcc", 100, 100, 60, 60, 10, 40) for k in range(12)]
    preds = []
    for k in range(12):
        if rng.random() < 0.7:
            preds.append((f"P{k}.1", "lcc", 100, 60, 100, 60, 10, 0, float(rng.random())))
        preds.append((f"P{k}.1", "lcc", 600, 20, 600, 20, 10, 0, float(rng.random())))
    return make_tables(preds, boxes, [(b[0], "lcc") for b in boxes] + NORMAL)


def test_bootstrap_interval_is_seeded_and_brackets_spread():
    tables = _bootstrap_tables()
    low, high = bootstrap_mean_sensitivity(tables, 200, seed=1)
    assert (low, high) == bootstrap_mean_sensitivity(tables, 200, seed=1)
    assert (low, high) != bootstrap_mean_sensitivity(tables, 200, seed=2)
    assert 0.0 <= low < high <= 1.0
    assert low <= score_dbtex(tables)["mean_sensitivity_positive"] <= high
    assert all(math.isnan(v) for v in bootstrap_mean_sensitivity(tables, 0, seed=1))


def test_all_weights_one_and_all_doubled_reproduce_the_score():
    tables = _bootstrap_tables()
    matched = dbtex._match(tables)
    ones = np.ones(matched.volume_has_boxes.size, dtype=np.int64)
    assert dbtex._metrics_from_match(matched, ones) == score_dbtex(tables)
    assert dbtex._metrics_from_match(matched, 2 * ones) == score_dbtex(tables)


# ---------------------------------------------------------------------------------------------- CSV files
PRED_HEADER = "PatientID,StudyUID,View,X,Width,Y,Height,Z,Depth,Score\n"
BOX_HEADER = "PatientID,StudyUID,View,Subject,Slice,X,Y,Width,Height,Class,AD,VolumeSlices\n"
LABEL_HEADER = "PatientID,StudyUID,View,Normal,Actionable,Benign,Cancer\n"


def _write_inputs(folder, pred_rows: str):
    (folder / "pred.csv").write_text(PRED_HEADER + pred_rows)
    (folder / "boxes.csv").write_text(
        BOX_HEADER + "P1,1.2.3,lcc,x,10,100,100,50,50,cancer,0,40\nP2,1.2.4,rmlo,x,5,300,300,40,40,benign,0,20\n"
    )
    (folder / "labels.csv").write_text(
        LABEL_HEADER + "P1,1.2.3,lcc,0,0,0,1\nP2,1.2.4,rmlo,0,0,1,0\nP3,1.2.5,lcc,1,0,0,0\n"
    )
    return folder / "pred.csv", folder / "boxes.csv", folder / "labels.csv"


GOOD_ROWS = (
    "P1,1.2.3,lcc,100,50,100,50,10,0,0.9\n"
    "P1,1.2.3,lcc,900,50,900,50,10,0,0.4\n"
    "P2,1.2.4,rmlo,300,40,300,40,5,2,0.7\n"
    "P3,1.2.5,lcc,10,10,10,10,3,1,0.95\n"
)


def test_read_csvs_and_score(tmp_path):
    tables = read_dbtex_csvs(*_write_inputs(tmp_path, GOOD_ROWS))
    assert tables.predictions["Score"].tolist() == [0.9, 0.4, 0.7, 0.95]
    assert tables.boxes["VolumeSlices"].tolist() == [40.0, 20.0]
    assert tables.labels["Cancer"].tolist() == [1, 0, 0]
    assert_same(score_dbtex(tables), reference_score(tables))
    # The registered ``dbtex`` family: the same numbers from the predictions table and (boxes, labels).
    assert dbtex_metrics(tables.predictions, (tables.boxes, tables.labels)) == score_dbtex(tables)


def test_tables_built_from_arrays_are_the_tables_read_from_csv(tmp_path):
    """Checkpoint evaluation builds its ground truth from a cache with dbtex_boxes / dbtex_labels: the same
    columns and dtypes as the CSV readers give, and the same scores (integer slices, object text included)."""
    read = read_dbtex_csvs(*_write_inputs(tmp_path, GOOD_ROWS))
    box, lab = read.boxes, read.labels
    built = DbtexTables(
        predictions=read.predictions,
        boxes=dbtex_boxes(box["PatientID"].astype(object), box["StudyUID"].astype(object), box["View"].astype(object),
                          box["X"], box["Y"], box["Width"], box["Height"], box["Slice"].astype(np.int64),
                          box["VolumeSlices"].astype(np.int64)),
        labels=dbtex_labels(lab["PatientID"].astype(object), lab["StudyUID"].astype(object),
                            lab["View"].astype(object)),
    )
    assert list(built.boxes) == list(DBTEX_BOX_COLUMNS) and list(built.labels) == list(DBTEX_LABEL_COLUMNS)
    for name in DBTEX_BOX_COLUMNS:
        assert built.boxes[name].dtype == box[name].dtype and np.array_equal(built.boxes[name], box[name]), name
    for name in DBTEX_LABEL_COLUMNS:
        assert built.labels[name].dtype == lab[name].dtype and np.array_equal(built.labels[name], lab[name]), name
    assert score_dbtex(built) == score_dbtex(read)
    assert dbtex.dbtex_counts(built) == dbtex.dbtex_counts(read)


@pytest.mark.parametrize(("rows", "message"), [
    ("P1,1.2.3,lcc,100,50,100,50,10,0,nan\n", "row 2.*Score"),
    ("P1,1.2.3,lcc,100,50,100,50,10,0,0.5\nP1,1.2.3,lcc,100,-5,100,50,10,0,0.5\n", "row 3.*Width.*negative"),
    ("P1,1.2.3,lcc,100,50,100,50,10,0,high\n", "row 2.*not a number"),
    ("P1,,lcc,100,50,100,50,10,0,0.5\n", "row 2.*StudyUID.*empty"),
])
def test_bad_prediction_rows_are_named(tmp_path, rows, message):
    with pytest.raises(InputDataError, match=message):
        read_dbtex_csvs(*_write_inputs(tmp_path, rows))


def test_missing_column_is_named(tmp_path):
    pred, boxes, labels = _write_inputs(tmp_path, GOOD_ROWS)
    boxes.write_text("PatientID,StudyUID,View,Slice,X,Y,Width,Height\nP1,1.2.3,lcc,10,100,100,50,50\n")
    with pytest.raises(InputDataError, match="boxes.csv, row 1: missing column.*VolumeSlices"):
        read_dbtex_csvs(pred, boxes, labels)


def test_write_predictions_round_trip(tmp_path):
    tables = read_dbtex_csvs(*_write_inputs(tmp_path, GOOD_ROWS))
    tables.predictions["Score"] = tables.predictions["Score"] / 3.0  # values that need full precision
    out = tmp_path / "out" / "predictions.csv"
    write_dbtex_predictions(out, tables.predictions)
    assert out.read_text().splitlines()[0] == PRED_HEADER.strip()
    again = read_dbtex_predictions(out)
    for name, column in tables.predictions.items():
        assert np.array_equal(again[name], column), name
    assert [p.name for p in out.parent.iterdir()] == ["predictions.csv"]  # no temporary left behind


# ---------------------------------------------------------------------------------------------- CLI
def _run_cli(args: list[str]) -> int:
    from comoto_cli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code or 0)


def test_cli_scores_a_submission(tmp_path, capsys):
    pred, boxes, labels = _write_inputs(tmp_path, GOOD_ROWS)
    out = tmp_path / "report"
    code = _run_cli(["evaluate", "--predictions", str(pred), "--boxes", str(boxes), "--labels", str(labels),
                     "--out", str(out), "--bootstrap", "50", "--seed", "3"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    expected = score_dbtex(read_dbtex_csvs(pred, boxes, labels))
    for key in METRIC_KEYS:
        assert metrics[key] == expected[key]
    low, high = metrics["mean_sensitivity_positive_ci95"]
    assert low <= high
    assert metrics["counts"]["volumes"] == 3 and metrics["counts"]["boxes"] == 2
    assert (out / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "predictions.csv").read_text() == pred.read_text()
    assert "mean_sensitivity_positive" in capsys.readouterr().out


@pytest.mark.parametrize("args", [
    [],
    ["--predictions", "p.csv", "--out", "o"],
    ["--predictions", "p.csv", "--boxes", "b.csv", "--labels", "l.csv"],
    ["--predictions", "p.csv", "--boxes", "b.csv", "--labels", "l.csv", "--checkpoint", "c.pt", "--out", "o"],
    ["--boxes", "b.csv", "--out", "o"],
    ["--predictions", "p.csv", "--boxes", "b.csv", "--labels", "l.csv", "--out", "o", "--split", "val"],
    ["--predictions", "p.csv", "--boxes", "b.csv", "--labels", "l.csv", "--out", "o", "--bootstrap", "-1"],
])
def test_cli_usage_errors_exit_2_with_one_line(tmp_path, capsys, args):
    assert _run_cli(["evaluate", *args]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "\n" not in error


def test_cli_bad_csv_exits_1_and_writes_nothing(tmp_path, capsys):
    pred, boxes, labels = _write_inputs(tmp_path, "P1,1.2.3,lcc,100,50,100,50,10,0,nan\n")
    out = tmp_path / "report"
    assert _run_cli(["evaluate", "--predictions", str(pred), "--boxes", str(boxes), "--labels", str(labels),
                     "--out", str(out), "--bootstrap", "0"]) == 1
    assert "pred.csv, row 2" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()


def test_cli_no_froc_writes_no_figure(tmp_path):
    pred, boxes, labels = _write_inputs(tmp_path, GOOD_ROWS)
    out = tmp_path / "report"
    assert _run_cli(["evaluate", "--predictions", str(pred), "--boxes", str(boxes), "--labels", str(labels),
                     "--out", str(out), "--bootstrap", "0", "--no-froc"]) == 0
    assert json.loads((out / "metrics.json").read_text())["mean_sensitivity_positive_ci95"] is None
    assert not (out / "froc.png").exists()


def test_cli_checkpoint_branch_names_a_missing_cache(tmp_path, capsys):
    out = tmp_path / "o"
    code = _run_cli(["evaluate", "--checkpoint", str(tmp_path / "c.pt"), "--cache", str(tmp_path / "c.h5"),
                     "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert "c.h5" in err and "cache file not found" in err
    assert not out.exists() or not any(out.iterdir())


def test_boxes_table_counting_is_the_references_denominator():
    """A positive view (its one lesion hit at 0.3) and a normal view with 5 false positives at 0.9. Officially 2
    volumes: at threshold 0.3 the all-cases pass has 2.5 FP/volume and sensitivity 1, so 0.8 at 2 FP/volume. Counted
    as the reference does (its boxes table as the labels), 1 volume: 5 FP/volume, 0.4 at 2. The positive-cases
    pass is the same both ways."""
    from comoto_cli.data.tables import dbtex_boxes, dbtex_labels
    from comoto_cli.metrics.dbtex import DbtexTables, counting_volumes

    boxes = dbtex_boxes(["PA"], ["A"], ["lcc"], [100.0], [100.0], [50.0], [50.0], [10.0], [40.0])
    labels = dbtex_labels(["PA", "PN"], ["A", "N"], ["lcc", "lcc"])
    rows = [("PA", "A", 100.0, 0.3)] + [("PN", "N", 900.0 + 60 * k, 0.9) for k in range(5)]
    predictions = {"PatientID": np.array([r[0] for r in rows]), "StudyUID": np.array([r[1] for r in rows]),
                   "View": np.array(["lcc"] * 6), "X": np.array([r[2] for r in rows]), "Width": np.full(6, 50.0),
                   "Y": np.full(6, 100.0), "Height": np.full(6, 50.0), "Z": np.full(6, 10.0), "Depth": np.zeros(6),
                   "Score": np.array([r[3] for r in rows])}
    tables = DbtexTables(predictions=predictions, boxes=boxes, labels=labels)
    official = score_dbtex(tables)
    reference = score_dbtex(counting_volumes(tables, "boxes-table"))
    assert official["sensitivity_at_2_fps_all"] == pytest.approx(0.8)
    assert reference["sensitivity_at_2_fps_all"] == pytest.approx(0.4)
    assert reference["mean_sensitivity_positive"] == official["mean_sensitivity_positive"]
    assert counting_volumes(tables, "labels") is tables


def test_cli_volumes_option_is_recorded(tmp_path):
    pred, boxes, labels = _write_inputs(tmp_path, GOOD_ROWS)
    for rule in ("labels", "boxes-table"):
        out = tmp_path / rule
        assert _run_cli(["evaluate", "--predictions", str(pred), "--boxes", str(boxes), "--labels", str(labels),
                         "--out", str(out), "--bootstrap", "0", "--volumes", rule]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["volumes_counted"] == rule
        assert metrics["counts"]["volumes"] == (3 if rule == "labels" else 2)
    assert _run_cli(["evaluate", "--predictions", str(pred), "--boxes", str(boxes), "--labels", str(labels),
                     "--out", str(tmp_path / "x"), "--volumes", "all"]) == 2
