"""Pixel data decoders: every transfer syntax pydicom 3 can decode, with the same plugin order on every machine.

The project's dependencies decode every syntax that pydicom 3 has a decoder for (measured on a 12-bit
mammogram crop encoded in each syntax, and on the two NEMA MG1 files in ``shared/data/real-mammograms``):

* uncompressed, deflated and RLE Lossless: pydicom itself;
* JPEG 2000 (lossless and lossy) and HTJ2K: pylibjpeg-openjpeg (also Pillow and GDCM for JPEG 2000);
* JPEG Baseline, JPEG Extended (8 and 12 bit), JPEG Lossless (process 14 and its selection value 1), JPEG-LS
  (lossless and near-lossless): python-gdcm (also Pillow for 8-bit JPEG).

pydicom's own GDCM plugin refuses 12-bit JPEG Extended, although GDCM decodes it (equal, within one or two levels
of IDCT rounding, to the strict ISO libjpeg decoder where that one accepts the stream), and GDCM's C library prints
its diagnostics ("Unsupported JPEG data precision 12", "A marker ID was expected ...") straight onto the process's
stderr, which broke the CLI's one-line errors. :func:`register` (idempotent, once per process, called by the
readers) therefore replaces pydicom's GDCM plugin, under the same name ``gdcm``, with :func:`decode_frame`: the same
decoding, 12-bit JPEG Extended included, with GDCM's messages captured (and put into the exception when the frame
cannot be decoded), and moved to the end of each syntax's list, so pylibjpeg-openjpeg (then Pillow) decodes JPEG
2000 everywhere and GDCM is the fallback. ``--decoder gdcm`` still asks for it by name.

:data:`PACKAGES` says which package a syntax needs; the readers name it in their one-line error when it is missing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

LABEL = "gdcm"  # the plugin name pydicom and ``--decoder`` know GDCM by

# Transfer syntax UID -> (package that decodes it here, the plugin name that package registers in pydicom).
_J2K = ("pylibjpeg-openjpeg", "pylibjpeg")
_GDCM = ("python-gdcm", LABEL)
PACKAGES: dict[str, tuple[str, str]] = {
    "1.2.840.10008.1.2.4.50": _GDCM,  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": _GDCM,  # JPEG Extended (Process 2 and 4), 8 and 12 bit
    "1.2.840.10008.1.2.4.57": _GDCM,  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70": _GDCM,  # JPEG Lossless, process 14 selection value 1
    "1.2.840.10008.1.2.4.80": _GDCM,  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _GDCM,  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": _J2K,  # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.91": _J2K,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _J2K,  # HTJ2K (Lossless Only)
    "1.2.840.10008.1.2.4.202": _J2K,  # HTJ2K with RPCL Options (Lossless Only)
    "1.2.840.10008.1.2.4.203": _J2K,  # HTJ2K
}
_JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"

_registered = False


# ------------------------------------------------------------------------------------ pydicom plugin protocol
def is_available(uid: str) -> bool:
    """Whether :func:`decode_frame` can decode ``uid`` (GDCM installed and the syntax one GDCM decodes)."""
    try:
        from pydicom.pixels.decoders import gdcm as pydicom_gdcm
    except ImportError:  # pragma: no cover - pydicom 3 has it
        return False
    return bool(pydicom_gdcm.is_available(uid))


# Read by pydicom only when a plugin is unavailable, which :func:`register` never adds.
DECODER_DEPENDENCIES = {uid: ("gdcm>=3.0.10",) for uid in PACKAGES}


@contextlib.contextmanager
def _native_stderr() -> Iterator[list[str]]:
    """Capture what C libraries write to file descriptor 2 meanwhile; the text lands in the yielded list."""
    captured: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (embedded interpreters): nothing to capture
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(" ".join(sink.read().decode("utf-8", "replace").split()))


def _gdcm_12_bit_jpeg(src: bytes, runner) -> bytes:
    """One 12-bit JPEG Extended frame through GDCM (pydicom's plugin refuses that precision; GDCM decodes it)."""
    import gdcm

    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(element)
    kind = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(kind))
    if runner.samples_per_pixel > 1:
        image.SetPlanarConfiguration(runner.planar_configuration)
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(_JPEG_EXTENDED)))
    bits = runner.bits_stored
    image.SetPixelFormat(gdcm.PixelFormat(runner.samples_per_pixel, runner.bits_allocated, bits, bits - 1,
                                          runner.pixel_representation))
    buffer = image.GetBuffer()
    if buffer is None:
        raise ValueError("GDCM could not decode the frame")
    return buffer.encode("utf-8", "surrogateescape")  # GDCM hands bytes back as a surrogate-escaped str


def decode_frame(src: bytes, runner) -> bytes:
    """pydicom decoding plugin: one frame through GDCM, its C library's messages kept off the terminal."""
    from pydicom.pixels.decoders import gdcm as pydicom_gdcm

    error: Exception | None = None
    frame = None
    with _native_stderr() as captured:
        try:
            if str(runner.transfer_syntax) == _JPEG_EXTENDED and runner.bits_stored > 8:
                frame = _gdcm_12_bit_jpeg(src, runner)
            else:
                frame = pydicom_gdcm._decode_frame(src, runner)
        except Exception as exc:  # noqa: BLE001 - re-raised below with GDCM's own diagnostic
            error = exc
    if error is None:
        return frame
    said = captured[0] if captured else ""
    reason = str(error)
    if isinstance(error, AttributeError) and "NoneType" in reason:  # GetBuffer() gave nothing back
        reason = "GDCM could not decode the frame"
    raise ValueError(f"{reason} ({said})" if said else reason) from None


def register() -> None:
    """Put :func:`decode_frame` in place of pydicom's GDCM plugin, last in each syntax's list (see the module)."""
    global _registered
    if _registered:
        return
    _registered = True
    from pydicom.pixels import get_decoder

    for uid in PACKAGES:
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:  # pragma: no cover - every syntax listed has a pydicom decoder
            continue
        if LABEL not in decoder.available_plugins or not is_available(uid):
            continue
        decoder.remove_plugin(LABEL)
        decoder.add_plugin(LABEL, (__name__, "decode_frame"))
