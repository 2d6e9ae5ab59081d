"""OMI-DB (the OPTIMAM Mammography Image Database) as its sync tool lays a copy out:

    ROOT/data/<client>/imagedb_<client>.json     the client's studies, series, images and the readers' marks
    ROOT/data/<client>/nbss_<client>.json        screening and pathology outcomes (not read)
    ROOT/data/<client>/<study>/<image>.json      the image's DICOM header as JSON (some copies: <image>.dcm.json)
    ROOT/images/<client>/<study>/<image>.dcm     the image

A client is one woman (``optm1``, ``demd12``...). In ``imagedb_<client>.json``, ``STUDIES`` maps each study UID to
its series UIDs (beside keys such as ``StudyDate``), each series UID to its image UIDs, and each image UID to its
marks: ``{"<mark>": {"MarkID": .., "X1": .., "Y1": .., "X2": .., "Y2": .., "Mass": .., ...}}`` (an image without
marks has an empty value). ``X1, Y1`` and ``X2, Y2`` are a mark's corners in the stored image's pixels; they are
taken as the box's edges (x = X1, width = X2 - X1), as the ``omidb`` package's BoundingBox holds them.

Kept: every image of a study present under ``images/`` (a copy synced for a subset has the other studies listed in
``imagedb`` but not downloaded; those are left out, as the ``omidb`` package does with missing images). An image
whose study is there but whose DICOM is not is a bad row. Left out as well: images whose header says
``PresentationIntentType`` FOR PROCESSING (raw detector images; the marks are drawn on the images for presentation).

Per image: patient = the client; study = the study UID; view = ImageLaterality + ViewPosition from the header JSON
(``lcc``, ``rmlo``; the DICOM header when the copy has no JSON); boxes = its marks, class from the mark's finding
flags (``mass``, ``calcification``, ``distortion``, ``asymmetry``, joined with ``+``; ``lesion`` when none is set);
no split of its own (the fractions apply). Malignancy lives in the NBSS outcomes and is not read.

Errors name ``imagedb_<client>.json`` and the line its image UID is written on (1 in a one-line file). The cache's
fingerprint hashes every ``imagedb_<client>.json`` read and stamps the DICOMs and the header JSONs read.
"""

from __future__ import annotations

import bisect
import json
import re
from pathlib import Path
from typing import Any, ClassVar

from comoto_cli.config import PreprocessConfig
from comoto_cli.data import decoders
from comoto_cli.data.adapters.base import ImageAdapter, register
from comoto_cli.data.sources import BadRow, ImageRecord, LesionBox, Skipped, mammo_records, report, row_error
from comoto_cli.errors import InputDataError

IUID = re.compile(r"\d+(\.\d+)+")
#: Mark flags -> the class words they give, in this order.
FINDINGS = (
    ("Mass", "mass"),
    ("SuspiciousCalcifications", "calcification"),
    ("WithCalcification", "calcification"),
    ("ArchitecturalDistortion", "distortion"),
    ("FocalAsymmetry", "asymmetry"),
)
#: Header keyword -> its tag as the DICOM JSON model writes it.
HEADER_TAGS = {"ViewPosition": "00185101", "ImageLaterality": "00200062", "Laterality": "00200060",
               "PresentationIntentType": "00080068"}
MARK_CORNERS = ("X1", "Y1", "X2", "Y2")


@register
class OmiDb(ImageAdapter):
    """OMI-DB: mammograms with the readers' marks as boxes, from the sync tool's data/ and images/ folders."""

    name: ClassVar[str] = "omidb"

    def discover(self, root: Path, config: PreprocessConfig, skipped: Skipped | None) -> list[ImageRecord]:
        return read_omidb(root, skipped=skipped)


def read_omidb(root: Path, *, skipped: Skipped | None = None) -> list[ImageRecord]:
    """One record per kept image of every client under ``root/data`` (see the module docstring)."""
    root = Path(root).resolve()
    data, images = root / "data", root / "images"
    if not data.is_dir() or not images.is_dir():
        raise InputDataError("not an OMI-DB copy: expected its data/ and images/ folders in it", path=root)
    clients = sorted(path for path in data.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not clients:
        raise InputDataError("no client folder (data/<client>/imagedb_<client>.json) found", path=data)
    records: list[ImageRecord] = []
    for client in clients:
        listing = _imagedb(client)
        if listing is None:
            report(skipped, InputDataError(f"client folder without its imagedb_{client.name}.json", path=client),
                   client, None)
            continue
        records += _client_records(root, client, listing, skipped)
    return records


def _imagedb(client: Path) -> Path | None:
    for name in (f"imagedb_{client.name}.json", f"IMAGEDB_{client.name}.json"):
        if (client / name).is_file():
            return client / name
    return None


class _Lines:
    """The line a text's key is written on, for error messages."""

    def __init__(self, text: str):
        self.text = text
        self.breaks = [index for index, char in enumerate(text) if char == "\n"]

    def of(self, key: str) -> int:
        position = self.text.find(f'"{key}"')
        return bisect.bisect_left(self.breaks, max(position, 0)) + 1


def _client_records(root: Path, client: Path, listing: Path, skipped: Skipped | None) -> list[ImageRecord]:
    text = listing.read_text(encoding="utf-8-sig", errors="replace")
    try:
        studies = json.loads(text).get("STUDIES")
    except (json.JSONDecodeError, AttributeError) as exc:
        problem = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "not an object"
        report(skipped, InputDataError(f"not an OMI-DB imagedb file ({problem})", path=listing), listing, None)
        return []
    if not isinstance(studies, dict):
        report(skipped, InputDataError("no STUDIES object in it", path=listing), listing, None)
        return []
    lines = _Lines(text)
    entries = []
    for study_uid, study in studies.items():
        if not (IUID.fullmatch(study_uid) and isinstance(study, dict)):
            continue
        if not (root / "images" / client.name / study_uid).is_dir():
            continue  # not synced into this copy
        for series_uid, series in study.items():
            if not (IUID.fullmatch(series_uid) and isinstance(series, dict)):
                continue
            for image_uid, marks in series.items():
                if not IUID.fullmatch(image_uid):
                    continue
                row = lines.of(image_uid)
                try:
                    entry = _entry(root, client.name, study_uid, image_uid, marks, listing, row)
                except BadRow as exc:
                    report(skipped, row_error(f"image {image_uid}: {exc}", listing, row), listing, row)
                    continue
                if entry is not None:
                    entries.append(entry)
    return mammo_records(root, listing, entries, skipped)


def _entry(root: Path, client: str, study_uid: str, image_uid: str, marks: Any, listing: Path,
           row: int) -> tuple[str, dict] | None:
    """(the DICOM's path below ROOT, the record's fields), or None for an image left out by design."""
    source = f"images/{client}/{study_uid}/{image_uid}.dcm"
    header = _header(root / "data" / client / study_uid, image_uid, root / source)
    if header is None:
        return source, {"patient": client, "study": study_uid, "view": "", "split": None, "row": row, "boxes": []}
    if header.get("PresentationIntentType") == "FOR PROCESSING":
        return None
    boxes = [_box(mark, key, listing, row) for key, mark in _marks(marks)]
    laterality = header.get("ImageLaterality") or header.get("Laterality") or ""
    position = header.get("ViewPosition", "")
    view = (laterality + position).lower() if laterality in ("L", "R") and position else ""
    return source, {"patient": client, "study": study_uid, "view": view, "split": None, "row": row, "boxes": boxes,
                    "extra_inputs": [header["file"]] if header.get("file") else []}


def _marks(marks: Any) -> list[tuple[str, dict]]:
    if marks in (None, "", [], {}):
        return []
    if not isinstance(marks, dict) or not all(isinstance(mark, dict) for mark in marks.values()):
        raise BadRow("its marks are not an object of mark objects")
    return list(marks.items())


def _box(mark: dict, key: str, listing: Path, row: int) -> LesionBox:
    name = f"mark {mark.get('MarkID', key)}"
    try:
        x1, y1, x2, y2 = (float(mark[corner]) for corner in MARK_CORNERS)
    except KeyError as exc:
        raise BadRow(f"{name} has no {exc.args[0]}") from None
    except (TypeError, ValueError):
        raise BadRow(f"{name} has a corner that is not a number: "
                     f"{', '.join(f'{c}={mark.get(c)!r}' for c in MARK_CORNERS)}") from None
    if min(x1, y1) < 0 or x2 <= x1 or y2 <= y1:
        raise BadRow(f"{name} is not a box: X1 {x1:g}, Y1 {y1:g}, X2 {x2:g}, Y2 {y2:g} (need 0 <= X1 < X2, "
                     "0 <= Y1 < Y2)")
    words = list(dict.fromkeys(word for flag, word in FINDINGS if mark.get(flag)))
    return LesionBox(slice=0, x=x1, y=y1, width=x2 - x1, height=y2 - y1, cls="+".join(words) or "lesion",
                     csv=listing, row=row)


def _header(study_folder: Path, image_uid: str, dicom: Path) -> dict | None:
    """The header fields the record needs, upper-case text, and under ``file`` the header JSON read: from the
    image's JSON, else from its DICOM; None if neither is there (the missing DICOM is then reported as for any
    listed file)."""
    for name in (f"{image_uid}.json", f"{image_uid}.dcm.json"):
        path = study_folder / name
        if path.is_file():
            try:
                document = json.loads(path.read_text(encoding="utf-8-sig", errors="replace"))
            except json.JSONDecodeError as exc:
                raise BadRow(f"its header {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
            if not isinstance(document, dict):
                raise BadRow(f"its header {path} is not a JSON object")
            return {**{keyword: _json_value(document, keyword) for keyword in HEADER_TAGS}, "file": path}
    if not dicom.is_file():
        return None
    import pydicom

    decoders.register()
    try:
        dataset = pydicom.dcmread(dicom, stop_before_pixels=True,
                                  specific_tags=list(HEADER_TAGS))
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise BadRow(f"cannot read {dicom} as DICOM ({type(exc).__name__}: {' '.join(str(exc).split())})") from None
    return {keyword: str(dataset.get(keyword, "") or "").strip().upper() for keyword in HEADER_TAGS}


def _json_value(document: dict, keyword: str) -> str:
    """A header field from the DICOM JSON model (``{"00185101": {"vr": "CS", "Value": ["CC"]}}``) or from a
    keyword-keyed object (``{"ViewPosition": "CC"}``), as upper-case text ('' when absent)."""
    value = document.get(HEADER_TAGS[keyword], document.get(keyword))
    if isinstance(value, dict):
        value = value.get("Value")
    if isinstance(value, list):
        value = value[0] if value else None
    return "" if value is None else str(value).strip().upper()
