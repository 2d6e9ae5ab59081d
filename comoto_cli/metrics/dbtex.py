"""The DBTex challenge metric (FROC sensitivity at fixed false positives per volume), vectorised in numpy.

Same numbers as the official scorer (``evaluate`` in ``duke_dbt_data.py`` of mazurowski-lab/duke-dbt-data,
commit 13f26fb), which loops over predictions in pandas. Our matching builds every (prediction, GT box of the
same view) pair at once; the FROC walk counts with sorted arrays and ``searchsorted``.

Terms. A *volume* is one DBT view, keyed by (StudyUID, View) -- the official scorer ignores PatientID for
matching. A prediction *hits* a GT box (is a true positive candidate); a hit box is a *found lesion*.

Semantics verified against the official code (every subtle choice is reproduced):

- Prediction centre = (X + Width/2, Y + Height/2, Z + Depth/2); GT centre = (X + Width/2, Y + Height/2, Slice).
- Hit: in-plane centre distance ``sqrt(dx^2 + dy^2) <= max(sqrt(W^2 + H^2) / 2, 100)`` (W, H of the GT box)
  and ``|dz| <= VolumeSlices / 4``. Both comparisons are inclusive. VolumeSlices is taken from the FIRST box
  row of that view in file order (the official sorts by (StudyUID, View) with a stable lexsort, then takes
  ``.iloc[0]``), even if later rows of the view disagree.
- Several GT boxes hit: the prediction goes to the nearest by 3-D centre distance (z in slices, unscaled); an
  exact tie goes to the box that comes first in file order within the view (``np.argmin`` takes the first).
- Thresholds: ``[max score + 1] + [score of every hitting prediction] + [min score - 1]``, max/min over ALL
  predictions (including ones on volumes absent from the labels), sorted descending WITHOUT removing
  duplicates: tied scores give repeated, identical FROC points (harmless for ``numpy.interp``, reproduced
  anyway). The same thresholds serve both the 'all' and the 'positive' pass.
- At a threshold t: TP = distinct GT boxes (box rows) hit by a prediction with score >= t, divided by the
  number of box ROWS in the boxes file (in both passes, including boxes of volumes absent from the labels);
  FP = predictions with score >= t that hit nothing, divided by the number of volumes. A further hit on an
  already found lesion is neither TP nor FP.
- The walk stops after the first threshold whose FP rate exceeds the largest requested rate: 2 for the 'all'
  pass (it asks only for 2 FP/volume), 4 for the 'positive' pass. Sensitivity at F =
  ``numpy.interp(F, fps, tprs)``, called once per F as the official does; mean = ``numpy.mean`` of the four.
- 'all' pass: every prediction in the predictions file (predictions on volumes missing from the labels file
  DO count as false positives), volumes = number of ROWS of the labels file.
- 'positive' pass: predictions whose (StudyUID, View) has at least one box; volumes = number of labels ROWS
  whose (StudyUID, View) has a box (a volume with boxes but no labels row adds boxes and predictions but no
  volume; a duplicated labels row counts twice).
- No predictions at all: every sensitivity is 0 (the official's NaN thresholds select nothing).
- Zero GT boxes or zero (positive) volumes make the official divide by zero; we raise InputDataError instead.

Known, deliberate differences: CSV cells are compared as stripped text (pandas would parse an all-digit UID
as a number, so '0123' and '123' would be equal there); distances use ``sqrt(dx*dx + dy*dy)`` while the
official uses ``np.linalg.norm`` (BLAS dot), which can differ in the last bit -- only a prediction lying within
one rounding error of a hit boundary could be judged differently (integer and half-integer coordinates are
exact in both).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from comoto_cli.data.tables import dbtex_labels, read_dbtex_boxes, read_dbtex_labels, read_dbtex_predictions
from comoto_cli.errors import InputDataError

#: The official in-plane distance floor in pixels (``min_dist`` of ``_is_tp``).
MIN_HIT_DISTANCE = 100.0
ALL_FPS = (2.0,)
POSITIVE_FPS = (1.0, 2.0, 3.0, 4.0)
METRIC_KEYS = (
    "sensitivity_at_2_fps_all",
    "sensitivity_at_1_fps_positive",
    "sensitivity_at_2_fps_positive",
    "sensitivity_at_3_fps_positive",
    "sensitivity_at_4_fps_positive",
    "mean_sensitivity_positive",
)
_KEY_SEPARATOR = "\x1f"  # ASCII unit separator: cannot occur in a UID or a view name


@dataclass
class DbtexTables:
    """The three DBTex tables as numpy column arrays (text columns are ``str`` arrays, numbers float64).

    Their columns are defined in :mod:`comoto_cli.data.tables` (``DBTEX_COLUMNS``, ``DBTEX_BOX_COLUMNS``,
    ``DBTEX_LABEL_COLUMNS``), which also reads them from CSV files and builds them from arrays.
    """

    predictions: dict[str, np.ndarray]
    boxes: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    sources: dict[str, str] = field(default_factory=dict)  # table name -> file, for messages


# ---------------------------------------------------------------------------------------------- reading
def read_dbtex_csvs(predictions_csv: str | Path, boxes_csv: str | Path, labels_csv: str | Path) -> DbtexTables:
    """Read a DBTex submission, the GT boxes and the volume labels; errors name the file and row."""
    return DbtexTables(
        predictions=read_dbtex_predictions(predictions_csv),
        boxes=read_dbtex_boxes(boxes_csv),
        labels=read_dbtex_labels(labels_csv),
        sources={"predictions": str(predictions_csv), "boxes": str(boxes_csv), "labels": str(labels_csv)},
    )


def counting_volumes(tables: DbtexTables, rule: str) -> DbtexTables:
    """``tables`` with the labels table that ``rule`` counts volumes by: ``labels``, as given (the official DBTex
    definition); ``boxes-table``, one labels row per row of the boxes table, as the reference implementation scores
    (it passes its boxes table as the labels file): a volume with k boxes counts k times in both passes, and volumes
    without a lesion are not counted at all."""
    if rule == "labels":
        return tables
    if rule != "boxes-table":
        raise ValueError(f"unknown volume counting rule {rule!r}")
    boxes = tables.boxes
    labels = dbtex_labels(boxes["PatientID"], boxes["StudyUID"], boxes["View"])
    return DbtexTables(predictions=tables.predictions, boxes=boxes, labels=labels,
                       sources={**tables.sources, "labels": tables.sources.get("boxes", "the boxes table")})


# ---------------------------------------------------------------------------------------------- matching
@dataclass(frozen=True)
class _Matched:
    """Each prediction's hit (row of the boxes table, or -1) and the volume bookkeeping both passes need."""

    pred_score: np.ndarray  # (P,)
    pred_gt: np.ndarray  # (P,) box row hit, -1 = false positive
    pred_volume: np.ndarray  # (P,) volume code
    box_volume: np.ndarray  # (B,)
    label_volume: np.ndarray  # (R,)
    volume_has_boxes: np.ndarray  # (V,) bool
    volume_patient: np.ndarray  # (V,) patient code, for the bootstrap
    patients: np.ndarray  # (n_patients,) PatientID of each code

    @property
    def n_patients(self) -> int:
        return len(self.patients)

    @property
    def pred_positive(self) -> np.ndarray:
        return self.volume_has_boxes[self.pred_volume]

    @property
    def label_positive(self) -> np.ndarray:
        return self.volume_has_boxes[self.label_volume]


def _volume_codes(tables: DbtexTables) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    parts = (tables.predictions, tables.boxes, tables.labels)
    keys = [np.char.add(np.char.add(t["StudyUID"].astype(str), _KEY_SEPARATOR), t["View"].astype(str)) for t in parts]
    sizes = [len(k) for k in keys]
    _, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    inverse = inverse.reshape(-1)
    n_volumes = int(inverse.max()) + 1 if inverse.size else 0
    # Patient of a volume: the labels file's PatientID wins, then the boxes', then the predictions'.
    patients = np.concatenate([t["PatientID"].astype(str) for t in parts])
    patient_names, patient_codes = np.unique(patients, return_inverse=True)
    patient_codes = patient_codes.reshape(-1)
    volume_patient = np.full(n_volumes, -1, dtype=np.int64)
    for start, stop in reversed(list(zip(np.cumsum([0] + sizes[:-1]), np.cumsum(sizes)))):
        volume_patient[inverse[start:stop]] = patient_codes[start:stop]  # later writes (earlier tables) win
    p, b = sizes[0], sizes[1]
    return inverse[:p], inverse[p : p + b], inverse[p + b :], volume_patient, patient_names


def _match(tables: DbtexTables) -> _Matched:
    pred, box = tables.predictions, tables.boxes
    pred_volume, box_volume, label_volume, volume_patient, patients = _volume_codes(tables)
    n_volumes = len(volume_patient)
    n_pred = len(pred_volume)

    # Boxes grouped by volume, keeping file order inside a volume (stable sort, as the official's lexsort).
    box_order = np.argsort(box_volume, kind="stable")
    sorted_volume = box_volume[box_order]
    codes = np.arange(n_volumes)
    starts = np.searchsorted(sorted_volume, codes, side="left")
    ends = np.searchsorted(sorted_volume, codes, side="right")
    volume_has_boxes = ends > starts
    # The z tolerance of a volume comes from its FIRST box row (the official's ``.iloc[0]``).
    slice_offset = np.zeros(n_volumes)
    slice_offset[volume_has_boxes] = box["VolumeSlices"][box_order[starts[volume_has_boxes]]] / 4

    # Every (prediction, box of the same volume) pair.
    counts = (ends - starts)[pred_volume]
    pair_pred = np.repeat(np.arange(n_pred), counts)
    rank_in_volume = np.arange(pair_pred.size) - np.repeat(np.cumsum(counts) - counts, counts)
    pair_box = box_order[starts[pred_volume][pair_pred] + rank_in_volume]

    pred_x = pred["X"] + pred["Width"] / 2
    pred_y = pred["Y"] + pred["Height"] / 2
    pred_z = pred["Z"] + pred["Depth"] / 2
    box_x = box["X"] + box["Width"] / 2
    box_y = box["Y"] + box["Height"] / 2
    box_z = box["Slice"]
    radius = np.maximum(np.sqrt(box["Width"] * box["Width"] + box["Height"] * box["Height"]) / 2.0, MIN_HIT_DISTANCE)

    dx = pred_x[pair_pred] - box_x[pair_box]
    dy = pred_y[pair_pred] - box_y[pair_box]
    dz = pred_z[pair_pred] - box_z[pair_box]
    in_plane = dx * dx + dy * dy
    hit = (np.sqrt(in_plane) <= radius[pair_box]) & (np.abs(dz) <= slice_offset[pred_volume[pair_pred]])

    pred_gt = np.full(n_pred, -1, dtype=np.int64)
    if np.any(hit):
        h_pred, h_box, h_rank = pair_pred[hit], pair_box[hit], rank_in_volume[hit]
        distance = np.sqrt(in_plane[hit] + dz[hit] * dz[hit])
        # Nearest GT by 3-D distance; exact ties -> first box of the view in file order.
        order = np.lexsort((h_rank, distance, h_pred))
        first = np.ones(order.size, dtype=bool)
        first[1:] = h_pred[order][1:] != h_pred[order][:-1]
        chosen = order[first]
        pred_gt[h_pred[chosen]] = h_box[chosen]

    return _Matched(
        pred_score=np.asarray(pred["Score"], dtype=np.float64),
        pred_gt=pred_gt,
        pred_volume=pred_volume,
        box_volume=box_volume,
        label_volume=label_volume,
        volume_has_boxes=volume_has_boxes,
        volume_patient=volume_patient,
        patients=patients,
    )


# ---------------------------------------------------------------------------------------------- FROC walk
def official_thresholds(scores: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """``[max + 1] + hitting scores + [min - 1]`` sorted descending, duplicates kept (as the official)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return np.array([np.nan, np.nan])  # the official's max()/min() of nothing: selects no prediction
    thresholds = np.concatenate(([scores.max() + 1.0], scores[hit], [scores.min() - 1.0]))
    return np.sort(thresholds)[::-1]


def _weighted_count_at_least(values: np.ndarray, weights: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold t: sum of ``weights`` over ``values >= t`` (exact integer arithmetic)."""
    order = np.argsort(values, kind="stable")
    cumulative = np.concatenate(([0], np.cumsum(weights[order], dtype=np.int64)))
    position = np.searchsorted(values[order], thresholds, side="left")
    return cumulative[-1] - cumulative[position]


def froc_walk(
    pred_score: np.ndarray,
    pred_gt: np.ndarray,
    n_gt: int,
    n_volumes: int,
    thresholds: np.ndarray,
    max_fps: float,
    *,
    pred_weight: np.ndarray | None = None,
    gt_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FROC points (fps per volume, sensitivity) at descending ``thresholds``, stopping after the first point
    whose FP rate exceeds ``max_fps``.

    ``pred_gt[i]`` is the GT index (0..n_gt-1) prediction i hits, or -1. TP at t = GT indices hit by a
    prediction scoring >= t (each lesion once); FP at t = non-hitting predictions scoring >= t. Optional
    integer weights count a prediction / GT several times (bootstrap copies) or not at all (weight 0).
    ``n_gt`` and ``n_volumes`` are the (already weighted) denominators.
    """
    pred_score = np.asarray(pred_score, dtype=np.float64)
    pred_gt = np.asarray(pred_gt, dtype=np.int64)
    if pred_weight is None:
        pred_weight = np.ones(pred_score.size, dtype=np.int64)
    if gt_weight is None:
        gt_weight = np.ones(max(int(pred_gt.max(initial=-1)) + 1, 0), dtype=np.int64)
    if n_gt <= 0:
        raise InputDataError("no ground-truth boxes: sensitivity is undefined")
    if n_volumes <= 0:
        raise InputDataError("no volumes to count false positives over")
    thresholds = np.asarray(thresholds, dtype=np.float64)

    is_hit = pred_gt >= 0
    false_pos = ~is_hit & (pred_weight > 0)
    n_fp = _weighted_count_at_least(pred_score[false_pos], pred_weight[false_pos], thresholds)

    # A lesion counts from the highest score among the predictions that hit it.
    best = np.full(gt_weight.size, -np.inf)
    counted = is_hit & (pred_weight > 0)
    np.maximum.at(best, pred_gt[counted], pred_score[counted])
    found = np.isfinite(best)
    n_tp = _weighted_count_at_least(best[found], gt_weight[found], thresholds)

    fps = n_fp.astype(np.float64) / n_volumes
    tprs = n_tp.astype(np.float64) / n_gt
    beyond = np.flatnonzero(fps > max_fps)
    if beyond.size:
        fps, tprs = fps[: beyond[0] + 1], tprs[: beyond[0] + 1]
    return fps, tprs


def sensitivities_at(fps: np.ndarray, tprs: np.ndarray, at: tuple[float, ...]) -> list[float]:
    """``numpy.interp`` once per requested FP rate, exactly as the official scorer calls it."""
    return [float(np.interp(x, fps, tprs)) for x in at]


def _passes(
    matched: _Matched,
    *,
    positive_only: bool,
    max_fps: float,
    volume_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One official pass. ``volume_weight`` (V,) multiplies every row of a volume (bootstrap copies)."""
    if volume_weight is None:
        volume_weight = np.ones(matched.volume_has_boxes.size, dtype=np.int64)
    pred_weight = volume_weight[matched.pred_volume]
    thresholds = official_thresholds(
        matched.pred_score[pred_weight > 0], (matched.pred_gt >= 0)[pred_weight > 0]
    )
    label_weight = volume_weight[matched.label_volume]
    if positive_only:
        pred_weight = pred_weight * matched.pred_positive
        label_weight = label_weight * matched.label_positive
    gt_weight = volume_weight[matched.box_volume]
    return froc_walk(
        matched.pred_score,
        matched.pred_gt,
        int(gt_weight.sum()),
        int(label_weight.sum()),
        thresholds,
        max_fps,
        pred_weight=pred_weight,
        gt_weight=gt_weight,
    )


def _check_denominators(tables: DbtexTables, matched: _Matched) -> None:
    boxes_file = tables.sources.get("boxes")
    labels_file = tables.sources.get("labels")
    if matched.box_volume.size == 0:
        raise InputDataError("the boxes table has no boxes: sensitivity is undefined", path=boxes_file)
    if matched.label_volume.size == 0:
        raise InputDataError("the labels table has no volumes", path=labels_file)
    if not np.any(matched.label_positive):
        raise InputDataError(
            "no volume of the labels table has a box (keys are StudyUID + View): the positive subset is empty",
            path=labels_file,
        )


def froc_points(tables: DbtexTables, *, positive_only: bool, max_fps: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """FROC points (fps per volume, sensitivity) in the official walking order (descending threshold)."""
    matched = _match(tables)
    _check_denominators(tables, matched)
    return _passes(matched, positive_only=positive_only, max_fps=max_fps)


def _metrics_from_match(matched: _Matched, volume_weight: np.ndarray | None = None) -> dict[str, float]:
    fps_all, tprs_all = _passes(matched, positive_only=False, max_fps=max(ALL_FPS), volume_weight=volume_weight)
    fps_pos, tprs_pos = _passes(matched, positive_only=True, max_fps=max(POSITIVE_FPS), volume_weight=volume_weight)
    positive = [np.interp(x, fps_pos, tprs_pos) for x in POSITIVE_FPS]
    result = {"sensitivity_at_2_fps_all": sensitivities_at(fps_all, tprs_all, ALL_FPS)[0]}
    for x, y in zip(POSITIVE_FPS, positive):
        result[f"sensitivity_at_{int(x)}_fps_positive"] = float(y)
    result["mean_sensitivity_positive"] = float(np.mean(positive))
    return result


def score_dbtex(tables: DbtexTables) -> dict[str, float]:
    """The six official DBTex numbers (see the module docstring for the exact semantics)."""
    matched = _match(tables)
    _check_denominators(tables, matched)
    return _metrics_from_match(matched)


def dbtex_metrics(predictions: dict[str, np.ndarray],
                  ground_truth: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]) -> dict[str, float]:
    """:func:`score_dbtex` of a predictions table against ``(boxes, labels)`` tables: the student's validation
    metric family (:mod:`comoto_cli.metrics.registry`)."""
    boxes, labels = ground_truth
    return score_dbtex(DbtexTables(predictions=predictions, boxes=boxes, labels=labels))


def dbtex_counts(tables: DbtexTables) -> dict[str, int]:
    """Sizes that explain a score: volumes, positive volumes, boxes, predictions, hits."""
    matched = _match(tables)
    return {
        "volumes": int(matched.label_volume.size),
        "positive_volumes": int(matched.label_positive.sum()),
        "boxes": int(matched.box_volume.size),
        "patients": len(np.unique(tables.labels["PatientID"])),
        "predictions": int(matched.pred_score.size),
        "predictions_on_positive_volumes": int(matched.pred_positive.sum()),
        "predictions_on_unlabelled_volumes": int((~np.isin(matched.pred_volume, matched.label_volume)).sum()),
        "hitting_predictions": int((matched.pred_gt >= 0).sum()),
        "lesions_found": int(np.unique(matched.pred_gt[matched.pred_gt >= 0]).size),
    }


def prediction_hits(tables: DbtexTables) -> np.ndarray:
    """(P,) the row of the boxes table each prediction hits under the official rule, -1 for a false positive."""
    return _match(tables).pred_gt


def operating_threshold(tables: DbtexTables, fps_per_volume: float = 2.0) -> float:
    """The lowest official threshold at which the 'positive' pass makes at most ``fps_per_volume`` false
    positives per volume: a prediction scoring at least this is counted at that operating point (the score
    interpolates between FROC points, so a lesion found just below it still adds a fraction there)."""
    matched = _match(tables)
    _check_denominators(tables, matched)
    thresholds = official_thresholds(matched.pred_score, matched.pred_gt >= 0)
    false_pos = matched.pred_positive & (matched.pred_gt < 0)
    n_fp = _weighted_count_at_least(matched.pred_score[false_pos], np.ones(int(false_pos.sum()), np.int64), thresholds)
    allowed = thresholds[n_fp / int(matched.label_positive.sum()) <= fps_per_volume]
    return float(allowed.min()) if allowed.size and np.isfinite(allowed.min()) else float("inf")


# ---------------------------------------------------------------------------------------------- bootstrap
def bootstrap_mean_sensitivity(
    tables: DbtexTables,
    n: int,
    seed: int,
    *,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, float]:
    """95 % percentile interval of ``mean_sensitivity_positive`` over ``n`` patient-level bootstrap resamples.

    Patients (every PatientID seen in the labels, boxes or predictions; a volume belongs to the patient its
    labels row names, else its boxes', else its predictions') are drawn with replacement, as many as there
    are. A patient drawn k times enters as k independent copies: its volumes, boxes and predictions count k
    times, each copy's lesions found separately (equivalent to renaming the copies' StudyUIDs). Resamples
    without any box or positive volume have no defined sensitivity and are dropped; (nan, nan) if none is
    left or ``n`` is 0. ``progress(i)`` is called after each resample.
    """
    if n <= 0:
        return (float("nan"), float("nan"))
    matched = _match(tables)
    _check_denominators(tables, matched)
    rng = np.random.default_rng(seed)
    values = []
    for index in range(n):
        draw = rng.integers(0, matched.n_patients, size=matched.n_patients)
        multiplicity = np.bincount(draw, minlength=matched.n_patients)
        volume_weight = multiplicity[matched.volume_patient]
        labels_positive = volume_weight[matched.label_volume] * matched.label_positive
        if volume_weight[matched.box_volume].sum() > 0 and labels_positive.sum() > 0:
            values.append(_metrics_from_match(matched, volume_weight)["mean_sensitivity_positive"])
        if progress is not None:
            progress(index + 1)
    if not values:
        return (float("nan"), float("nan"))
    low, high = np.percentile(np.asarray(values), [2.5, 97.5])
    return (float(low), float(high))


# ---------------------------------------------------------------------------------------------- paired comparison
@dataclass(frozen=True)
class PairedDifference:
    """``mean_sensitivity_positive`` of method A minus method B on one test set, paired by seed and by patient."""

    mean: float  # mean over seeds of (A_s - B_s) on the whole test set
    low: float  # 2.5th and 97.5th percentiles of the seed-mean difference over paired patient resamples
    high: float
    per_seed: tuple[float, ...]
    resamples: int  # resamples kept (those with lesions)
    # The two-level bootstrap: each resample also draws the seeds with replacement (the same patient draw), so the
    # interval holds the training randomness as well as the test patients'.
    two_level_low: float = float("nan")
    two_level_high: float = float("nan")

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def resolved(self) -> bool:
        """The interval excludes 0: the sign of the difference is resolved at the 95 % level."""
        return self.low > 0 or self.high < 0

    @property
    def two_level_half_width(self) -> float:
        return (self.two_level_high - self.two_level_low) / 2

    @property
    def two_level_resolved(self) -> bool:
        return self.two_level_low > 0 or self.two_level_high < 0


def _patient_index(matched: list[_Matched]) -> tuple[list[np.ndarray], int]:
    """Each run's patient codes mapped to indices into the union of every run's PatientIDs."""
    names, inverse = np.unique(np.concatenate([m.patients for m in matched]), return_inverse=True)
    sizes = np.cumsum([0] + [m.n_patients for m in matched])
    return [inverse.reshape(-1)[a:b] for a, b in zip(sizes[:-1], sizes[1:])], len(names)


def paired_difference(runs_a: list[DbtexTables], runs_b: list[DbtexTables], n: int, seed: int) -> PairedDifference:
    """A minus B, where ``runs_a[s]`` and ``runs_b[s]`` are the two methods' runs of seed ``s`` scored on the same
    boxes and labels. Each of ``n`` resamples draws the test patients once with replacement (as
    :func:`bootstrap_mean_sensitivity` does) and scores every run of both methods on that same draw, so the
    interval holds the patient variation the two methods share out of their difference. (nan, nan) with ``n`` 0."""
    if not runs_a or len(runs_a) != len(runs_b):
        raise ValueError(f"paired runs differ in number: {len(runs_a)} and {len(runs_b)}")
    keys = {(tuple(np.sort(t.labels["PatientID"].astype(str))),
             tuple(np.sort(np.char.add(t.boxes["StudyUID"].astype(str), t.boxes["View"].astype(str)))))
            for t in (*runs_a, *runs_b)}
    if len(keys) != 1:
        raise InputDataError("paired runs were scored on different test patients or lesions")
    matched = [_match(t) for t in (*runs_a, *runs_b)]
    for tables, match in zip((*runs_a, *runs_b), matched):
        _check_denominators(tables, match)
    full = [_metrics_from_match(m)["mean_sensitivity_positive"] for m in matched]
    per_seed = tuple(float(a - b) for a, b in zip(full[:len(runs_a)], full[len(runs_a):]))
    index, n_patients = _patient_index(matched)
    rng = np.random.default_rng(seed)
    # Its own stream, so the patient draws (and the patient-only interval) are those of a run without it.
    seed_rng = np.random.default_rng([seed, 1])
    seeds = len(runs_a)
    differences, two_level = [], []
    for _ in range(n):
        seed_draw = seed_rng.integers(0, seeds, size=seeds)
        multiplicity = np.bincount(rng.integers(0, n_patients, size=n_patients), minlength=n_patients)
        weights = [multiplicity[codes][m.volume_patient] for codes, m in zip(index, matched)]
        if (weights[0][matched[0].box_volume].sum() == 0
                or (weights[0][matched[0].label_volume] * matched[0].label_positive).sum() == 0):
            continue  # no lesion drawn: sensitivity undefined for every run alike
        values = [_metrics_from_match(m, w)["mean_sensitivity_positive"] for m, w in zip(matched, weights)]
        differences.append(np.mean(values[:seeds]) - np.mean(values[seeds:]))
        seed_differences = np.subtract(values[:seeds], values[seeds:])
        two_level.append(seed_differences[seed_draw].mean())
    nan = (float("nan"), float("nan"))
    low, high = np.percentile(differences, [2.5, 97.5]) if differences else nan
    two_low, two_high = np.percentile(two_level, [2.5, 97.5]) if two_level else nan
    return PairedDifference(mean=float(np.mean(per_seed)), low=float(low), high=float(high), per_seed=per_seed,
                            resamples=len(differences), two_level_low=float(two_low), two_level_high=float(two_high))
