"""Patient-level train/val/test split: seeded, independent of the order of CSV rows.

All images of one patient land in one split (a lesion seen in training must not be scored again in test).
Patients are sorted, then a seeded permutation picks the held-out ones, so the same inputs and seed give the
same split whatever order the CSVs list them in. A dataset's own split (VinDr-Mammo's ``split`` column: only
``training`` / ``test``; BCS-DBT's train / validation / test CSVs) wins when ``respect_dataset_split`` is set; the
splits it does not provide are carved out of its remaining (training) patients, so a dataset that provides all
three is kept as it is.

k-fold cross-validation (``folds`` k > 1): test is carved as above, then the remaining patients, in the seeded
order, are dealt into k folds (the j-th patient dealt goes to fold j mod k), fold ``fold`` being val; with
stratification the lesion patients are dealt first, then the others where they stopped, so the folds differ by one
patient at most and every fold gets lesion patients (fewer lesion patients than folds is refused). The permutation does not
depend on ``fold``, so the k caches of one seed share their test patients and their val splits partition the rest.

Split names and the split a CSV file stands for are in :mod:`comoto_cli.utils.split_names`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from comoto_cli.config import SplitConfig
from comoto_cli.errors import UsageError
from comoto_cli.utils.split_names import normalize_split


def _held_out_count(fraction: float, total: int) -> int:
    if fraction <= 0.0:
        return 0
    count = int(math.floor(fraction * total + 0.5))
    # With at least 3 patients every asked-for split gets one: an empty val split breaks model selection.
    return max(count, 1) if total >= 3 else count


def _carve(pool: list[str], total: int, fractions: Mapping[str, float], provided: set[str],
           rng: np.random.Generator, assigned: dict[str, str], folds: tuple[int, int, list[int]] | None = None,
           group: str = "") -> None:
    """Assign ``pool`` (patients without a dataset split) to test/val/train in place; fractions are of ``total``
    (all patients of the group, dataset-split ones included); at least one pool patient is kept for train.
    ``folds`` (k, i, dealt) with k > 1: after test, the shuffled patients are dealt into k folds, fold i is val;
    ``dealt[0]`` counts the patients dealt so far, so dealing goes on where the previous group stopped."""
    if folds is not None and folds[0] > 1 and "val" not in provided:
        count, fold, dealt = folds
        n_test = 0 if "test" in provided else min(_held_out_count(fractions["test"], total), max(len(pool) - 2, 0))
        shuffled = [pool[i] for i in rng.permutation(len(pool))]
        if group == "lesion" and len(shuffled) - n_test < count:
            raise UsageError(f"split.folds {count}: only {len(shuffled) - n_test} patients with lesions outside the "
                             "test split, so some folds' val splits would have no lesion (the DBTex metric is "
                             "undefined there); use fewer folds")
        for patient in shuffled[:n_test]:
            assigned[patient] = "test"
        for patient in shuffled[n_test:]:
            assigned[patient] = "val" if dealt[0] % count == fold else "train"
            dealt[0] += 1
        return
    wanted = {name: (0 if name in provided else _held_out_count(fraction, total)) for name, fraction in fractions.items()}
    while wanted["test"] + wanted["val"] > max(len(pool) - 1, 0) and (wanted["test"] or wanted["val"]):
        larger = "test" if wanted["test"] >= wanted["val"] else "val"
        wanted[larger] -= 1
    shuffled = [pool[i] for i in rng.permutation(len(pool))]
    n_test, n_val = wanted["test"], wanted["val"]
    for patient in shuffled[:n_test]:
        assigned[patient] = "test"
    for patient in shuffled[n_test:n_test + n_val]:
        assigned[patient] = "val"
    for patient in shuffled[n_test + n_val:]:
        assigned[patient] = "train"


def assign_splits(patients: Iterable[str], config: SplitConfig,
                  dataset_splits: Mapping[str, str | None] | None = None,
                  has_lesion: Mapping[str, bool] | None = None) -> dict[str, str]:
    """Patient id -> "train" | "val" | "test".

    ``dataset_splits`` maps a patient to the split its dataset gives it (None: no opinion). When a patient's
    images disagree, pass the most held-out one (test over val over train): leaking a test image into
    training is worse than losing a training image.
    ``has_lesion`` (with ``config.stratify``): patients with and without lesions are split separately, so val
    and test both get lesion patients (the DBTex metric is undefined on a split without lesions).
    """
    ordered = sorted(set(patients))
    assigned: dict[str, str] = {}
    given: dict[str, str] = {}
    if config.respect_dataset_split and dataset_splits:
        for patient in ordered:
            split = normalize_split(dataset_splits.get(patient))
            if split is not None:
                given[patient] = split
    provided = set(given.values())
    if config.folds > 1 and "val" in provided:
        raise UsageError("split.folds: the dataset brings its own val split; folds would replace it. Keep it, or "
                         "set split.respect_dataset_split false to fold the patients outside its test split")
    pool: list[str] = []
    for patient in ordered:
        split = given.get(patient)
        if split in ("val", "test"):
            assigned[patient] = split
        else:
            pool.append(patient)  # dataset says train, or nothing: candidates for the carved splits
    fractions = {"test": config.test_fraction, "val": config.val_fraction}
    folds = (config.folds, config.fold, [0])
    rng = np.random.default_rng(config.seed)
    if config.stratify and has_lesion is not None:
        for group in (True, False):
            members = [p for p in ordered if bool(has_lesion.get(p, False)) == group]
            _carve([p for p in pool if bool(has_lesion.get(p, False)) == group], len(members), fractions, provided,
                   rng, assigned, folds, "lesion" if group else "normal")
    else:
        _carve(pool, len(ordered), fractions, provided, rng, assigned, folds)
    return assigned


def merge_dataset_split(current: str | None, new: str | None) -> str | None:
    """Combine two images' dataset splits for one patient: the more held-out wins (test > val > train)."""
    rank = {None: -1, "train": 0, "val": 1, "test": 2}
    a, b = normalize_split(current), normalize_split(new)
    return a if rank[a] >= rank[b] else b
