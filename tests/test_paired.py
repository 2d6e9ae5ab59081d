"""Paired comparison of two methods on one test set: seed-paired differences with a patient bootstrap whose every
resample scores both methods on the same patients."""

from __future__ import annotations

import numpy as np
import pytest

from comoto_cli.data.tables import dbtex_boxes, dbtex_labels
from comoto_cli.errors import InputDataError
from comoto_cli.metrics.dbtex import DbtexTables, bootstrap_mean_sensitivity, paired_difference, score_dbtex

PATIENTS = 40


def _tables(found: np.ndarray, rng, false_positives: int = 2) -> DbtexTables:
    """One view per patient, one 50-pixel lesion each; a hit (random score) on the lesions ``found``; a few false
    positives per view."""
    ids = [f"P{i:02d}" for i in range(PATIENTS)]
    studies = [f"S{i:02d}" for i in range(PATIENTS)]
    boxes = dbtex_boxes(ids, studies, ["lcc"] * PATIENTS, [500] * PATIENTS, [500] * PATIENTS, [50] * PATIENTS,
                        [50] * PATIENTS, [20] * PATIENTS, [40] * PATIENTS)
    labels = dbtex_labels(ids, studies, ["lcc"] * PATIENTS)
    rows = []
    for i in range(PATIENTS):
        if found[i]:
            rows.append((ids[i], studies[i], 500.0, 500.0, 20.0, rng.uniform(0.3, 1.0)))
        rows += [(ids[i], studies[i], 1500.0, 1500.0, 20.0, rng.uniform(0.0, 0.6)) for _ in range(false_positives)]
    columns = list(zip(*rows))
    predictions = {"PatientID": np.array(columns[0]), "StudyUID": np.array(columns[1]), "View": np.array(["lcc"] * len(rows)),
                   "X": np.array(columns[2]), "Width": np.full(len(rows), 50.0), "Y": np.array(columns[3]),
                   "Height": np.full(len(rows), 50.0), "Z": np.array(columns[4]), "Depth": np.zeros(len(rows)),
                   "Score": np.array(columns[5])}
    return DbtexTables(predictions=predictions, boxes=boxes, labels=labels)


def test_identical_methods_differ_by_exactly_zero_in_every_resample():
    rng = np.random.default_rng(0)
    runs = [_tables(rng.random(PATIENTS) < 0.6, rng) for _ in range(3)]
    result = paired_difference(runs, runs, n=100, seed=0)
    # Only a resample shared by both methods gives 0 every time; independent draws would scatter around 0.
    assert result.mean == 0 and result.low == 0 and result.high == 0 and not result.resolved
    assert result.resamples == 100 and result.per_seed == (0.0, 0.0, 0.0)


def test_a_better_method_is_resolved_and_pairing_narrows_the_interval():
    rng = np.random.default_rng(1)
    shared = rng.random((3, PATIENTS)) < 0.5
    extra = rng.random((3, PATIENTS)) < 0.4  # A also finds some lesions B misses, on the same hard/easy patients
    runs_b = [_tables(shared[s], np.random.default_rng(10 + s)) for s in range(3)]
    runs_a = [_tables(shared[s] | extra[s], np.random.default_rng(10 + s)) for s in range(3)]
    result = paired_difference(runs_a, runs_b, n=300, seed=0)
    expected = np.mean([score_dbtex(a)["mean_sensitivity_positive"] - score_dbtex(b)["mean_sensitivity_positive"]
                        for a, b in zip(runs_a, runs_b)])
    assert result.mean == pytest.approx(expected, abs=1e-12)
    assert result.mean > 0.1 and result.resolved and result.low <= result.mean <= result.high
    # The marginal intervals of one run of each overlap far more than the paired interval is wide.
    low_a, high_a = bootstrap_mean_sensitivity(runs_a[0], 300, 0)
    low_b, high_b = bootstrap_mean_sensitivity(runs_b[0], 300, 0)
    single = paired_difference(runs_a[:1], runs_b[:1], n=300, seed=0)
    assert single.half_width < ((high_a - low_a) + (high_b - low_b)) / 4


def test_runs_on_different_patients_cannot_be_paired():
    rng = np.random.default_rng(2)
    a = _tables(np.ones(PATIENTS, bool), rng)
    b = _tables(np.ones(PATIENTS, bool), rng)
    b.labels["PatientID"] = np.char.add(b.labels["PatientID"], "x")
    with pytest.raises(InputDataError, match="different test patients or lesions"):
        paired_difference([a], [b], n=10, seed=0)
    with pytest.raises(ValueError, match="differ in number"):
        paired_difference([a, a], [a], n=10, seed=0)


def test_the_two_level_interval_holds_the_seeds_spread():
    """Seeds that disagree (A far better on one seed, worse on another) widen the seeds x patients interval past the
    patient-only one; with one seed the two are the same draws."""
    rng = np.random.default_rng(2)
    shared = rng.random((3, PATIENTS)) < 0.5
    runs_b = [_tables(shared[s], np.random.default_rng(20 + s)) for s in range(3)]
    found_a = [shared[0] | (rng.random(PATIENTS) < 0.6), shared[1] & (rng.random(PATIENTS) < 0.6), shared[2]]
    runs_a = [_tables(found_a[s], np.random.default_rng(20 + s)) for s in range(3)]
    result = paired_difference(runs_a, runs_b, n=300, seed=0)
    assert result.two_level_half_width > 1.5 * result.half_width
    assert result.two_level_low <= result.mean <= result.two_level_high
    assert min(result.per_seed) < 0 < max(result.per_seed)
    single = paired_difference(runs_a[:1], runs_b[:1], n=200, seed=0)
    assert (single.two_level_low, single.two_level_high) == (single.low, single.high)
    # The seed draws have their own stream: the patient-only interval is that of a bootstrap without them.
    again = paired_difference(runs_a, runs_b, n=300, seed=0)
    assert (again.low, again.high, again.two_level_low) == (result.low, result.high, result.two_level_low)
