"""CBIS-DDSM as TCIA publishes it: four description CSVs (one row per abnormality) and a folder of DICOMs per subject.

    mass_case_description_train_set.csv, ..._test_set.csv, calc_case_description_train_set.csv, ..._test_set.csv
    CBIS-DDSM/Mass-Training_P_00001_LEFT_CC/<study>/<series>/1-1.dcm       the full mammogram
    CBIS-DDSM/Mass-Training_P_00001_LEFT_CC_1/<study>/<series>/1-1.dcm     ROI mask and cropped image of
    CBIS-DDSM/Mass-Training_P_00001_LEFT_CC_1/<study>/<series>/1-2.dcm     abnormality 1 (one series or two)

The CSVs are found under ROOT by their columns (or given with ``--input mass-train=F``, ``mass-test``, ``calc-train``,
``calc-test``). Their file paths (``<subject>/<study UID>/<series UID>/000000.dcm``) do not match the download's
folders and file names, so only their first folder is used: the subject folder, found anywhere under ROOT. The full
mammogram is the one DICOM in its subject folder; of the DICOMs in the abnormality's folder (named by the ROI mask
and cropped image paths), the ROI mask is the one with the full image's size whose pixels are binary (the cropped
image is small; the two swap file names between rows).

Boxes: one per 8-connected region of nonzero mask pixels (a mask drawn in two parts gives two boxes), its bounding
box as pixel edges in the full image's stored frame. Split: the subject folder's Training / Test (train / test; val
is carved from the training patients). Class of every box: ``<abnormality type>-<pathology>``, e.g.
``mass-MALIGNANT``; the image's label is ``lesion``. Patient: ``patient_id`` (P_00001); study: the subject folder.

The input fingerprint hashes the CSVs and stamps the full mammograms and the ROI masks used (size, modification
time): a mask replaced by another rebuilds the cache. The masks are read while discovering (all of them, on every
run, on up to four threads).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from comoto_cli.config import PreprocessConfig
from comoto_cli.data import decoders, dicom_io
from comoto_cli.data.adapters.base import ImageAdapter, register
from comoto_cli.data.sources import (
    BadRow,
    ImageRecord,
    LesionBox,
    Skipped,
    mammo_records,
    none_found,
    number,
    report,
    row_error,
)
from comoto_cli.data.tables import (
    CBIS_DDSM_ABNORMALITY_TYPES,
    CBIS_DDSM_OPTIONAL_COLUMNS,
    CBIS_DDSM_PATHOLOGIES,
    CBIS_DDSM_REQUIRED_COLUMNS,
)
from comoto_cli.errors import InputDataError
from comoto_cli.utils.csvio import CsvTable, read_csv, read_header
from comoto_cli.utils.system import usable_cores

#: A subject folder: the full mammogram's (``Mass-Training_P_00001_LEFT_CC``) or an abnormality's (``..._CC_1``).
SUBJECT = re.compile(r"(Mass|Calc)-(Training|Test)_(P_\d+)_(LEFT|RIGHT)_(CC|MLO)(?:_(\d+))?")
INPUT_NAMES = ("mass-train", "mass-test", "calc-train", "calc-test")
MAX_THREADS = 4  # mask decoding threads while discovering (numpy and file reads release the GIL)


@register
class CbisDdsm(ImageAdapter):
    """CBIS-DDSM: full mammograms with ROI-mask boxes, the release's training / test split kept."""

    name: ClassVar[str] = "cbis-ddsm"
    input_names: ClassVar[tuple[str, ...]] = INPUT_NAMES

    def discover(self, root: Path, config: PreprocessConfig, skipped: Skipped | None) -> list[ImageRecord]:
        given = [Path(config.inputs[name]) for name in INPUT_NAMES if name in config.inputs]
        threads = max(1, min(MAX_THREADS, config.workers or usable_cores()))
        return read_cbis_ddsm(root, csvs=given or None, skipped=skipped, accept_modality=config.accept_modality,
                              threads=threads)


@dataclass
class _Abnormality:
    row: int
    cls: str  # e.g. mass-MALIGNANT
    mask_cell: str  # the ROI mask file path as written
    folders: tuple[str, ...]  # the ROI mask's first folder, then the cropped image's when it differs


@dataclass
class _Image:
    subject: str  # its subject folder, e.g. Mass-Training_P_00001_LEFT_CC
    patient: str
    view: str
    split: str
    csv: Path
    row: int  # first row
    image_cell: str  # the image file path as written
    abnormalities: dict[int, _Abnormality] = field(default_factory=dict)


def read_cbis_ddsm(root: Path, *, csvs: list[Path] | None = None, skipped: Skipped | None = None,
                   accept_modality: tuple[str, ...] | list[str] = (), threads: int = 1) -> list[ImageRecord]:
    """One record per full mammogram of the CSVs (``csvs`` None: every CSV under ``root`` with the CBIS-DDSM
    columns), its boxes from the ROI masks. A bad row leaves its image out: InputDataError naming the CSV and row,
    or listed in ``skipped``."""
    layout = _Layout(Path(root), find_csvs=csvs is None)
    if csvs is None:
        csvs = layout.csvs
        if not csvs:
            raise none_found(root, CBIS_DDSM_REQUIRED_COLUMNS, "--input mass-train=F (mass-test, calc-train, calc-test)")
    images: dict[str, _Image] = {}
    bad: set[str] = set()
    for csv in csvs:
        _read_table(read_csv(csv, CBIS_DDSM_REQUIRED_COLUMNS, optional=CBIS_DDSM_OPTIONAL_COLUMNS), images, bad,
                    skipped)
    ordered = list(images.values())
    decoders.register()  # once, before the threads
    resolve = _Resolver(layout, tuple(accept_modality))
    outcomes = _map(resolve, ordered, threads, stop_early=skipped is None)
    entries: dict[Path, list[tuple[str, dict]]] = {}
    for image, outcome in zip(ordered, outcomes):
        if isinstance(outcome, InputDataError):
            report(skipped, outcome, image.csv, outcome.row if outcome.row is not None else image.row)
            continue
        source, boxes, masks = outcome
        entry = {"patient": image.patient, "study": image.subject, "view": image.view, "split": image.split,
                 "row": image.row, "boxes": boxes, "extra_inputs": masks}
        entries.setdefault(image.csv, []).append((source, entry))
    return [record for csv, listed in entries.items() for record in mammo_records(layout.root, csv, listed, skipped)]


# ---------------------------------------------------------------------------------------------- the CSVs
def _read_table(table: CsvTable, images: dict[str, _Image], bad: set[str], skipped: Skipped | None) -> None:
    """Gather ``table``'s abnormality rows by image; a bad row leaves its image (and the image's other rows) out."""
    csv = table.path
    for index, row in enumerate(table.rows):
        subject = None
        try:
            subject = _subject(table, index)
            if subject in bad:
                continue
            image, abnormality_id, abnormality = _row(table, index, subject)
            known = images.get(subject)
            if known is None:
                known = images[subject] = image
            elif known.csv != csv:
                raise BadRow(f"{subject} is also listed in {known.csv} (row {known.row})")
            if abnormality_id in known.abnormalities:
                raise BadRow(f"abnormality {abnormality_id} of {subject} is listed twice (also row "
                             f"{known.abnormalities[abnormality_id].row})")
            known.abnormalities[abnormality_id] = abnormality
        except BadRow as exc:
            report(skipped, row_error(str(exc), csv, row), csv, row)
            if subject is not None:
                images.pop(subject, None)
                bad.add(subject)


def _cell(table: CsvTable, name: str, index: int) -> str:
    return table.columns[name][index].strip() if name in table.columns else ""


def _subject(table: CsvTable, index: int) -> str:
    """The subject folder the row's image file path starts with, e.g. Mass-Training_P_00001_LEFT_CC."""
    image_cell = _cell(table, "image file path", index)
    subject = _first_folder(image_cell, "image file path")
    match = SUBJECT.fullmatch(subject)
    if match is None or match.group(6) is not None:
        raise BadRow(f"image file path {image_cell!r} does not start with a subject folder such as "
                     "Mass-Training_P_00001_LEFT_CC")
    return subject


def _row(table: CsvTable, index: int, subject: str) -> tuple[_Image, int, _Abnormality]:
    """(image, abnormality id, abnormality) of one row, its cells checked against the ``subject`` folder."""
    prefix, release, patient, side, position, _ = SUBJECT.fullmatch(subject).groups()
    for column, expected in (("patient_id", patient), ("left or right breast", side), ("image view", position)):
        value = _cell(table, column, index)
        if value.upper() != expected.upper():
            raise BadRow(f"{column} {value!r} does not match the image file path's folder {subject} ({expected})")
    abnormality_id = number(table, "abnormality id", index, integer=True, limit=1000)
    if abnormality_id < 1:
        raise BadRow(f"abnormality id {abnormality_id} is not a positive number")
    kind = _cell(table, "abnormality type", index).lower()
    if kind not in CBIS_DDSM_ABNORMALITY_TYPES:
        raise BadRow(f"abnormality type {_cell(table, 'abnormality type', index)!r} is not one of "
                     f"{', '.join(CBIS_DDSM_ABNORMALITY_TYPES)}")
    if CBIS_DDSM_ABNORMALITY_TYPES[kind] != prefix:
        raise BadRow(f"abnormality type {kind!r} in a {prefix} folder ({subject})")
    pathology = _cell(table, "pathology", index).upper()
    if pathology not in CBIS_DDSM_PATHOLOGIES:
        raise BadRow(f"pathology {_cell(table, 'pathology', index)!r} is not one of {', '.join(CBIS_DDSM_PATHOLOGIES)}")
    folders: list[str] = []
    for column in ("ROI mask file path", "cropped image file path"):
        path = _cell(table, column, index)
        if column == "cropped image file path" and not path:
            continue
        folder = _first_folder(path, column)
        roi = SUBJECT.fullmatch(folder)
        if roi is None or roi.group(6) is None or folder.rsplit("_", 1)[0] != subject:
            raise BadRow(f"{column} {path!r} does not start with an abnormality folder of {subject} "
                         f"({subject}_1, {subject}_2, ...)")
        if folder not in folders:
            folders.append(folder)
    image = _Image(subject=subject, patient=patient, view=side[0].lower() + position.lower(),
                   split="train" if release == "Training" else "test", csv=table.path, row=table.rows[index],
                   image_cell=_cell(table, "image file path", index))
    abnormality = _Abnormality(row=table.rows[index], cls=f"{kind}-{pathology}",
                               mask_cell=_cell(table, "ROI mask file path", index), folders=tuple(folders))
    return image, abnormality_id, abnormality


def _first_folder(cell: str, column: str) -> str:
    parts = [part for part in cell.replace("\\", "/").split("/") if part.strip()]
    if not parts:
        raise BadRow(f"column {column!r} is empty")
    return parts[0].strip()


# ---------------------------------------------------------------------------------------------- the folders
class _Layout:
    """The subject folders under the data root (found by name wherever they are) and, when asked, the CSVs with
    the CBIS-DDSM columns outside them."""

    def __init__(self, root: Path, *, find_csvs: bool):
        if not root.is_dir():
            raise InputDataError("data root is not a directory", path=root)
        self.root = root.resolve()
        self.folders: dict[str, list[Path]] = {}
        self.csvs: list[Path] = []
        self._dicoms: dict[Path, list[Path]] = {}
        for directory, subdirs, files in os.walk(self.root):
            descend = []
            for name in sorted(subdirs):
                if name.startswith("."):
                    continue
                if SUBJECT.fullmatch(name):
                    self.folders.setdefault(name, []).append(Path(directory) / name)
                else:
                    descend.append(name)
            subdirs[:] = descend
            if find_csvs:
                self.csvs += [Path(directory) / name for name in sorted(files) if name.lower().endswith(".csv")
                              and all(c in read_header(Path(directory) / name) for c in CBIS_DDSM_REQUIRED_COLUMNS)]

    def folder(self, name: str, what: str) -> Path:
        found = self.folders.get(name, [])
        if not found:
            raise BadRow(f"{what} folder {name} not found under the data root {self.root}")
        if len(found) > 1:
            raise BadRow(f"{what} folder {name} is under the data root twice: {', '.join(map(str, found))}")
        return found[0]

    def dicoms(self, folder: Path) -> list[Path]:
        """The DICOM files below ``folder`` (hidden folders, and links leaving the data root, left out)."""
        if folder not in self._dicoms:
            found = []
            for directory, subdirs, files in os.walk(folder):
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
                found += [Path(directory) / name for name in sorted(files)
                          if name.lower().endswith(".dcm") and not name.startswith(".")
                          and self._inside(Path(directory) / name)]
            self._dicoms[folder] = found
        return self._dicoms[folder]


    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.root)
        except (OSError, RuntimeError):  # a link loop
            return False


# ---------------------------------------------------------------------------------------------- the DICOMs
class _Resolver:
    """An image's full mammogram (path relative to the root) and boxes, or the InputDataError of its bad row."""

    def __init__(self, layout: _Layout, accept_modality: tuple[str, ...]):
        self.layout = layout
        self.accept_modality = accept_modality

    def __call__(self, image: _Image) -> tuple[str, list[LesionBox], list[Path]] | InputDataError:
        row = image.row
        try:
            full = self._full_image(image)
            _, rows, cols = dicom_io.read_mammo_header(full, row=row, csv=image.csv,
                                                       accept_modality=self.accept_modality)
            boxes, masks = [], []
            for key in sorted(image.abnormalities):
                abnormality = image.abnormalities[key]
                row = abnormality.row
                mask_path, mask = self._mask(abnormality, full, rows, cols)
                masks.append(mask_path)
                boxes += [LesionBox(slice=0, x=float(x0), y=float(y0), width=float(x1 - x0), height=float(y1 - y0),
                                    cls=abnormality.cls, csv=image.csv, row=row)
                          for x0, y0, x1, y1 in component_boxes(mask)]
        except BadRow as exc:
            return row_error(str(exc), image.csv, row)
        except InputDataError as exc:
            return exc
        return full.relative_to(self.layout.root).as_posix(), boxes, masks

    def _full_image(self, image: _Image) -> Path:
        folder = self.layout.folder(image.subject, "image")
        found = self.layout.dicoms(folder)
        if len(found) == 1:
            return found[0]
        named = [path for path in found if _named_by(path, image.image_cell)]
        if len(named) == 1:  # the classic (UID-named) download, where the CSV's path is the file's
            return named[0]
        if not found:
            raise BadRow(f"no DICOM file under {folder} (the image file path's folder)")
        raise BadRow(f"{len(found)} DICOM files under {folder}; the full mammogram's folder holds one")

    def _mask(self, abnormality: _Abnormality, full: Path, rows: int, cols: int) -> tuple[Path, np.ndarray]:
        """The ROI mask of ``abnormality`` (file, pixels): the DICOM of its folders with the full image's size and
        binary pixels."""
        folders = [self.layout.folder(abnormality.folders[0], "ROI mask")]
        for name in abnormality.folders[1:]:  # the cropped image's folder, when another one: searched if it is there
            found = self.layout.folders.get(name, [])
            if len(found) == 1:
                folders.append(found[0])
        candidates = list(dict.fromkeys(p for folder in folders for p in self.layout.dicoms(folder) if p != full))
        where = folders[0]
        if not candidates:
            raise BadRow(f"no DICOM file under {where} (the ROI mask file path's folder)")
        sizes = {path: _image_size(path) for path in candidates}
        same = [path for path, size in sizes.items() if size == (rows, cols)]
        if not same:
            listed = ", ".join(f"{_name(path, where)} is {size[0]} x {size[1]}" for path, size in sizes.items())
            raise BadRow(f"no ROI mask of the full image's size ({rows} x {cols}, rows x columns) under {where}: "
                         f"{listed}")
        masks, problems = [], []
        for path in same:
            pixels = _pixels(path, rows, cols)
            problem = _not_a_mask(pixels)
            if problem is None:
                masks.append((path, pixels))
            else:
                problems.append(f"{_name(path, where)} {problem}")
        if len(masks) > 1:  # the classic download keeps the CSV's file names: the one named there
            masks = [mask for mask in masks if _named_by(mask[0], abnormality.mask_cell)] or masks
        if len(masks) == 1:
            return masks[0]
        if masks:
            raise BadRow(f"several binary masks of the full image's size under {where}: "
                         f"{', '.join(_name(path, where) for path, _ in masks)}")
        raise BadRow(f"no ROI mask under {where}: {'; '.join(problems)}")


def _named_by(path: Path, cell: str) -> bool:
    """Whether ``path`` ends with the path written in ``cell``."""
    parts = tuple(part.strip() for part in cell.replace("\\", "/").split("/") if part.strip())
    return bool(parts) and path.parts[-len(parts):] == parts


def _name(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)


def _dataset(path: Path, header_only: bool):
    import pydicom

    decoders.register()
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise BadRow(f"cannot read {path} as DICOM ({type(exc).__name__}: {' '.join(str(exc).split())})") from None


def _image_size(path: Path) -> tuple[int, int]:
    """(rows, columns) of a single-frame image from its header."""
    ds = _dataset(path, header_only=True)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise BadRow(f"{path} has no usable Rows / Columns in its header") from None
    if not (0 < rows <= dicom_io.MAX_SIDE and 0 < cols <= dicom_io.MAX_SIDE) or frames != 1:
        raise BadRow(f"{path} is not a single-frame image of a sensible size (Rows {rows}, Columns {cols}, "
                     f"NumberOfFrames {frames})")
    return rows, cols


def _pixels(path: Path, rows: int, cols: int) -> np.ndarray:
    """The stored pixel values (no rescale, no window: a mask is its nonzero pixels)."""
    ds = _dataset(path, header_only=False)
    try:
        pixels = ds.pixel_array
    except MemoryError:
        raise BadRow(f"not enough memory to decode {path}") from None
    except Exception as exc:  # noqa: BLE001 - decoders raise ValueError, RuntimeError, struct.error, ...
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        raise BadRow(f"{path}: {dicom_io.decode_problem(exc, syntax)}") from None
    if pixels.shape != (rows, cols):
        raise BadRow(f"{path} decodes to shape {pixels.shape}, its header says {rows} x {cols}")
    return pixels


def _not_a_mask(pixels: np.ndarray) -> str | None:
    """Why ``pixels`` are not a binary mask with something in it, or None."""
    inside = pixels != 0
    if not inside.any():
        return "is empty (no nonzero pixel)"
    values = pixels[inside]
    if values.min() != values.max():
        return f"is not binary (nonzero values from {values.min()} to {values.max()})"
    return None


def _map(function: Callable, items: list, threads: int, *, stop_early: bool) -> list:
    """``function`` over ``items`` in order on up to ``threads`` threads; ``stop_early``: stop at the first
    InputDataError returned (fail mode: what follows it is not needed)."""
    if threads <= 1 or len(items) <= 1:
        results = []
        for item in items:
            results.append(function(item))
            if stop_early and isinstance(results[-1], InputDataError):
                break
        return results
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        results = []
        for result in pool.map(function, items):
            results.append(result)
            if stop_early and isinstance(result, InputDataError):
                break
        return results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- boxes
def component_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """``(xmin, ymin, xmax, ymax)`` of every 8-connected region of nonzero pixels of ``mask`` as pixel edges
    (``xmax``, ``ymax``: one past the region's last column and row), sorted top to bottom, then left to right.

    Row runs of nonzero pixels are joined when they touch (diagonally included) on neighbouring rows; a union-find
    over the runs gives the regions, so the cost grows with the runs, not the pixels."""
    inside = np.asarray(mask) != 0
    on_rows = np.flatnonzero(inside.any(axis=1))
    if on_rows.size == 0:
        return []
    top, bottom = int(on_rows[0]), int(on_rows[-1]) + 1
    on_cols = np.flatnonzero(inside[top:bottom].any(axis=0))
    left, right = int(on_cols[0]), int(on_cols[-1]) + 1
    padded = np.zeros((bottom - top, right - left + 2), dtype=np.int8)
    padded[:, 1:-1] = inside[top:bottom, left:right]
    change = np.diff(padded, axis=1)
    run_row, run_start = np.nonzero(change == 1)  # row-major order: the i-th start and the i-th end pair up
    _, run_end = np.nonzero(change == -1)  # one past the run's last column
    # Runs a (row r) and b (row r + 1) touch when start_a <= end_b and start_b <= end_a; on row r those a are
    # contiguous, found by binary search in keys that order every run by (row, column).
    stride = right - left + 2
    key_start, key_end = run_row * stride + run_start, run_row * stride + run_end
    below = np.flatnonzero(run_row > 0)
    previous = (run_row[below] - 1) * stride
    low = np.searchsorted(key_end, previous + run_start[below], side="left")
    high = np.searchsorted(key_start, previous + run_end[below], side="right")
    count = np.maximum(high - low, 0)
    first = np.repeat(low, count) + np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    second = np.repeat(below, count)
    parent = list(range(len(run_row)))

    def find(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in zip(first.tolist(), second.tolist()):
        root_a, root_b = find(a), find(b)
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)
    _, label = np.unique(np.array([find(node) for node in range(len(parent))]), return_inverse=True)
    regions = int(label.max()) + 1
    xmin, ymin = np.full(regions, right, dtype=np.int64), np.full(regions, bottom, dtype=np.int64)
    xmax, ymax = np.zeros(regions, dtype=np.int64), np.zeros(regions, dtype=np.int64)
    np.minimum.at(xmin, label, run_start + left)
    np.minimum.at(ymin, label, run_row + top)
    np.maximum.at(xmax, label, run_end + left)
    np.maximum.at(ymax, label, run_row + top + 1)
    boxes = [(int(a), int(b), int(c), int(d)) for a, b, c, d in zip(xmin, ymin, xmax, ymax)]
    return sorted(boxes, key=lambda box: (box[1], box[0], box[3], box[2]))
