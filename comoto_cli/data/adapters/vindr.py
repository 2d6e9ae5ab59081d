"""VinDr-Mammo: ``images/<study_id>/<image_id>.dicom`` with ``finding_annotations.csv`` (one row per finding)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import ClassVar

from comoto_cli.config import PreprocessConfig
from comoto_cli.data.adapters.base import ImageAdapter, register
from comoto_cli.data.sources import (
    BadRow,
    ImageRecord,
    Skipped,
    find_csv_by_columns,
    mammo_box,
    mammo_records,
    report,
    row_error,
    training_or_test,
    xyxy_box,
)
from comoto_cli.data.tables import DBT_VIEWS, VINDR_REQUIRED_COLUMNS
from comoto_cli.utils.csvio import CsvTable, read_csv

_MAX_LITERAL = 2000  # longest finding_categories cell handed to ast.literal_eval


@register
class VinDr(ImageAdapter):
    """VinDr-Mammo (the default for ``comoto preprocess mammo`` without ``--manifest-csv``)."""

    name: ClassVar[str] = "vindr"
    config_fields: ClassVar[tuple[str, ...]] = ("annotations_csv",)

    def discover(self, root: Path, config: PreprocessConfig, skipped: Skipped | None) -> list[ImageRecord]:
        return discover_vindr(root, annotations_csv=config.annotations_csv, skipped=skipped)


def discover_vindr(
    root: Path, *, annotations_csv: Path | None = None, skipped: Skipped | None = None
) -> list[ImageRecord]:
    """VinDr-Mammo images (``images/<study_id>/<image_id>.dicom``) with their finding boxes.

    One record per image_id, gathering all its finding rows (boxes from rows with coordinates; a row with all
    four coordinates empty is a finding without a box, e.g. 'No Finding'). VinDr has no patient column: a study
    is a patient, so ``patient_id = study_uid = study_id``.
    """
    root = Path(root)
    if annotations_csv is None:
        annotations_csv = find_csv_by_columns(root, VINDR_REQUIRED_COLUMNS, flag="--annotations-csv")
    table = read_csv(annotations_csv, VINDR_REQUIRED_COLUMNS, optional=("split",))
    csv = table.path
    order: list[str] = []
    images: dict[str, dict] = {}
    bad: set[str] = set()  # images with a bad row: their other rows are ignored, they are left out
    for index, row in enumerate(table.rows):
        image_id = table.columns["image_id"][index].strip()
        try:
            if not image_id:
                raise BadRow("column 'image_id' is empty")
            study_id, view, split = _image_of(table, index)
            categories = _categories(table.columns["finding_categories"][index])
            box = xyxy_box(table, index, ("xmin", "ymin", "xmax", "ymax"))
            entry = images.get(image_id)
            if entry is None:
                if image_id in bad:
                    continue
                entry = {"study": study_id, "view": view, "split": split, "row": row, "boxes": []}
                images[image_id] = entry
                order.append(image_id)
            elif (entry["study"], entry["view"], entry["split"]) != (study_id, view, split):
                raise BadRow(
                    f"image {image_id} has study/view/split {study_id}/{view}/{split} here but "
                    f"{entry['study']}/{entry['view']}/{entry['split']} in row {entry['row']}"
                )
            if box is not None:
                entry["boxes"].append(mammo_box(box, ", ".join(categories) or "lesion", csv, row))
        except BadRow as exc:
            report(skipped, row_error(str(exc), csv, row), csv, row)
            if image_id:
                images.pop(image_id, None)
                bad.add(image_id)
    entries = [(f"images/{images[i]['study']}/{i}.dicom", {**images[i], "patient": images[i]["study"]})
               for i in order if i in images]
    return mammo_records(root, csv, entries, skipped)


def _image_of(table: CsvTable, index: int) -> tuple[str, str, str | None]:
    """(study_id, view such as 'lcc', split) of a finding row."""
    study_id = table.columns["study_id"][index].strip()
    if not study_id:
        raise BadRow("column 'study_id' is empty")
    laterality = table.columns["laterality"][index].strip().upper()
    position = table.columns["view_position"][index].strip().lower()
    view = laterality[:1].lower() + position
    if laterality not in ("L", "R") or view not in DBT_VIEWS:
        raise BadRow(
            f"laterality {table.columns['laterality'][index]!r} / view_position "
            f"{table.columns['view_position'][index]!r} is not L/R with CC/MLO"
        )
    split = training_or_test(table.columns["split"][index]) if "split" in table.columns else None
    return study_id, view, split


def _categories(cell: str) -> list[str]:
    text = cell.strip()
    if len(text) > _MAX_LITERAL:
        raise BadRow(f"finding_categories is too long ({len(text)} characters)")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise BadRow(f"finding_categories is not a list literal: {cell!r}") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise BadRow(f"finding_categories is not a list of strings: {cell!r}")
    return [item.strip() for item in value]
