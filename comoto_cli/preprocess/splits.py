"""Patient-level train/val/test split: seeded, independent of the order of CSV rows.

All images of one patient land in one split (a lesion seen in training must not be scored again in test).
Patients are sorted, then a seeded permutation picks the held-out ones, so the same inputs and seed give the
same split whatever order the CSVs list them in. A dataset's own split (VinDr-Mammo's ``split`` column: only
``training`` / ``test``; BCS-DBT's train / validation / test CSVs) wins when ``respect_dataset_split`` is set; the
splits it does not provide are carved out of its remaining (training) patients, so a dataset that provides all
three is kept as it is.

It also names the split a CSV stands for: :func:`split_of_file_name` (``BCS-DBT-labels-validation-v2.csv`` ->
``val``) and :func:`split_csvs`, the normal form of the BCS-DBT CSV inputs (one path, or one path per split).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from comoto_cli.config import SplitConfig

SPLITS = ("train", "val", "test")

_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}


def normalize_split(value: str | None) -> str | None:
    """A dataset's split name (``training``, ``validation``, ``test`` ...) as one of :data:`SPLITS`, or None."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if not text:
        return None
    return _ALIASES.get(text)


def _held_out_count(fraction: float, total: int) -> int:
    if fraction <= 0.0:
        return 0
    count = int(math.floor(fraction * total + 0.5))
    # With at least 3 patients every asked-for split gets one: an empty val split breaks model selection.
    return max(count, 1) if total >= 3 else count


def _carve(pool: list[str], total: int, fractions: Mapping[str, float], provided: set[str],
           rng: np.random.Generator, assigned: dict[str, str]) -> None:
    """Assign ``pool`` (patients without a dataset split) to test/val/train in place; fractions are of ``total``
    (all patients of the group, dataset-split ones included); at least one pool patient is kept for train."""
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
    pool: list[str] = []
    for patient in ordered:
        split = given.get(patient)
        if split in ("val", "test"):
            assigned[patient] = split
        else:
            pool.append(patient)  # dataset says train, or nothing: candidates for the carved splits
    fractions = {"test": config.test_fraction, "val": config.val_fraction}
    rng = np.random.default_rng(config.seed)
    if config.stratify and has_lesion is not None:
        for group in (True, False):
            members = [p for p in ordered if bool(has_lesion.get(p, False)) == group]
            _carve([p for p in pool if bool(has_lesion.get(p, False)) == group], len(members), fractions, provided,
                   rng, assigned)
    else:
        _carve(pool, len(ordered), fractions, provided, rng, assigned)
    return assigned


def merge_dataset_split(current: str | None, new: str | None) -> str | None:
    """Combine two images' dataset splits for one patient: the more held-out wins (test > val > train)."""
    rank = {None: -1, "train": 0, "val": 1, "test": 2}
    a, b = normalize_split(current), normalize_split(new)
    return a if rank[a] >= rank[b] else b


# ------------------------------------------------------------------------------------- CSVs tagged by split
_WORD_SEPARATORS = re.compile(r"[-_.\s]+")
_TAG = re.compile(r"^([\w-]+)=(.*)$", re.S)  # 'validation=path/to.csv'; a '/' before '=' makes it a plain path


def split_of_file_name(name: str) -> str | None:
    """The split a file name carries as a word between separators (``-``, ``_``, ``.``, blanks), as one of
    :data:`SPLITS`: ``BCS-DBT-file-paths-validation-v2.csv`` -> ``val``, ``labels_test.csv`` -> ``test``. None
    when the name carries no split word, or words of different splits."""
    stem = name[:-4] if name.lower().endswith(".csv") else name
    found = {normalize_split(word) for word in _WORD_SEPARATORS.split(stem)} - {None}
    return found.pop() if len(found) == 1 else None


def release_name(split: str | None) -> str:
    """A split as the BCS-DBT release names it: ``val`` -> ``validation``."""
    return "validation" if split == "val" else str(split)


def _tagged(item: object) -> tuple[str | None, Path]:
    """``'SPLIT=PATH'`` -> (split, path); a plain path -> (None, path). ValueError for an unknown split."""
    if isinstance(item, Path):
        return None, item
    if not isinstance(item, str):
        raise ValueError(f"expected a path or SPLIT=PATH, got {item!r}")
    text = item.strip()
    match = _TAG.match(text)
    if match is None:
        if not text:
            raise ValueError("empty path")
        return None, Path(text)
    split = normalize_split(match.group(1))
    if split is None:
        raise ValueError(f"unknown split {match.group(1)!r} in {item!r}; use train, validation or test")
    if not match.group(2).strip():
        raise ValueError(f"no path after {match.group(1)}= in {item!r}")
    return split, Path(match.group(2).strip())


def split_csvs(value: object) -> Path | dict[str, Path] | None:
    """The normal form of a BCS-DBT CSV input (file paths, labels or boxes): None (find it in ROOT); one path
    (no split of its own, as before splits existed); or ``{split: path}`` in :data:`SPLITS` order, one CSV per
    split (the dataset's own train / validation / test files).

    Accepts a path; ``'SPLIT=PATH'`` (SPLIT: train, validation, test or an alias such as val, training); a list
    of those (the command line's repeated flag; a lone plain path keeps its plain meaning, while with several
    each plain path takes the split its file name carries); or a mapping ``{SPLIT: PATH}``. Raises ValueError
    with a one-line reason (unknown split, two CSVs for one split, a plain path whose name has no split)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        items = []
        for key, path in value.items():
            split = normalize_split(key) if isinstance(key, str) else None
            if split is None:
                raise ValueError(f"unknown split {key!r}; use train, validation or test")
            if not isinstance(path, (str, Path)) or not str(path).strip():
                raise ValueError(f"the {key} CSV must be a path, got {path!r}")
            items.append((split, Path(str(path).strip())))
    elif isinstance(value, (list, tuple)):
        items = [_tagged(item) for item in value]
        if not items:
            return None
        if len(items) == 1 and items[0][0] is None:
            return items[0][1]
        for index, (split, path) in enumerate(items):
            if split is None:
                split = split_of_file_name(path.name)
                if split is None:
                    raise ValueError(f"several CSVs given: write each as SPLIT=PATH (train, validation, test); "
                                     f"the name of {str(path)!r} carries no split")
                items[index] = (split, path)
    else:
        split, path = _tagged(value)
        if split is None:
            return path
        items = [(split, path)]
    chosen: dict[str, Path] = {}
    for split, path in items:
        if split in chosen:
            raise ValueError(f"two CSVs for the {release_name(split)} split: {str(chosen[split])!r} and "
                             f"{str(path)!r}")
        chosen[split] = path
    return {split: chosen[split] for split in SPLITS if split in chosen}
