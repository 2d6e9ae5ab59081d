"""INbreast (Moreira et al. 2012) as its release unpacks:

    ROOT/AllDICOMs/<file id>_<patient>_MG_<L|R>_<CC|MLO>_ANON.dcm      one per mammogram (410)
    ROOT/AllXML/<file id>.xml                                        its annotations, an OsiriX plist (343 of them)

The DICOM's name gives the file id, the anonymised patient, the laterality and the view. An image's XML lists its
regions of interest under ``Images[0].ROIs``, each with a ``Name`` and its outline ``Point_px`` (``"(x, y)"`` in the
stored image's pixels); its box is the outline's bounding box (x = the least x, width = the greatest x less the
least). An image without an XML has no annotated finding: a normal image.

Kept as boxes, class from the name: Mass -> ``mass``, Cluster -> ``calcification-cluster``, Spiculated Region ->
``spiculated-region``, Asymmetry (and the release's 'Assymetry') -> ``asymmetry``, Distortion -> ``distortion``;
any other name becomes a box of that class, lower-cased, so nothing unknown is dropped. Left out: single
``Calcification`` marks and ``Point <n>`` landmarks (a few pixels each, not lesions a detector boxes).

Patient: the name's patient part; study: the same (the release has no study UID in its names); no split of its
own (the fractions apply). The release's INbreast.xls (BI-RADS, density) is not read.

Errors about a region name its XML and the line its ``<dict>`` opens on; errors about an image name its XML too
(line 1), or, for an image without findings, the XML it would have: the cache's input fingerprint hashes every
image's XML, absent ones included, so adding or editing annotations rebuilds the cache.
"""

from __future__ import annotations

import os
import plistlib
import re
from pathlib import Path
from typing import ClassVar
from xml.parsers.expat import ExpatError

from comoto_cli.config import PreprocessConfig
from comoto_cli.data.adapters.base import ImageAdapter, register
from comoto_cli.data.sources import BadRow, ImageRecord, LesionBox, Skipped, mammo_records, report, row_error
from comoto_cli.errors import InputDataError

DICOM_NAME = re.compile(r"(\d+)_([0-9A-Za-z]+)_MG_([LR])_([A-Z]+)_ANON\.dcm", re.IGNORECASE)
CLASSES = {"mass": "mass", "cluster": "calcification-cluster", "spiculated region": "spiculated-region",
           "asymmetry": "asymmetry", "assymetry": "asymmetry", "distortion": "distortion"}
LEFT_OUT = re.compile(r"calcifications?|point\s*\d*", re.IGNORECASE)
POINT = re.compile(r"\(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*(?:,[^)]*)?\)")


@register
class InBreast(ImageAdapter):
    """INbreast: mammograms with their XML regions of interest as boxes."""

    name: ClassVar[str] = "inbreast"

    def discover(self, root: Path, config: PreprocessConfig, skipped: Skipped | None) -> list[ImageRecord]:
        return read_inbreast(root, skipped=skipped)


def read_inbreast(root: Path, *, skipped: Skipped | None = None) -> list[ImageRecord]:
    """One record per DICOM of ``root/AllDICOMs``, its boxes from ``root/AllXML/<file id>.xml``."""
    root = Path(root).resolve()
    dicoms, xmls = root / "AllDICOMs", root / "AllXML"
    if not dicoms.is_dir():
        raise InputDataError("not an INbreast folder: expected its AllDICOMs/ (and AllXML/) folders in it", path=root)
    names = sorted(name for name in os.listdir(dicoms) if name.lower().endswith(".dcm") and not name.startswith("."))
    if not names:
        raise InputDataError("no DICOM file in it", path=dicoms)
    ids: dict[str, str] = {}
    records: list[ImageRecord] = []
    for name in names:
        match = DICOM_NAME.fullmatch(name)
        if match is None:
            report(skipped, InputDataError("not named as INbreast names its images "
                                           "(<file id>_<patient>_MG_<L|R>_<view>_ANON.dcm)", path=dicoms / name),
                   dicoms / name, None)
            continue
        file_id, patient, side, position = match.groups()
        if file_id in ids:
            report(skipped, InputDataError(f"file id {file_id} is also the id of {ids[file_id]}", path=dicoms / name),
                   dicoms / name, None)
            continue
        ids[file_id] = name
        xml = xmls / f"{file_id}.xml"
        try:
            boxes = _boxes(xml) if xml.is_file() else []
        except BadRow as exc:
            message, line = exc.args
            report(skipped, row_error(message, xml, line), xml, line)
            continue
        entry = {"patient": patient, "study": patient, "view": (side + position).lower(), "split": None, "row": 1,
                 "boxes": boxes}
        records += mammo_records(root, xml, [(f"AllDICOMs/{name}", entry)], skipped)
    _orphans(xmls, ids, skipped)
    return records


def _orphans(xmls: Path, ids: dict[str, str], skipped: Skipped | None) -> None:
    """An XML without its image would drop its annotations silently: a bad input."""
    if not xmls.is_dir():
        return
    for name in sorted(os.listdir(xmls)):
        if name.lower().endswith(".xml") and Path(name).stem not in ids:
            report(skipped, InputDataError(f"no image in AllDICOMs/ has the file id {Path(name).stem}",
                                           path=xmls / name), xmls / name, None)


def _boxes(xml: Path) -> list[LesionBox]:
    """The regions kept as boxes; a bad region raises BadRow(message, line)."""
    data = xml.read_bytes()
    try:
        document = plistlib.loads(data, fmt=plistlib.FMT_XML)
        rois = document["Images"][0]["ROIs"]
    except (ExpatError, ValueError, plistlib.InvalidFileException) as exc:
        raise BadRow(f"not an OsiriX plist ({' '.join(str(exc).split())})", 1) from None
    except (KeyError, IndexError, TypeError):
        raise BadRow("no Images[0].ROIs in the plist", 1) from None
    if not isinstance(rois, list):
        raise BadRow("Images[0].ROIs is not an array of regions", 1)
    lines = _region_lines(data.decode("utf-8", errors="replace"))
    boxes = []
    for index, roi in enumerate(rois):
        line = lines[index] if index < len(lines) else 1
        if not isinstance(roi, dict):
            raise BadRow(f"region {index + 1} is not a dictionary", line)
        name = str(roi.get("Name", "")).strip()
        if LEFT_OUT.fullmatch(name):
            continue
        points = [POINT.fullmatch(str(text).strip()) for text in (roi.get("Point_px") or [])]
        try:
            xs = [float(point.group(1)) for point in points]
            ys = [float(point.group(2)) for point in points]
        except (AttributeError, ValueError):  # no match, or a number such as '1..2'
            xs = []
        if not xs:
            raise BadRow(f"region {index + 1} ({name or 'unnamed'}) has no outline of '(x, y)' points in Point_px",
                         line)
        if max(xs) <= min(xs) or max(ys) <= min(ys):
            raise BadRow(f"region {index + 1} ({name}) outlines no area: x {min(xs):g}..{max(xs):g}, "
                         f"y {min(ys):g}..{max(ys):g}", line)
        boxes.append(LesionBox(slice=0, x=min(xs), y=min(ys), width=max(xs) - min(xs), height=max(ys) - min(ys),
                               cls=CLASSES.get(name.lower(), name.lower() or "lesion"), csv=xml, row=line))
    return boxes


def _region_lines(text: str) -> list[int]:
    """The line each region's ``<dict>`` opens on, in document order: the dictionaries after the first ``ROIs`` key
    (a region holds no dictionary of its own, so the k-th is region k)."""
    start = re.search(r"<key>\s*ROIs\s*</key>", text)
    if start is None:
        return []
    return [text.count("\n", 0, match.start()) + 1 for match in re.compile(r"<dict\s*>").finditer(text, start.end())]
