"""DICOM readers for DBT volumes and mammograms.

DBT volumes are returned in the frame of the official BCS-DBT reader (``dcmread_image`` in
mazurowski-lab/duke-dbt-data), because the challenge's boxes were drawn against that frame:

1. decode the frames, ``(slices, rows, cols)``;
2. image laterality from the *raw* pixels of frame 0 (``dcmread_image`` reads ``pixel_array[index or 0]``, so
   frame 0 when the whole volume is read, which is how the boxes were made): ``'R'`` if the sum of its first
   column is smaller than the sum of its last column, else ``'L'``; view laterality = ``view[0].upper()``;
3. if they differ, flip both in-plane axes (a 180-degree rotation);
4. VOI window from SharedFunctionalGroupsSequence[0] -> FrameVOILUTSequence[0] (first value when
   multi-valued, cast to float32 as the official code does): ``[c - w/2, c + w/2]`` is mapped linearly onto
   the output range with clipping, exactly as ``skimage.exposure.rescale_intensity(in_range=(low, high),
   out_range="dtype")`` does for uint16 data (clip, ``(x - low) / (high - low) * 65535``, truncation to
   uint16). We return those uint16 values divided by 65535 as float32, i.e. in ``[0, 1]``.

The official reader decodes every frame; :class:`DbtFrames` gives the same frames while decoding only frame 0
(for step 2) and the frames asked for, one at a time, so a training volume that keeps two slices costs three
frame decodes instead of 64 and memory stays at one frame.

Notes on exactness: for uint16 pixel data (BCS-DBT) the result equals the official output / 65535 as
computed by today's numpy (float64 arithmetic). Under numpy 1.x the official code computed in float32, which
can move a pixel by one uint16 level (1.5e-5). For other integer dtypes the official output range differs; we
use the same normalised mapping at uint16 quantisation.

Window fallbacks beyond the official reader (documented behaviour, not the official one): when the shared
functional group has no window we try PerFrameFunctionalGroupsSequence[0] -> FrameVOILUTSequence[0], then the
top-level WindowCenter/WindowWidth (converted to stored values through RescaleSlope/Intercept when present);
when there is no window anywhere we use the min/max of the pixel data. A window that is present but unusable
(missing centre or width, NaN, width <= 0) with no usable fallback is an InputDataError.

Mammograms: decode, apply the modality LUT (rescale slope/intercept) and the VOI transform (window with
pydicom's ``apply_windowing``; a VOI LUT sequence, preferred when both exist, with our own lookup because
pydicom's truncates float input and wraps indices of 8-bit LUTs), min-max normalise to ``[0, 1]`` and invert MONOCHROME1,
so bright = dense tissue. No
flip: mammography boxes (VinDr) are in the stored frame.

Before any decoding the header is checked: absurd sizes, and an image size that does not match the pixel data
stored (the length of uncompressed data; the size in a JPEG / JPEG-LS / JPEG 2000 code stream's own header), so a
wrong header is reported on the DICOM, not on the CSV box compared with it. SOP class and Modality must say
mammogram / DBT (:func:`_check_kind`); the user may vouch for other modalities (``--accept-modality``). Every
failure, a garbled header or an undecodable stream included, is one :class:`InputDataError` line naming the file
(and CSV row); :mod:`comoto_cli.data.decoders` sets up the decoding plugins and :func:`decode_problem` words
their failures ('cannot decode <syntax>: install <package>' when a decoder is missing).
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from comoto_cli.data import decoders
from comoto_cli.data.decoders import PACKAGES
from comoto_cli.errors import InputDataError

# Header sanity limits, checked before any pixel decoding so a corrupt header cannot trigger a huge allocation.
MAX_SIDE = 20000
MAX_FRAMES = 20000
MAX_VOXELS = 2**31

_DEFER_SIZE = "1 MB"  # values larger than this (pixel data) are read only when decoded
_OUT_LEVELS = 65535.0  # the official reader's uint16 output range

# SOP classes (by UID) for the kind check; see :func:`_check_kind`.
_BREAST_TOMO = "1.2.840.10008.5.1.4.1.1.13.1.3"
_BREAST_PROJECTION = {"1.2.840.10008.5.1.4.1.1.13.1.4", "1.2.840.10008.5.1.4.1.1.13.1.5"}
_DIGITAL_MAMMO = {"1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.2.1"}
_GENERIC_XRAY = {
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray - For Processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.1",
    "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4",
}
# kind -> (SOP classes accepted whatever the Modality, SOP classes accepted only with Modality MG)
_SOP_RULES = {
    "dbt": ({_BREAST_TOMO}, _GENERIC_XRAY | _DIGITAL_MAMMO | _BREAST_PROJECTION),
    "mammo": (_DIGITAL_MAMMO | _BREAST_PROJECTION, _GENERIC_XRAY),
}


@dataclass
class DbtVolume:
    pixels: np.ndarray  # (slices, rows, cols) float32 in [0, 1] in the OFFICIAL reader frame
    flipped: bool  # the official flip rule rotated it by 180 degrees
    path: Path


# ----------------------------------------------------------------------------------------------- helpers
def _where(path: Path, csv: Path | None, row: int | None) -> str:
    if csv is not None:
        return f"{path} ({csv} row {row})" if row is not None else f"{path} ({csv})"
    if row is not None:
        return f"{path} (row {row})"
    return str(path)


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line: pydicom lists each decoder plugin's failure on a line of its own."""
    return " ".join(str(exc).split())


def _error(message: str, path: Path, csv: Path | None, row: int | None) -> InputDataError:
    return InputDataError(message, path=_where(path, csv, row))


def _read_dataset(path: Path, csv: Path | None, row: int | None):
    """pydicom dataset; large values (pixel data) are read lazily so the header can be checked first."""
    return _read(path, csv, row)[0]


def _read(path: Path, csv: Path | None, row: int | None, *, header_only: bool = False):
    """(dataset, file offset of the pixel data element or None): with ``header_only`` the pixel data is not read
    (the offset lets :func:`_stored_size_problem` look at its length and first bytes)."""
    import pydicom
    from pydicom.errors import InvalidDicomError


    decoders.register()
    path = Path(path)
    if not path.exists():
        raise _error("file not found", path, csv, row)
    if not path.is_file():
        raise _error("not a file", path, csv, row)
    try:
        if header_only:
            with open(path, "rb") as handle:
                ds = pydicom.dcmread(handle, stop_before_pixels=True)
                return ds, handle.tell()
        return pydicom.dcmread(path, defer_size=_DEFER_SIZE), None
    except InvalidDicomError:
        raise _error("not a DICOM file (no 'DICM' preamble)", path, csv, row) from None
    except OSError as exc:
        if exc.errno is None:  # pydicom's own OSError: "No tag to read at file position ..."
            raise _error(f"corrupt or truncated DICOM ({type(exc).__name__}: {_one_line(exc)})", path, csv,
                         row) from None
        raise _error(f"cannot read file: {exc.strerror or exc}", path, csv, row) from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise _error(f"corrupt or truncated DICOM ({type(exc).__name__}: {_one_line(exc)})", path, csv, row) from None


@contextlib.contextmanager
def _header_errors(path: Path, csv: Path | None, row: int | None) -> Iterator[None]:
    """Whatever goes wrong while the header is interpreted becomes one line naming the file: pydicom parses
    sequences and values only when they are first used, so a garbled one raises there (OSError, struct.error,
    ValueError, ...), and numpy's floating-point warnings (absurd window or rescale values) stay quiet: the
    checks that follow say what is wrong."""
    try:
        with np.errstate(all="ignore"):
            yield
    except InputDataError:
        raise
    except MemoryError:
        raise _error("not enough memory to read the DICOM header", path, csv, row) from None
    except Exception as exc:  # noqa: BLE001 - a damaged header raises anything
        raise _error(f"corrupt DICOM header ({type(exc).__name__}: {_one_line(exc)})", path, csv, row) from None


def _int_tag(ds, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1  # reported as absurd by the caller


def _check_header(
    ds, path: Path, csv: Path | None, row: int | None, *, need_pixels: bool, offset: int | None = None
) -> tuple[int, int, int]:
    """(frames, rows, cols) from the header, refusing absurd or missing values before any decoding, and a header
    whose image size does not match the pixel data stored (``offset``: where a header-only read stopped)."""
    if need_pixels and not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise _error("no pixel data in the DICOM file (it may be truncated)", path, csv, row)
    rows = _int_tag(ds, "Rows")
    cols = _int_tag(ds, "Columns")
    frames = _int_tag(ds, "NumberOfFrames", 1)
    if rows is None or cols is None:
        raise _error("no Rows/Columns in the DICOM header (not an image)", path, csv, row)
    if frames == 0:
        raise _error("the DICOM header says it has zero frames", path, csv, row)
    if not (0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE and 0 < frames <= MAX_FRAMES) or (
        rows * cols * frames > MAX_VOXELS
    ):
        raise _error(
            f"absurd image dimensions in the DICOM header (Rows {rows}, Columns {cols}, NumberOfFrames {frames})",
            path,
            csv,
            row,
        )
    samples = _int_tag(ds, "SamplesPerPixel", 1)
    if samples != 1:
        raise _error(
            f"colour image (SamplesPerPixel {samples}); a greyscale X-ray is expected", path, csv, row
        )
    allocated = _int_tag(ds, "BitsAllocated")
    stored = _int_tag(ds, "BitsStored")
    signed = _int_tag(ds, "PixelRepresentation")
    if (allocated is not None and allocated not in (1, 8, 16, 32, 64)) or (
        stored is not None and not 0 < stored <= (allocated or 64)) or signed not in (None, 0, 1):
        raise _error(f"absurd pixel format in the DICOM header (BitsAllocated {allocated}, BitsStored {stored}, "
                     f"PixelRepresentation {signed})", path, csv, row)
    if offset is not None:
        problem = _stored_size_problem(path, ds, offset, frames, rows, cols)
    else:
        # keep_deferred: the element's stored length without reading the (deferred) pixel data, which is the
        # whole volume for uncompressed data.
        element = ds.get_item("PixelData", keep_deferred=True) if need_pixels and "PixelData" in ds else None
        length = getattr(element, "length", None)  # a raw (not yet decoded) element knows its stored length
        problem = _native_size_problem(length, ds, frames, rows, cols) if length not in (None, 0xFFFFFFFF) else None
    if problem is not None:
        raise _error(problem, path, csv, row)
    return frames, rows, cols


def _size_in_header(frames: int, rows: int, cols: int) -> str:
    return f"the image size in the DICOM header (Rows {rows}, Columns {cols}, NumberOfFrames {frames}"


def _native_size_problem(length: int, ds, frames: int, rows: int, cols: int) -> str | None:
    """Why ``length`` bytes of uncompressed pixel data do not fit the header's image size, or None. A few bytes
    more (padding to an even length) are fine; a row or more is a wrong Rows, Columns or NumberOfFrames."""
    bits = _int_tag(ds, "BitsAllocated")
    if not bits or bits < 0:
        return None
    expected = (frames * rows * cols * bits + 7) // 8
    if expected <= length < expected + max((cols * bits + 7) // 8, 2):
        return None
    return (f"{_size_in_header(frames, rows, cols)}, BitsAllocated {bits}) does not match its pixel data: "
            f"that size needs {expected} bytes, the file holds {length}")


# JPEG start-of-frame markers (every process, JPEG-LS's SOF55 included): they carry the image size.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def _codestream_size(data: bytes) -> tuple[int, int] | None:
    """(rows, columns) from the start of a JPEG 2000 / HTJ2K, JPEG or JPEG-LS codestream; None when not known."""
    if data[:4] == b"\xff\x4f\xff\x51" and len(data) >= 24:  # SOC, then SIZ: Xsiz, Ysiz, XOsiz, YOsiz
        width, height, x_offset, y_offset = struct.unpack(">IIII", data[8:24])
        return height - y_offset, width - x_offset
    if data[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 9 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_SOF:
            rows, cols = struct.unpack(">HH", data[position + 5:position + 9])
            return (rows, cols) if rows else None  # 0 rows: given later by a DNL marker
        if marker == 0xDA:  # start of scan before any frame header: not a stream we know
            return None
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return None


def _stored_size_problem(path: Path, ds, offset: int, frames: int, rows: int, cols: int) -> str | None:
    """Compare the header's image size with the pixel data element that starts at ``offset``, reading only its
    element header and, when compressed, the first bytes of frame 0: the stored length for uncompressed data,
    the size in the codestream's own header for JPEG, JPEG-LS and JPEG 2000 (RLE does not say)."""
    meta = getattr(ds, "file_meta", None)
    if str(meta.get("TransferSyntaxUID", "") if meta is not None else "") == "1.2.840.10008.1.2.1.99":
        return None  # deflated: file offsets are not dataset offsets
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:
        return None
    order = "<" if little else ">"
    truncated = "no pixel data in the DICOM file (it may be truncated)"
    with open(path, "rb") as handle:
        handle.seek(offset)
        head = handle.read(12)
        if len(head) < 8:
            return truncated
        if struct.unpack(order + "HH", head[:4]) != (0x7FE0, 0x0010):
            return None  # float pixel data, or elements we do not look into
        if implicit:
            length, start = struct.unpack(order + "I", head[4:8])[0], offset + 8
        elif head[4:6] in _LONG_VRS and len(head) == 12:
            length, start = struct.unpack(order + "I", head[8:12])[0], offset + 12
        else:
            length, start = struct.unpack(order + "H", head[6:8])[0], offset + 8
        if length != 0xFFFFFFFF:
            missing = start + length - os.fstat(handle.fileno()).st_size
            if missing > 0:
                return f"the pixel data is cut short ({missing} bytes missing at the end): the file is truncated"
            return _native_size_problem(length, ds, frames, rows, cols)
        handle.seek(start)
        table = handle.read(8)  # the Basic Offset Table item, then the first fragment of frame 0
        if len(table) < 8 or struct.unpack("<HH", table[:4]) != (0xFFFE, 0xE000):
            return None  # malformed encapsulation: the decoder reports it
        handle.seek(struct.unpack("<I", table[4:8])[0], os.SEEK_CUR)
        item = handle.read(8)
        if len(item) < 8:
            return truncated
        if struct.unpack("<HH", item[:4]) != (0xFFFE, 0xE000):
            return "the compressed pixel data holds no frame"
        first = handle.read(min(struct.unpack("<I", item[4:8])[0], 1 << 16))
    found = _codestream_size(first)
    if found is None or found == (rows, cols):
        return None
    return (f"{_size_in_header(frames, rows, cols)}) does not match its compressed pixel data, whose frames "
            f"are {found[0]} x {found[1]} (rows x columns)")


def _sop_name(sop: str) -> str:
    from pydicom.uid import UID

    return UID(sop).name if sop else "no SOP class"


def normalize_modalities(values: Iterable[str] | None) -> tuple[str, ...]:
    """Modality codes as DICOM writes them (upper case, no blanks), without duplicates, in the order given."""
    out: list[str] = []
    for value in values or ():
        code = str(value).strip().upper()
        if code and code not in out:
            out.append(code)
    return tuple(out)


def _vouched(accept_modality: Iterable[str] | None) -> tuple[str, ...]:
    """Modalities the user vouches for (``--accept-modality``): as good as MG for generic X-ray / Secondary
    Capture objects. Passed explicitly: preprocess hands them to its worker processes with each task."""
    return normalize_modalities(accept_modality)


def _check_kind(ds, kind: str, path: Path, csv: Path | None, row: int | None,
                accept_modality: Iterable[str] | None = None) -> None:
    """Refuse clearly foreign objects (CT, MR, RT, ...) for what the caller expects.

    Accepted: the kind's own SOP classes (Breast Tomosynthesis for DBT; Digital Mammography and Breast Projection
    for mammograms) whatever the Modality; generic X-ray / Secondary Capture classes (and DBT given as a
    mammography-type object) only with Modality MG, as real-world conversions often are, or with a Modality the
    user vouches for (``accept_modality``; e.g. RG for digitised
    film stored as Secondary Capture). Other SOP classes are refused whatever the user says.
    """
    meta = getattr(ds, "file_meta", None)
    sop = str(
        ds.get("SOPClassUID", "")
        or (meta.get("MediaStorageSOPClassUID", "") if meta is not None else "")
        or ""
    )
    modality = str(ds.get("Modality", "") or "").strip().upper()
    native, needs_mg = _SOP_RULES[kind]
    if sop in native:
        return
    vouched = _vouched(accept_modality)
    if (sop in needs_mg or not sop) and (modality == "MG" or (modality and modality in vouched)):
        return
    what = "a breast tomosynthesis volume" if kind == "dbt" else "a mammogram"
    hint = ""
    if (sop in needs_mg or not sop) and modality:
        hint = f"; if it is {what}, say so with --accept-modality {modality}"
    raise _error(
        f"SOP class '{_sop_name(sop)}' with Modality '{modality or '?'}' is not {what} "
        f"(expected a mammography/tomosynthesis SOP class, or Modality MG){hint}",
        path,
        csv,
        row,
    )


def _transfer_syntax(ds):
    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID", None) if meta is not None else None


def _has_decoder(syntax) -> bool:
    from pydicom.pixels import get_decoder

    try:
        get_decoder(syntax)
    except NotImplementedError:
        return False
    return True


def decode_problem(exc: BaseException, transfer_syntax) -> str:
    """One line saying why pixel data could not be decoded: 'cannot decode <syntax>: install <package>' when the
    package that decodes the syntax here is missing, 'cannot decode <syntax>: ...' when pydicom 3 has no decoder
    for it at all, else a corrupt or truncated stream with the decoders' own reasons."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    syntax = UID(str(transfer_syntax)) if transfer_syntax else None
    name = syntax.name if syntax is not None else "DICOM"
    if syntax is not None:
        if str(syntax) in PACKAGES:
            package, plugin = PACKAGES[str(syntax)]
            if plugin not in get_decoder(syntax).available_plugins:
                return f"cannot decode {name}: install {package}"
        elif syntax.is_private or not syntax.is_transfer_syntax or (
            syntax.is_encapsulated and not _has_decoder(syntax)
        ):
            return (f"cannot decode {name}: pydicom 3 has no decoder for this transfer syntax; convert the file to "
                    "one of those the README lists")
    return f"corrupt or truncated {name} pixel data ({type(exc).__name__}: {_one_line(exc)})"


def _decode(ds, path: Path, csv: Path | None, row: int | None) -> np.ndarray:
    try:
        return ds.pixel_array
    except MemoryError:
        raise _error("not enough memory to decode the pixel data", path, csv, row) from None
    except Exception as exc:  # noqa: BLE001 - decoders raise ValueError, RuntimeError, struct.error, ...
        raise _error(decode_problem(exc, _transfer_syntax(ds)), path, csv, row) from None


def _first_float(value) -> float | None:
    """First value of a possibly multi-valued DS element as float32 (like the official reader), or None."""
    if value is None:
        return None
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            if len(value) == 0:
                return None
            value = value[0]
        if value == "":
            return None
        with np.errstate(all="ignore"):  # beyond float32: inf, refused by the caller
            return float(np.float32(float(value)))
    except (TypeError, ValueError, OverflowError):
        return math.nan


def _sequence_item(ds, *keywords: str):
    """ds.<kw0>[0].<kw1>[0]...; None when any level is absent or empty."""
    item = ds
    for keyword in keywords:
        sequence = item.get(keyword, None) if item is not None else None
        if not sequence:
            return None
        item = sequence[0]
    return item


def _dbt_window(ds) -> tuple[tuple[float, float] | None, str | None]:
    """((low, high), None) from the first usable window source, (None, problem) if one exists but is unusable,
    (None, None) if there is no window at all."""
    problems = []
    sources = [
        (
            "SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]",
            _sequence_item(ds, "SharedFunctionalGroupsSequence", "FrameVOILUTSequence"),
            None,
        ),
        (
            "PerFrameFunctionalGroupsSequence[0].FrameVOILUTSequence[0]",
            _sequence_item(ds, "PerFrameFunctionalGroupsSequence", "FrameVOILUTSequence"),
            None,
        ),
        ("top-level WindowCenter/WindowWidth", ds, "rescale"),
    ]
    for name, item, rescale in sources:
        if item is None or ("WindowCenter" not in item and "WindowWidth" not in item):
            continue
        center = _first_float(item.get("WindowCenter", None))
        width = _first_float(item.get("WindowWidth", None))
        if (
            center is None
            or width is None
            or not (math.isfinite(center) and math.isfinite(width))
            or width <= 0
        ):
            problems.append(f"{name} is unusable (WindowCenter {center}, WindowWidth {width})")
            continue
        center32, width32 = np.float32(center), np.float32(width)
        # Same float32 arithmetic as the official reader.
        low = float((2 * center32 - width32) / 2)
        high = float((2 * center32 + width32) / 2)
        if rescale:
            slope = _first_float(ds.get("RescaleSlope", None))
            intercept = _first_float(ds.get("RescaleIntercept", None))
            if slope is not None and intercept is not None and math.isfinite(slope) and slope > 0:
                # Top-level windows are in rescaled units; the official mapping acts on stored values.
                low, high = (low - intercept) / slope, (high - intercept) / slope
        if not (math.isfinite(low) and math.isfinite(high)):
            problems.append(f"{name} is not finite in stored values (low {low}, high {high})")
            continue
        if not high > low:
            problems.append(f"{name} has zero width")
            continue
        return (low, high), None
    if problems:
        return None, "; ".join(problems)
    return None, None


def apply_official_window(frame: np.ndarray, low: float, high: float) -> np.ndarray:
    """One frame through the official VOI mapping, as float32 in [0, 1] (official uint16 output / 65535).

    Equivalent to ``rescale_intensity(frame, in_range=(low, high), out_range="dtype") / 65535`` for uint16
    frames: clip to [low, high], scale linearly, truncate to uint16 levels.
    """
    values = np.clip(frame.astype(np.float64), low, high)
    values = (values - low) / (high - low)
    levels = np.asarray(values * _OUT_LEVELS + 0.0, dtype=np.uint16)
    return levels.astype(np.float32) / np.float32(_OUT_LEVELS)


def pixel_laterality(frame: np.ndarray) -> str:
    """The official image-laterality rule on one raw frame: 'R' if first-column sum < last-column sum, else 'L'."""
    accumulate = np.int64 if np.issubdtype(frame.dtype, np.integer) else np.float64
    left = frame[:, 0].sum(dtype=accumulate)
    right = frame[:, -1].sum(dtype=accumulate)
    return "R" if left < right else "L"


# ------------------------------------------------------------------------------------------------- DBT
def read_dbt_header(path: Path) -> tuple[int, int, int]:
    """(slices, rows, cols) from the header only (no pixel decoding), after the sanity and SOP class checks and the
    check of the header's image size against the pixel data stored (:func:`_check_header`)."""
    path = Path(path)
    ds, offset = _read(path, None, None, header_only=True)
    with _header_errors(path, None, None):
        _check_kind(ds, "dbt", path, None, None)
        return _check_header(ds, path, None, None, need_pixels=False, offset=offset)


# JPEG 2000 decoders by preference. Measured on BCS-DBT-size frames (2457 x 1996, 12 bits, lossless) on 2 cores:
# GDCM decodes one frame fastest (0.57 s against 0.75 s) but spends 1.6 cores on it, so with every core busy
# (preprocess workers) pylibjpeg-openjpeg gets 25-30 % more frames through. GDCM stays the fallback and decodes the
# syntaxes openjpeg cannot (JPEG-LS, JPEG lossless, 12-bit JPEG).
DECODERS = ("auto", "pylibjpeg", "gdcm", "pillow")
_J2K_PREFERENCE = ("pylibjpeg", "gdcm", "pillow")


def plugin_for(transfer_syntax, decoder: str) -> str:
    """The pydicom decoding plugin to ask for ('' = pydicom's own choice among the installed ones)."""
    from pydicom.pixels import get_decoder

    try:
        available = set(get_decoder(transfer_syntax)._available)
    except (NotImplementedError, AttributeError, ValueError):
        return ""
    if decoder != "auto":
        return decoder if decoder in available else ""
    if transfer_syntax.is_compressed and "pylibjpeg" in available and "2000" in transfer_syntax.name:
        return next(name for name in _J2K_PREFERENCE if name in available)
    return ""


class DbtFrames:
    """A DBT volume opened for streaming in the official reader's frame; frames are decoded on demand.

    Opening checks the header, decodes raw frame 0 (the official laterality rule reads that frame) and fixes the
    flip and the VOI window; :meth:`frames` then decodes only the frames asked for, one at a time, so memory is one
    raw frame plus one float32 frame whatever the volume's length. Encapsulated (compressed) pixel data stores
    every frame separately, so skipping a frame skips its decoding. The result equals the matching frames of
    :func:`read_dbt_volume` bit for bit.
    """

    def __init__(self, path: Path, view: str | None, *, csv: Path | None = None, row: int | None = None,
                 decoder: str = "auto", accept_modality: Iterable[str] | None = None):
        self.path, self.csv, self.row = Path(path), csv, row
        ds = _read_dataset(self.path, csv, row)
        with _header_errors(self.path, csv, row):
            self._open(ds, view, decoder, accept_modality)

    def _open(self, ds, view: str | None, decoder: str, accept_modality: Iterable[str] | None) -> None:
        csv, row = self.csv, self.row
        self._syntax = _transfer_syntax(ds)
        self.shape = _check_header(ds, self.path, csv, row, need_pixels=True)
        _check_kind(ds, "dbt", self.path, csv, row, accept_modality)
        if view is not None:
            view = view.strip()
            if not view or view[0].upper() not in ("L", "R"):
                raise _error(f"view {view!r} does not start with L or R", self.path, csv, row)
        window, problem = _dbt_window(ds)
        if problem is not None:
            raise _error(f"no usable VOI window: {problem}", self.path, csv, row)
        self._plugin = plugin_for(ds.file_meta.TransferSyntaxUID, decoder) if hasattr(ds, "file_meta") else ""
        self._first = next(self._raw([0]))[1]
        # No view laterality known (predict on a DICOM without laterality tags): the pixels decide, so no flip.
        self.flipped = bool(view) and pixel_laterality(self._first) != view[0].upper()
        if window is None:  # no window anywhere: the whole volume's range, as the all-frames reader takes it
            low, high = float("inf"), float("-inf")
            for _, frame in self._raw(range(self.shape[0])):
                low, high = min(low, float(frame.min())), max(high, float(frame.max()))
            window = (low, high)
        self.window = window
        self._lut = _window_lut(self._first.dtype, *window)

    def _raw(self, indices):
        """Yield (index, raw frame) for ``indices`` (ascending), each checked against the header."""
        from pydicom.pixels import iter_pixels

        indices = list(indices)
        frames, rows, cols = self.shape
        try:
            for index, frame in zip(indices, iter_pixels(self.path, indices=indices, decoding_plugin=self._plugin)):
                if frame.shape != (rows, cols):
                    raise _error(f"decoded frame {index} is {frame.shape[0]} x {frame.shape[-1]} but the DICOM header "
                                 f"says Rows {rows}, Columns {cols}", self.path, self.csv, self.row)
                yield index, frame
        except InputDataError:
            raise
        except MemoryError:
            raise _error("not enough memory to decode the pixel data", self.path, self.csv, self.row) from None
        except Exception as exc:  # noqa: BLE001 - decoders raise ValueError, RuntimeError, struct.error, ...
            raise _error(decode_problem(exc, getattr(self, "_syntax", None)), self.path, self.csv, self.row) from None

    def _official(self, frame: np.ndarray) -> np.ndarray:
        if self.flipped:
            frame = frame[::-1, ::-1]
        low, high = self.window
        if not high > low:
            return np.zeros(frame.shape, np.float32)
        if self._lut is not None:
            offset = -int(np.iinfo(frame.dtype).min)
            return self._lut[frame.astype(np.int64) + offset if offset else frame]
        return apply_official_window(frame, low, high)

    def frames(self, indices=None):
        """Yield ``(index, frame)`` for ``indices`` (default: all) in ascending order; each frame (rows, cols)
        float32 in [0, 1] in the official frame."""
        wanted = sorted({int(i) for i in (range(self.shape[0]) if indices is None else indices)})
        if wanted and not (0 <= wanted[0] and wanted[-1] < self.shape[0]):
            raise _error(f"frames {wanted[0]}..{wanted[-1]} asked for, the volume has {self.shape[0]}",
                         self.path, self.csv, self.row)
        rest = [i for i in wanted if i != 0]
        if wanted and wanted[0] == 0:
            yield 0, self._official(self._first)
        for index, frame in self._raw(rest) if rest else ():
            yield index, self._official(frame)

    def read_all(self) -> np.ndarray:
        """Every frame, (slices, rows, cols) float32: the whole volume in memory (small volumes and tests)."""
        out = np.empty(self.shape, dtype=np.float32)
        for index, frame in self.frames():
            out[index] = frame
        return out


# Integer pixel data of at most 16 bits is windowed through a lookup table over every possible value: the same
# float64 arithmetic as :func:`apply_official_window`, done once per volume instead of once per pixel.


def _window_lut(dtype: np.dtype, low: float, high: float) -> np.ndarray | None:
    dtype = np.dtype(dtype)
    if dtype.kind not in "ui" or dtype.itemsize > 2 or not high > low:
        return None
    info = np.iinfo(dtype)
    values = np.arange(int(info.min), int(info.max) + 1, dtype=np.int64)[np.newaxis]
    return apply_official_window(values, low, high)[0]


def central_frame(reader) -> np.ndarray:
    """The central slice of a frame reader (``shape`` (S, rows, cols), ``frames(indices)`` yielding ``(index,
    frame)``, e.g. :class:`DbtFrames`), decoded now: where the breast is thickest, so its outline is widest."""
    middle = int(reader.shape[0]) // 2
    for _, frame in reader.frames([middle]):
        return frame
    raise RuntimeError(f"frame reader gave no frame {middle}")


def open_dbt(path: Path, view: str | None, *, row: int | None = None, csv: Path | None = None,
             decoder: str = "auto", accept_modality: Iterable[str] | None = None) -> DbtFrames:
    """A DBT volume opened for frame-by-frame reading; see :class:`DbtFrames`."""
    return DbtFrames(path, view, csv=csv, row=row, decoder=decoder, accept_modality=accept_modality)


def read_dbt_volume(path: Path, view: str, *, row: int | None = None, csv: Path | None = None) -> DbtVolume:
    """A DBT volume in the official reader's frame, float32 in [0, 1]; see the module docstring."""
    frames = open_dbt(path, view, row=row, csv=csv)
    return DbtVolume(pixels=frames.read_all(), flipped=frames.flipped, path=Path(path))


# ----------------------------------------------------------------------------------------- mammograms
def _apply_voi_lut_sequence(values: np.ndarray, ds) -> np.ndarray | None:
    """VOILUTSequence[0] applied to modality-LUT output ``values``; None when there is no usable LUT.

    Done here rather than with pydicom's ``apply_voi``, which truncates float input (any rescaled image) and
    builds its indices in the LUT's output dtype, so an 8-bit LUT with more than 256 entries wraps around.
    """
    item = _sequence_item(ds, "VOILUTSequence")
    if item is None or item.get("LUTDescriptor", None) is None or item.get("LUTData", None) is None:
        return None
    descriptor = [int(v) for v in item.LUTDescriptor]
    if len(descriptor) != 3:
        raise ValueError(f"LUTDescriptor has {len(descriptor)} values, 3 expected")
    entries = descriptor[0] or 65536  # 0 means 2**16 (PS3.3 C.11.2.1.1)
    first_mapped = descriptor[1]
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        little = getattr(ds, "original_encoding", (None, True))[1] is not False
        table = np.frombuffer(bytes(data), dtype="<u2" if little else ">u2").astype(np.float64)
    else:
        table = np.atleast_1d(np.asarray(data, dtype=np.float64))
    if table.size < entries:
        raise ValueError(f"LUTData has {table.size} entries, LUTDescriptor says {entries}")
    index = np.clip(np.rint(values) - first_mapped, 0, entries - 1).astype(np.int64)
    return table[:entries][index]


def _mammogram_from_dataset(ds, path: Path, csv: Path | None, row: int | None) -> np.ndarray:
    frames, _, _ = _check_header(ds, path, csv, row, need_pixels=True)
    if frames != 1:
        raise _error(f"has {frames} frames; a mammogram has one", path, csv, row)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise _error(
            f"PhotometricInterpretation {photometric or '?'}; MONOCHROME1/2 expected", path, csv, row
        )
    pixels = _decode(ds, path, csv, row)
    if pixels.ndim == 3 and pixels.shape[0] == 1:
        pixels = pixels[0]
    if pixels.ndim != 2:
        raise _error(f"decoded pixel data has shape {pixels.shape}; a 2-D image is expected", path, csv, row)
    try:  # absurd slopes or windows overflow: numpy stays quiet, the finiteness check below says what is wrong
        with np.errstate(all="ignore"):
            values = _voi_output(pixels, ds)
    except Exception as exc:  # noqa: BLE001 - pydicom raises ValueError/TypeError/KeyError for bad LUTs
        raise _error(f"invalid modality/VOI transform: {_one_line(exc)}", path, csv, row) from None
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise _error("pixel values are not finite after the modality/VOI transform", path, csv, row)
    low, high = float(values.min()), float(values.max())
    if not math.isfinite(high - low):
        raise _error(f"pixel values span an absurd range after the modality/VOI transform ({low:g} to {high:g})",
                     path, csv, row)
    if high > low:
        image = ((values - low) / (high - low)).astype(np.float32)
    else:
        image = np.zeros(values.shape, dtype=np.float32)
    if photometric == "MONOCHROME1":
        image = np.float32(1.0) - image
    return image


def _voi_output(pixels: np.ndarray, ds) -> np.ndarray:
    """Stored values through the modality LUT (rescale) and the VOI transform."""
    from pydicom.pixels import apply_modality_lut, apply_windowing

    values = apply_modality_lut(pixels, ds)
    # VOI LUT preferred over the window when both are present, as pydicom's apply_voi_lut does.
    lut_output = _apply_voi_lut_sequence(values, ds)
    if lut_output is not None:
        return lut_output
    if ds.get("WindowCenter", None) is not None and ds.get("WindowWidth", None) is not None:
        return apply_windowing(values, ds, index=0)
    return values


def read_mammogram(path: Path, *, row: int | None = None, csv: Path | None = None,
                   accept_modality: Iterable[str] | None = None) -> np.ndarray:
    """(rows, cols) float32 in [0, 1], bright = dense tissue, in the stored frame (no flip).

    Normalisation is min-max after the VOI transform (windows saturate the background, so this is the window's
    output range in practice; images without VOI are stretched to their own range). ``accept_modality``: the
    modalities the user vouches for (see :func:`_check_kind`).
    """
    path = Path(path)
    ds = _read_dataset(path, csv, row)
    with _header_errors(path, csv, row):
        _check_header(ds, path, csv, row, need_pixels=True)
        _check_kind(ds, "mammo", path, csv, row, accept_modality)
        return _mammogram_from_dataset(ds, path, csv, row)


def read_mammo_header(path: Path, *, row: int | None = None, csv: Path | None = None,
                      accept_modality: Iterable[str] | None = None) -> tuple[int, int, int]:
    """(1, rows, cols) from the header only (no pixel decoding): the checks of :func:`read_dbt_header` for a
    mammogram (absurd sizes such as Rows 0, a size that does not match the pixel data stored, SOP class and
    Modality), so a bad header is blamed on the DICOM before any box is compared with it."""
    path = Path(path)
    ds, offset = _read(path, csv, row, header_only=True)
    with _header_errors(path, csv, row):
        _check_kind(ds, "mammo", path, csv, row, accept_modality)
        frames, rows, cols = _check_header(ds, path, csv, row, need_pixels=False, offset=offset)
        if frames != 1:
            raise _error(f"has {frames} frames; a mammogram has one", path, csv, row)
        return 1, rows, cols


# -------------------------------------------------------------------------------------- any DICOM file
_VIEW_CODES = {
    "cc": ("cranio-caudal", "craniocaudal", "R-10242", "399162004"),
    "mlo": ("medio-lateral oblique", "mediolateral oblique", "R-10226", "399368009"),
}


def view_from_dataset(ds) -> tuple[str, str]:
    """(laterality 'l'/'r' or '', view position 'cc'/'mlo'/... or '') from the DICOM tags."""
    laterality = ""
    candidates = [ds.get("ImageLaterality", None), ds.get("Laterality", None)]
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        anatomy = _sequence_item(ds, group, "FrameAnatomySequence")
        if anatomy is not None:
            candidates.append(anatomy.get("FrameLaterality", None))
    for value in candidates:
        text = str(value or "").strip().upper()
        if text in ("L", "R"):
            laterality = text.lower()
            break
    position = str(ds.get("ViewPosition", "") or "").strip().lower()
    if not position:
        code = _sequence_item(ds, "ViewCodeSequence")
        if code is not None:
            meaning = str(code.get("CodeMeaning", "") or "").lower()
            value = str(code.get("CodeValue", "") or "")
            for name, keys in _VIEW_CODES.items():
                if meaning in keys or value in keys:
                    position = name
    return laterality, position


def _is_dbt(ds, frames: int) -> bool:
    sop = str(ds.get("SOPClassUID", "") or "")
    return frames > 1 or sop == _BREAST_TOMO


def open_dicom_image(path: Path, *, view: str | None = None, decoder: str = "auto",
                     accept_modality: Iterable[str] | None = None) -> tuple[DbtFrames | np.ndarray, str]:
    """Any DBT or mammography DICOM for ``comoto predict``: (image, kind).

    kind 'dbt': a :class:`DbtFrames` (frames decoded on demand) in the official frame; the view laterality comes
    from ``view`` when given, else ImageLaterality/Laterality/FrameLaterality; when unknown the pixel laterality
    is used, so no flip. kind 'mammo': (rows, cols) float32 as :func:`read_mammogram`. ``accept_modality``: the
    modalities the user vouches for.
    """
    path = Path(path)
    accept_modality = _vouched(accept_modality)
    ds = _read_dataset(path, None, None)
    with _header_errors(path, None, None):
        frames, _, _ = _check_header(ds, path, None, None, need_pixels=True)
        if _is_dbt(ds, frames):
            _check_kind(ds, "dbt", path, None, None, accept_modality)
            if not view:
                laterality, position = view_from_dataset(ds)
                view = laterality + position if laterality else None
        else:
            _check_kind(ds, "mammo", path, None, None, accept_modality)
            return _mammogram_from_dataset(ds, path, None, None), "mammo"
    return open_dbt(path, view, decoder=decoder, accept_modality=accept_modality), "dbt"


def read_dicom_image(path: Path, *, view: str | None = None,
                     accept_modality: Iterable[str] | None = None) -> tuple[np.ndarray, str]:
    """:func:`open_dicom_image` with a DBT volume read whole: (slices, rows, cols) float32."""
    image, kind = open_dicom_image(path, view=view, accept_modality=accept_modality)
    return (image.read_all() if kind == "dbt" else image), kind
