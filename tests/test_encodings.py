"""Every standard DICOM encoding decodes out of the box; an undecodable one is one line naming what to install; the
two real mammograms of ``shared/data/real-mammograms`` (JPEG 2000 and 12-bit JPEG Extended, Secondary Capture with
Modality RG) are read like pydicom / GDCM read them, refused by default and accepted with ``--accept-modality RG``.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    generate_uid,
)

from comoto_cli.cli import main
from comoto_cli.data import decoders, dicom_io
from comoto_cli.errors import InputDataError

README = Path(__file__).resolve().parents[1] / "README.md"


def _gdcm_whole_file(path: Path, like: np.ndarray) -> np.ndarray:
    """The pixels as GDCM's own whole-file reader decodes them, shaped and typed like ``like``."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    assert reader.Read()
    buffer = reader.GetImage().GetBuffer().encode("utf-8", "surrogateescape")
    return np.frombuffer(buffer, dtype=like.dtype).reshape(like.shape)


# ------------------------------------------------------------------------------------------------ builders
def _mammogram(path: Path, pixels: np.ndarray, bits: int = 12) -> Path:
    """An uncompressed Digital Mammography (For Presentation) file, Modality MG."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.PatientID = "P1"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8 if bits == 8 else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _breast(rows: int = 96, cols: int = 80, bits: int = 12) -> np.ndarray:
    """A smooth image with texture (so lossy codecs stay close) in ``bits`` bits."""
    y, x = np.mgrid[0:rows, 0:cols]
    top = 2**bits - 1
    image = top * (0.55 + 0.35 * np.sin(x / 9.0) * np.cos(y / 13.0)) * (x < cols * 0.8)
    image += np.random.default_rng(3).integers(0, max(top // 64, 2), size=(rows, cols))
    return np.clip(image, 0, top).astype(np.uint16)


def gdcm_encode(source: Path, destination: Path, syntax: str) -> Path:
    """``source`` re-encoded by GDCM in ``syntax`` (its name in ``gdcm.TransferSyntax``)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change(), f"GDCM cannot encode {syntax}"
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(destination))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return destination


# GDCM's name -> (transfer syntax UID, lossless, bits). HTJ2K has no encoder here; its decoder is checked below.
ENCODINGS = {
    "JPEGBaselineProcess1": ("1.2.840.10008.1.2.4.50", False, 8),
    "JPEGLosslessProcess14": ("1.2.840.10008.1.2.4.57", True, 12),
    "JPEGLosslessProcess14_1": ("1.2.840.10008.1.2.4.70", True, 12),
    "JPEGLSLossless": ("1.2.840.10008.1.2.4.80", True, 12),
    "JPEGLSNearLossless": ("1.2.840.10008.1.2.4.81", False, 12),
    "JPEG2000Lossless": ("1.2.840.10008.1.2.4.90", True, 12),
    "JPEG2000": ("1.2.840.10008.1.2.4.91", False, 12),
    "RLELossless": ("1.2.840.10008.1.2.5", True, 12),
}


# ------------------------------------------------------------------------------------------- every encoding
@pytest.mark.parametrize("name", list(ENCODINGS))
def test_every_encoding_decodes_like_the_uncompressed_image(tmp_path, name):
    uid, lossless, bits = ENCODINGS[name]
    native = _mammogram(tmp_path / "native.dcm", _breast(bits=bits), bits=bits)
    encoded = gdcm_encode(native, tmp_path / f"{name}.dcm", name)
    assert pydicom.dcmread(encoded, stop_before_pixels=True).file_meta.TransferSyntaxUID == uid
    expected = dicom_io.read_mammogram(native)
    got = dicom_io.read_mammogram(encoded)
    if lossless:
        np.testing.assert_array_equal(got, expected)
    else:
        assert np.abs(got - expected).max() < 0.05 and np.abs(got - expected).mean() < 0.01


@pytest.mark.parametrize("name", ["JPEG-lossy.dcm", "JPGExtended.dcm"])
def test_12_bit_jpeg_extended_decodes_with_gdcm(name):
    """pydicom's own GDCM plugin refuses 12-bit JPEG Extended and Pillow cannot: ours decodes it, equal to GDCM's
    whole-file reader. JPEG-lossy.dcm (pydicom's test file) has the start-of-scan Se=0 that strict decoders refuse,
    like the real MG1_JPLY mammogram."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    decoders.register()
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51" and ds.BitsStored == 12
    got = pixel_array(path)
    np.testing.assert_array_equal(got, _gdcm_whole_file(path, got))
    assert 0 < got.max() < 4096


def test_the_documented_decoder_of_every_syntax_is_installed_and_gdcm_comes_last():
    decoders.register()
    for uid, (package, plugin) in decoders.PACKAGES.items():
        decoder = get_decoder(uid)
        assert plugin in decoder.available_plugins, f"{uid}: {package} missing ({decoder.missing_dependencies})"
        if decoders.LABEL in decoder.available_plugins:
            assert list(decoder._available)[-1] == decoders.LABEL  # GDCM is the fallback everywhere


def test_readme_lists_every_supported_transfer_syntax():
    from pydicom.uid import UID

    text = README.read_text()
    for uid in [*decoders.PACKAGES, "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"]:
        assert uid in text, f"README does not list {UID(uid).name} ({uid})"


# ------------------------------------------------------------------------------- undecodable: one clear line
def _manifest(root: Path, *names: str) -> Path:
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient_id", "xmin", "ymin", "xmax", "ymax"])
        for index, name in enumerate(names):
            writer.writerow([name, f"p{index}", "", "", "", ""])
    return manifest


def _preprocess(root: Path, out: Path, *extra: str) -> list[str]:
    return ["preprocess", "mammo", str(root), "--manifest-csv", str(root / "manifest.csv"), "--out", str(out),
            "--image-height", "32", "--image-width", "32", "--workers", "1", "--no-progress", *extra]


def _run(argv: list[str], capfd) -> tuple[int, str]:
    """The command in this process; stderr as the terminal gets it (file descriptor 2, C libraries included)."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    return info.value.code, capfd.readouterr().err


def test_missing_decoder_package_is_one_line_naming_it(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("COMOTO_DEBUG", raising=False)
    root = tmp_path / "data"
    root.mkdir()
    native = _mammogram(tmp_path / "native.dcm", _breast())
    gdcm_encode(native, root / "a.dcm", "JPEGLSLossless")
    _manifest(root, "a.dcm")
    decoders.register()
    # As on a machine without python-gdcm and pyjpegls (highdicom's dependency): JPEG-LS has no decoder left.
    decoder = get_decoder(JPEGLSLossless)
    monkeypatch.setattr(decoder, "_available",
                        {k: v for k, v in decoder._available.items() if k not in ("gdcm", "pyjpegls")})
    out = tmp_path / "out" / "m.h5"
    code, err = _run(_preprocess(root, out), capfd)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert "a.dcm" in lines[0] and "manifest.csv" in lines[0] and "row 2" in lines[0]
    assert "cannot decode JPEG-LS Lossless Image Compression: install python-gdcm" in lines[0]
    assert "corrupt" not in lines[0] and not out.exists()
    with pytest.raises(InputDataError, match="install python-gdcm"):
        dicom_io.read_mammogram(root / "a.dcm")


def test_corrupt_stream_is_one_line_even_when_gdcm_talks(tmp_path, capfd, monkeypatch):
    """GDCM's C library prints its own diagnostics on file descriptor 2; they end up inside the one error line."""
    from pydicom.encaps import encapsulate, generate_frames

    monkeypatch.delenv("COMOTO_DEBUG", raising=False)
    root = tmp_path / "data"
    root.mkdir()
    encoded = gdcm_encode(_mammogram(tmp_path / "native.dcm", _breast()), tmp_path / "j2k.dcm", "JPEG2000Lossless")
    ds = pydicom.dcmread(encoded)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: int(len(frame) * 0.4)]])  # every decoder fails, GDCM with a message
    ds.save_as(root / "cut.dcm", enforce_file_format=True)
    _manifest(root, "cut.dcm")
    out = tmp_path / "out" / "m.h5"
    code, err = _run(_preprocess(root, out), capfd)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert "cut.dcm" in lines[0] and "row 2" in lines[0] and "corrupt or truncated JPEG 2000" in lines[0]
    assert not out.exists()


# ----------------------------------------------------------------------------------------- real mammograms
def _voi_min_max(pixels: np.ndarray, ds) -> np.ndarray:
    """pydicom's own modality + VOI transform, then min-max to [0, 1] (the readers' documented output)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float64)
    return ((values - values.min()) / (values.max() - values.min())).astype(np.float32)


def test_real_mammograms_decode_as_pydicom_and_gdcm_do(real):

    j2k, jply = real / "MG1_J2KI.dcm", real / "MG1_JPLY.dcm"
    decoders.register()
    ds = pydicom.dcmread(j2k)
    assert (ds.Rows, ds.Columns, ds.BitsStored, ds.Modality) == (4664, 3064, 12, "RG")
    raw_j2k = pixel_array(j2k, decoding_plugin="pylibjpeg")
    image = dicom_io.read_mammogram(j2k, accept_modality=["RG"])
    np.testing.assert_allclose(image, _voi_min_max(raw_j2k, ds), atol=1e-6)

    # 12-bit JPEG Extended: pydicom's own plugins refuse it (and the stream's Se=0 stops a strict decoder);
    # ours is GDCM's decoding, bit for bit as GDCM's whole-file reader gives it.
    raw_jply = pixel_array(jply)
    np.testing.assert_array_equal(raw_jply, _gdcm_whole_file(jply, raw_jply))
    # Two lossy encodings of one mammogram: the same picture within the codecs' loss.
    difference = np.abs(raw_jply.astype(np.int32) - raw_j2k.astype(np.int32))
    assert difference.mean() < 0.01 * 4095 and np.corrcoef(raw_jply.ravel(), raw_j2k.ravel())[0, 1] > 0.999
    image = dicom_io.read_mammogram(jply, accept_modality=["RG"])
    np.testing.assert_allclose(image, _voi_min_max(raw_jply, pydicom.dcmread(jply)), atol=1e-6)


def test_real_mammograms_through_preprocess_manifest(real, tmp_path, capfd, monkeypatch):
    """Refused by default (Secondary Capture, Modality RG) with one line naming the flag; with --accept-modality RG
    both are cached, each image equal to pydicom's / GDCM's decoding through the same window and resize."""
    from comoto_cli.transforms.resize import resize_area

    monkeypatch.delenv("COMOTO_DEBUG", raising=False)
    _manifest(real, "MG1_J2KI.dcm", "MG1_JPLY.dcm")
    out = tmp_path / "out" / "real.h5"
    argv = ["preprocess", "mammo", str(real), "--manifest-csv", str(real / "manifest.csv"), "--out", str(out),
            "--image-height", "256", "--image-width", "128", "--workers", "1", "--no-progress"]
    code, err = _run(argv, capfd)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert "MG1_J2KI.dcm" in lines[0] and "row 2" in lines[0] and "'RG'" in lines[0]
    assert "--accept-modality RG" in lines[0] and not out.exists()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        code, err = _run([*argv, "--accept-modality", "RG"], capfd)
    assert code == 0, err
    decoders.register()
    with h5py.File(out, "r") as handle:
        sources = [s.decode() if isinstance(s, bytes) else str(s) for s in handle["volumes/source"][()]]
        images = handle["slices/images"][()]
        owner = handle["slices/volume"][()]
        config = handle.attrs["config_json"]
    assert sorted(sources) == ["MG1_J2KI.dcm", "MG1_JPLY.dcm"] and '"RG"' in str(config)
    for volume, name in enumerate(sources):
        path = real / name
        expected = _voi_min_max(pixel_array(path), pydicom.dcmread(path))
        cached = images[np.flatnonzero(owner == volume)[0]].astype(np.float32)
        resized = np.clip(resize_area(expected, 256, 128), 0, 1).astype(np.float16).astype(np.float32)
        np.testing.assert_allclose(cached, resized, atol=2e-3)


def test_real_mammogram_through_predict(real, tmp_path, tiny_teacher, capfd, monkeypatch):
    monkeypatch.delenv("COMOTO_DEBUG", raising=False)
    out = tmp_path / "out" / "detections.csv"
    argv = ["predict", "--checkpoint", str(tiny_teacher), str(real / "MG1_J2KI.dcm"), "--out", str(out)]
    code, err = _run(argv, capfd)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert "MG1_J2KI.dcm" in lines[0] and "--accept-modality RG" in lines[0] and not out.exists()
    code, err = _run([*argv, "--accept-modality", "rg"], capfd)
    assert code == 0, err
    header = out.read_text().splitlines()[0]
    assert header.startswith("PatientID,StudyUID,View") and header.endswith("path")
