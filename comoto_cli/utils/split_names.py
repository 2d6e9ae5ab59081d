"""Split names: ``train`` / ``val`` / ``test``, the dataset spellings of them, and the split a CSV stands for.

:func:`split_of_file_name` reads the split from a file name (``BCS-DBT-labels-validation-v2.csv`` -> ``val``);
:func:`split_csvs` is the normal form of the BCS-DBT CSV inputs (one path, or one path per split). Both the config
models and the dataset readers use these, so they sit below both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

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
