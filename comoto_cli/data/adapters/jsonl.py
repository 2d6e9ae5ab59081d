"""A JSON-lines manifest of mammograms: one JSON object per line, one line per image, its boxes inline.

    {"path": "images/a.dcm", "patient_id": "P1", "view": "lcc", "split": "train",
     "boxes": [{"xmin": 10, "ymin": 20, "xmax": 40, "ymax": 60, "class": "mass"}]}

``path`` (relative to ROOT) and ``patient_id`` are required; ``study_uid`` defaults to the patient, ``view`` (lcc,
lmlo, rcc, rmlo), ``split`` (train, val, test or a spelling such as validation) and ``boxes`` (pixels of the stored
image) may be left out: an image without boxes is a normal one. Blank lines are ignored; errors name the line.
Unknown keys are errors, so a misspelled ``boxes`` cannot silently drop lesions.

``comoto preprocess mammo ROOT --dataset jsonl [--input manifest=FILE]``; without ``--input`` the one ``*.jsonl``
file under ROOT is read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import ClassVar

from comoto_cli.config import PreprocessConfig
from comoto_cli.data.adapters.base import ImageAdapter, register
from comoto_cli.data.dicom_io import MAX_SIDE
from comoto_cli.data.sources import BadRow, ImageRecord, LesionBox, Skipped, mammo_records, report, row_error
from comoto_cli.data.tables import DBT_VIEWS
from comoto_cli.errors import InputDataError
from comoto_cli.utils.split_names import normalize_split

IMAGE_KEYS = ("path", "patient_id", "study_uid", "view", "split", "boxes")
BOX_KEYS = ("xmin", "ymin", "xmax", "ymax", "class")


@register
class JsonLines(ImageAdapter):
    """Mammograms listed in a JSON-lines file."""

    name: ClassVar[str] = "jsonl"
    input_names: ClassVar[tuple[str, ...]] = ("manifest",)

    def discover(self, root: Path, config: PreprocessConfig, skipped: Skipped | None) -> list[ImageRecord]:
        manifest = config.inputs.get("manifest") or _find_manifest(Path(root))
        return read_jsonl(root, Path(manifest), skipped=skipped)


def _find_manifest(root: Path) -> Path:
    found: list[Path] = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))  # as the CSV finders: hidden is not data
        found += [Path(folder) / name for name in sorted(files) if name.lower().endswith(".jsonl")]
    if len(found) != 1:
        what = "no *.jsonl file" if not found else f"several *.jsonl files ({', '.join(map(str, found))})"
        raise InputDataError(f"{what} under it; choose one with --input manifest=FILE", path=root)
    return found[0]


def read_jsonl(root: Path, manifest: Path, *, skipped: Skipped | None = None) -> list[ImageRecord]:
    """One record per line; a bad line (or a path on two lines: which one is right is not known) leaves its
    image out, raising InputDataError naming file and line or listing it in ``skipped``."""
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputDataError(f"cannot read the JSON-lines manifest ({exc})", path=manifest) from None
    entries: dict[str, dict] = {}
    bad: set[str] = set()
    for row, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        source = None
        try:
            item = _object(line)
            source = _text(item, "path", required=True)
            if source in entries or source in bad:
                other = entries[source]["row"] if source in entries else None
                raise BadRow(f"{source} is listed twice" + (f" (also on line {other})" if other else ""))
            entries[source] = _entry(item, manifest, row)
        except BadRow as exc:
            report(skipped, row_error(str(exc), manifest, row), manifest, row)
            if source is not None:
                entries.pop(source, None)
                bad.add(source)
    return mammo_records(Path(root), manifest, list(entries.items()), skipped)


def _object(line: str) -> dict:
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise BadRow(f"not a JSON object: {exc}") from None
    if not isinstance(item, dict):
        raise BadRow(f"not a JSON object but {type(item).__name__}")
    return item


def _entry(item: dict, manifest: Path, row: int) -> dict:
    """The image of one line: patient, study, view, split, row and boxes."""
    _known_keys(item, IMAGE_KEYS, "line")
    patient = _text(item, "patient_id", required=True)
    view = _text(item, "view").lower()
    if view and view not in DBT_VIEWS:
        raise BadRow(f"view {item['view']!r} is not one of {', '.join(DBT_VIEWS)} (or empty)")
    split = _text(item, "split")
    if split and normalize_split(split) is None:
        raise BadRow(f"split {split!r} is not one of train, val, test (or empty)")
    boxes = item.get("boxes") or []
    if not isinstance(boxes, list):
        raise BadRow("boxes is not a list")
    return {"patient": patient, "study": _text(item, "study_uid") or patient, "view": view,
            "split": normalize_split(split), "row": row, "boxes": [_box(box, manifest, row) for box in boxes]}


def _box(box: object, manifest: Path, row: int) -> LesionBox:
    if not isinstance(box, dict):
        raise BadRow(f"a box is not a JSON object: {box!r}")
    _known_keys(box, BOX_KEYS, "box")
    xmin, ymin, xmax, ymax = (_coordinate(box, key) for key in BOX_KEYS[:4])
    if xmin >= xmax or ymin >= ymax:
        raise BadRow(f"box is empty or inverted: xmin {xmin:g}, xmax {xmax:g}, ymin {ymin:g}, ymax {ymax:g}")
    return LesionBox(slice=0, x=xmin, y=ymin, width=xmax - xmin, height=ymax - ymin,
                     cls=_text(box, "class") or "lesion", csv=manifest, row=row)


def _coordinate(box: dict, key: str) -> float:
    value = box.get(key)
    # bool is an int to Python, but `true` is no pixel coordinate.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRow(f"box {key} is not a number: {value!r}")
    if not math.isfinite(value) or not 0 <= value <= MAX_SIDE:
        raise BadRow(f"box {key} is out of range: {value!r} (0 to {MAX_SIDE})")
    return float(value)


def _text(item: dict, key: str, *, required: bool = False) -> str:
    value = item.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise BadRow(f"{key} is missing or empty")
        return ""
    if not isinstance(value, str):
        raise BadRow(f"{key} is not a string: {value!r}")
    return value.strip()


def _known_keys(item: dict, known: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(item) - set(known))
    if unknown:
        raise BadRow(f"unknown key(s) {', '.join(map(repr, unknown))} on a {what} (known: {', '.join(known)})")
