"""The generic mammography manifest: one CSV row per box, ``path, patient_id, xmin, ymin, xmax, ymax`` (+ optional
``study_uid``, ``view``, ``split``, ``class``), given with ``--manifest-csv``."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from comoto_cli.config import PreprocessConfig
from comoto_cli.data.adapters.base import ImageAdapter, register
from comoto_cli.data.sources import (
    BadRow,
    ImageRecord,
    Skipped,
    mammo_box,
    mammo_records,
    report,
    row_error,
    training_or_test,
    xyxy_box,
)
from comoto_cli.data.tables import DBT_VIEWS, MANIFEST_COLUMNS, MANIFEST_OPTIONAL
from comoto_cli.errors import UsageError
from comoto_cli.utils.csvio import CsvTable, read_csv


@register
class Manifest(ImageAdapter):
    """A manifest CSV (the default for ``comoto preprocess mammo --manifest-csv``)."""

    name: ClassVar[str] = "manifest"
    config_fields: ClassVar[tuple[str, ...]] = ("manifest_csv",)

    def discover(self, root: Path, config: PreprocessConfig, skipped: Skipped | None) -> list[ImageRecord]:
        if config.manifest_csv is None:
            raise UsageError("dataset 'manifest' needs the manifest CSV: pass it with --manifest-csv")
        return read_manifest(root, config.manifest_csv, skipped=skipped)


def read_manifest(root: Path, manifest_csv: Path, *, skipped: Skipped | None = None) -> list[ImageRecord]:
    """Generic mammography manifest: ``path, patient_id, xmin, ymin, xmax, ymax`` (+ optional ``study_uid``,
    ``view``, ``split``, ``class``). Several rows per path = several boxes; a row with an empty box = no lesion.
    Paths are relative to ``root``; ``study_uid`` defaults to the patient id."""
    root = Path(root)
    table = read_csv(manifest_csv, MANIFEST_COLUMNS, optional=MANIFEST_OPTIONAL)
    csv = table.path
    order: list[str] = []
    images: dict[str, dict] = {}
    bad: set[str] = set()  # paths with a bad row: their other rows are ignored, they are left out
    for index, row in enumerate(table.rows):
        source = _cell(table, "path", index)
        try:
            if not source:
                raise BadRow("column 'path' is empty")
            image = _image_of(table, index)
            box = xyxy_box(table, index, ("xmin", "ymin", "xmax", "ymax"))
            entry = images.get(source)
            if entry is None:
                if source in bad:
                    continue
                entry = {**image, "row": row, "boxes": []}
                images[source] = entry
                order.append(source)
            elif tuple(entry[k] for k in image) != tuple(image.values()):
                raise BadRow(
                    f"{source} has patient/study/view/split {'/'.join(str(v) for v in image.values())} here but "
                    f"{'/'.join(str(entry[k]) for k in image)} in row {entry['row']}"
                )
            if box is not None:
                entry["boxes"].append(mammo_box(box, _cell(table, "class", index) or "lesion", csv, row))
        except BadRow as exc:
            report(skipped, row_error(str(exc), csv, row), csv, row)
            if source:
                images.pop(source, None)
                bad.add(source)
    entries = [(source, images[source]) for source in order if source in images]
    return mammo_records(root, csv, entries, skipped)


def _cell(table: CsvTable, name: str, index: int) -> str:
    return table.columns[name][index].strip() if name in table.columns else ""


def _image_of(table: CsvTable, index: int) -> dict:
    """{patient, study, view, split} of a manifest row (study defaults to the patient, view may be empty)."""
    patient = _cell(table, "patient_id", index)
    if not patient:
        raise BadRow("column 'patient_id' is empty")
    view = _cell(table, "view", index).lower()
    if view and view not in DBT_VIEWS:
        raise BadRow(f"view {_cell(table, 'view', index)!r} is not one of {', '.join(DBT_VIEWS)} (or empty)")
    return {"patient": patient, "study": _cell(table, "study_uid", index) or patient, "view": view,
            "split": training_or_test(_cell(table, "split", index))}
