"""DICOM readers: official BCS-DBT frame and windowing, mammogram VOI/inversion, and every bad-input path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    BreastTomosynthesisImageStorage,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from comoto_cli.data import dicom_io
from comoto_cli.data.dicom_io import (
    read_dbt_header,
    read_dbt_volume,
    read_dicom_image,
    read_mammogram,
    view_from_dataset,
)
from comoto_cli.errors import InputDataError

RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------------------------------ builders
def _base(pixels: np.ndarray, sop: str, modality: str | None, bits_stored: int = 12) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = sop
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    if modality is not None:
        ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    return ds


def make_dbt(
    path: Path,
    volume: np.ndarray,
    center=None,
    width=None,
    *,
    where: str = "shared",
    sop: str = BreastTomosynthesisImageStorage,
    modality: str | None = "MG",
    frames_tag: bool = True,
    compress: bool = False,
    **tags,
) -> Path:
    """A multi-frame DBT file; the window goes into the shared functional group ('shared'), the per-frame
    group ('perframe'), the top level ('top') or nowhere (center None)."""
    ds = _base(volume, sop, modality)
    if frames_tag:
        ds.NumberOfFrames = volume.shape[0]
    if center is not None or width is not None:
        voi = Dataset()
        if center is not None:
            voi.WindowCenter = center
        if width is not None:
            voi.WindowWidth = width
        if where == "shared":
            group = Dataset()
            group.FrameVOILUTSequence = [voi]
            ds.SharedFunctionalGroupsSequence = [group]
        elif where == "perframe":
            frames = []
            for _ in range(volume.shape[0]):
                group = Dataset()
                group.FrameVOILUTSequence = [voi]
                frames.append(group)
            ds.PerFrameFunctionalGroupsSequence = frames
        else:
            if center is not None:
                ds.WindowCenter = center
            if width is not None:
                ds.WindowWidth = width
    for key, value in tags.items():
        setattr(ds, key, value)
    if compress:
        ds.compress(JPEG2000Lossless)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_mammo(
    path: Path,
    image: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    sop: str = DigitalMammographyXRayImageStorageForPresentation,
    modality: str | None = "MG",
    compress: bool = False,
    **tags,
) -> Path:
    ds = _base(image, sop, modality)
    ds.PhotometricInterpretation = photometric
    for key, value in tags.items():
        setattr(ds, key, value)
    if compress:
        ds.compress(JPEG2000Lossless)
    ds.save_as(path, enforce_file_format=True)
    return path


def breast_volume(slices: int = 3, rows: int = 12, cols: int = 10, side: str = "left") -> np.ndarray:
    """Random 12-bit volume whose bright (breast) side is on ``side`` in every frame."""
    volume = RNG.integers(0, 300, size=(slices, rows, cols)).astype(np.uint16)
    ramp = np.linspace(3500, 0, cols).astype(np.uint16)
    volume += ramp if side == "left" else ramp[::-1]
    return volume


# ------------------------------------------------------------- independent reference of the official rule
def _skimage_rescale_dtype(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """skimage.exposure.rescale_intensity(image, in_range=(low, high), out_range='dtype') re-derived from its
    definition: output dtype = input dtype, output range = the dtype's range (min 0 when low >= 0), clip, scale,
    cast (truncation)."""
    out_dtype = image.dtype.type
    imin, imax = float(low), float(high)
    info = np.iinfo(out_dtype)
    omin, omax = float(0 if imin >= 0 else info.min), float(info.max)
    clipped = np.clip(image, imin, imax)
    if imin != imax:
        scaled = (clipped - imin) / (imax - imin)
        return np.asarray(scaled * (omax - omin) + omin, dtype=out_dtype)
    return np.clip(clipped, omin, omax).astype(out_dtype)


def official_reference(volume: np.ndarray, view: str, center: float, width: float) -> np.ndarray:
    """What the official ``dcmread_image`` returns (uint16), written independently from its description."""
    first = volume[0]
    image_laterality = "R" if np.sum(first[:, 0]) < np.sum(first[:, -1]) else "L"
    array = volume
    if image_laterality != view[0].upper():
        array = np.flip(array, axis=(-1, -2))
    c, w = np.float32(center), np.float32(width)
    return _skimage_rescale_dtype(array, (2 * c - w) / 2, (2 * c + w) / 2)


def as_levels(pixels: np.ndarray) -> np.ndarray:
    return np.rint(pixels.astype(np.float64) * 65535).astype(np.uint16)


# ------------------------------------------------------------------------------------------- DBT frame
@pytest.mark.parametrize("view", ["lcc", "rmlo"])
def test_dbt_matches_official_rule(tmp_path, view):
    volume = breast_volume(side="left")
    center, width = 1700.3, 2100.7  # not representable in float32: the reader must cast like the official one
    path = make_dbt(tmp_path / "v.dcm", volume, center, width)
    result = read_dbt_volume(path, view)
    assert result.pixels.dtype == np.float32 and result.pixels.shape == volume.shape
    assert result.flipped == (view[0] == "r")
    reference = official_reference(volume, view, center, width)
    np.testing.assert_array_equal(as_levels(result.pixels), reference)
    np.testing.assert_allclose(result.pixels, reference / 65535.0, atol=1e-7)


def test_mirrored_volume_comes_back_rotated(tmp_path):
    official = breast_volume(slices=2, side="right")  # a right breast as the official frame shows it
    official[1, 3, 8] = 4000  # a "lesion" marker in slice 1
    stored = np.ascontiguousarray(official[:, ::-1, ::-1])  # stored rotated by 180 degrees
    path = make_dbt(tmp_path / "v.dcm", stored, 2048, 4096)
    result = read_dbt_volume(path, "rcc")
    assert result.flipped
    expected = read_dbt_volume(make_dbt(tmp_path / "o.dcm", official, 2048, 4096), "rcc")
    assert not expected.flipped
    np.testing.assert_array_equal(result.pixels, expected.pixels)
    assert np.unravel_index(np.argmax(result.pixels[1]), result.pixels[1].shape) == (3, 8)


def test_window_clipping_values_exact(tmp_path):
    volume = np.array([[[400, 500, 1000, 1500, 1600, 750]]], dtype=np.uint16).repeat(2, axis=1)
    volume[0, :, 0] = 4000  # bright first column: pixel laterality 'L', no flip for an L view
    path = make_dbt(tmp_path / "v.dcm", volume, 1000, 1000)  # window [500, 1500]
    pixels = read_dbt_volume(path, "lmlo").pixels[0, 0]
    expected_levels = [65535, 0, int(0.5 * 65535), 65535, 65535, int(0.25 * 65535)]
    np.testing.assert_array_equal(as_levels(pixels), expected_levels)
    assert pixels[1] == 0.0 and pixels[3] == 1.0


def test_laterality_is_read_from_frame_zero(tmp_path):
    volume = breast_volume(slices=3, side="left")
    volume[1:] = volume[1:, :, ::-1]  # later frames disagree: only frame 0 counts
    path = make_dbt(tmp_path / "v.dcm", volume, 2048, 4096)
    assert not read_dbt_volume(path, "lcc").flipped
    assert read_dbt_volume(path, "rcc").flipped


def test_tie_in_edge_sums_means_left(tmp_path):
    volume = np.full((1, 4, 4), 100, dtype=np.uint16)
    path = make_dbt(tmp_path / "v.dcm", volume, 100, 50)
    assert not read_dbt_volume(path, "lcc").flipped
    assert read_dbt_volume(path, "rcc").flipped


def test_multivalued_window_takes_first(tmp_path):
    volume = breast_volume()
    path = make_dbt(tmp_path / "v.dcm", volume, [1500, 3000], [1000, 200])
    np.testing.assert_array_equal(
        as_levels(read_dbt_volume(path, "lcc").pixels), official_reference(volume, "lcc", 1500, 1000)
    )


def test_single_frame_dbt(tmp_path):
    volume = breast_volume(slices=1)
    path = make_dbt(tmp_path / "v.dcm", volume, 2000, 3000, frames_tag=False)
    result = read_dbt_volume(path, "lcc")
    assert result.pixels.shape == (1, 12, 10)
    np.testing.assert_array_equal(as_levels(result.pixels), official_reference(volume, "lcc", 2000, 3000))
    assert read_dbt_header(path) == (1, 12, 10)


@pytest.mark.parametrize("where", ["perframe", "top"])
def test_window_fallbacks(tmp_path, where):
    volume = breast_volume()
    path = make_dbt(tmp_path / "v.dcm", volume, 1800, 2500, where=where)
    np.testing.assert_array_equal(
        as_levels(read_dbt_volume(path, "lcc").pixels), official_reference(volume, "lcc", 1800, 2500)
    )


def test_top_level_window_in_rescaled_units(tmp_path):
    volume = breast_volume()
    # Rescaled value = 2 * stored - 100, so a window [3400, 5400] in rescaled units is [1750, 2750] stored.
    path = make_dbt(
        tmp_path / "v.dcm", volume, 4400, 2000, where="top", RescaleSlope=2, RescaleIntercept=-100
    )
    np.testing.assert_array_equal(
        as_levels(read_dbt_volume(path, "lcc").pixels), official_reference(volume, "lcc", 2250, 1000)
    )


def test_no_window_uses_min_max(tmp_path):
    volume = breast_volume()
    path = make_dbt(tmp_path / "v.dcm", volume)
    pixels = read_dbt_volume(path, "lcc").pixels
    low, high = float(volume.min()), float(volume.max())
    np.testing.assert_array_equal(as_levels(pixels), _skimage_rescale_dtype(volume, low, high))
    assert pixels.min() == 0.0 and pixels.max() == 1.0


def test_dbt_jpeg2000_equals_uncompressed(tmp_path):
    volume = breast_volume(slices=2, rows=40, cols=36, side="right")  # openjpeg needs >= ~32 px per side
    plain = read_dbt_volume(make_dbt(tmp_path / "a.dcm", volume, 2000, 3000), "lcc")
    j2k_path = make_dbt(tmp_path / "b.dcm", volume, 2000, 3000, compress=True)
    assert pydicom.dcmread(j2k_path).file_meta.TransferSyntaxUID == JPEG2000Lossless
    j2k = read_dbt_volume(j2k_path, "lcc")
    assert plain.flipped and j2k.flipped
    np.testing.assert_array_equal(plain.pixels, j2k.pixels)


def test_dbt_header_reads_without_pixels(tmp_path, monkeypatch):
    path = make_dbt(tmp_path / "v.dcm", breast_volume(slices=4, rows=9, cols=7), 1, 2)
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda self: pytest.fail("decoded pixels")))
    assert read_dbt_header(path) == (4, 9, 7)


# ----------------------------------------------------------------------------------------- DBT errors
def _raises(call, *needles):
    with pytest.raises(InputDataError) as info:
        call()
    message = str(info.value)
    for needle in needles:
        assert str(needle) in message, message
    return message


@pytest.mark.parametrize(
    "center,width,why",
    [(None, 1000, "None"), (2000, 0, "0"), (2000, -5, "-5"), ("nan", 100, "nan")],
)
def test_unusable_window_is_an_error(tmp_path, center, width, why):
    path = make_dbt(tmp_path / "v.dcm", breast_volume(), center, width)
    _raises(
        lambda: read_dbt_volume(path, "lcc", csv=Path("paths.csv"), row=7),
        path,
        "paths.csv row 7",
        "window",
        why,
    )


def test_missing_file_names_csv_and_row(tmp_path):
    path = tmp_path / "absent.dcm"
    _raises(
        lambda: read_dbt_volume(path, "lcc", csv=Path("boxes.csv"), row=12),
        path,
        "boxes.csv row 12",
        "not found",
    )
    _raises(lambda: read_mammogram(path), path, "not found")


def test_not_dicom(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("hello, this is not a DICOM file\n" * 20)
    _raises(lambda: read_dbt_volume(path, "lcc"), path, "not a DICOM")
    _raises(lambda: read_mammogram(path), path, "not a DICOM")
    _raises(lambda: read_dicom_image(path), path, "not a DICOM")


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("keep", [0.97, 0.6, 0.05])
def test_truncated_file(tmp_path, compress, keep):
    full = make_dbt(
        tmp_path / "full.dcm", breast_volume(slices=3, rows=32, cols=32), 2000, 3000, compress=compress
    )
    raw = full.read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(raw[: int(len(raw) * keep)])
    message = _raises(lambda: read_dbt_volume(path, "lcc", csv=Path("p.csv"), row=3), path, "p.csv row 3")
    assert "truncated" in message


def test_zero_frames(tmp_path):
    path = make_dbt(tmp_path / "v.dcm", breast_volume(), 2000, 3000, NumberOfFrames=0)
    _raises(lambda: read_dbt_volume(path, "lcc"), path, "zero frames")
    _raises(lambda: read_dbt_header(path), path, "zero frames")


@pytest.mark.parametrize("tag,value", [("Rows", 30000), ("Columns", 0), ("NumberOfFrames", 50000)])
def test_absurd_dimensions_rejected_before_decoding(tmp_path, monkeypatch, tag, value):
    path = make_dbt(tmp_path / "v.dcm", breast_volume(), 2000, 3000, **{tag: value})
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda self: pytest.fail("decoded pixels")))
    _raises(lambda: read_dbt_volume(path, "lcc"), path, "absurd")
    _raises(lambda: read_dbt_header(path), path, "absurd")


def test_no_pixel_data(tmp_path):
    ds = _base(breast_volume(slices=1)[0], BreastTomosynthesisImageStorage, "MG")
    del ds.PixelData
    path = tmp_path / "v.dcm"
    ds.save_as(path, enforce_file_format=True)
    _raises(lambda: read_dbt_volume(path, "lcc"), path, "no pixel data")
    _raises(lambda: read_mammogram(path), path, "no pixel data")


def test_corrupt_j2k_stream(tmp_path):
    path = make_dbt(tmp_path / "v.dcm", breast_volume(rows=32, cols=32), 2000, 3000, compress=True)
    ds = pydicom.dcmread(path)
    from pydicom.encaps import encapsulate, generate_fragmented_frames

    frames = [b"".join(f) for f in generate_fragmented_frames(ds.PixelData, number_of_frames=3)]
    frames[1] = frames[1][:20] + bytes(len(frames[1]) - 20)  # keep the J2K marker, zero the code stream
    ds.PixelData = encapsulate(frames)
    ds.save_as(path, enforce_file_format=True)
    _raises(lambda: read_dbt_volume(path, "lcc"), path, "corrupt")


@pytest.mark.parametrize(
    "sop,modality,ok",
    [
        (BreastTomosynthesisImageStorage, "MG", True),
        (SecondaryCaptureImageStorage, "MG", True),
        (DigitalMammographyXRayImageStorageForPresentation, "MG", True),
        (CTImageStorage, "CT", False),
        (CTImageStorage, "MG", False),
        ("1.2.840.10008.5.1.4.1.1.481.1", "RTIMAGE", False),  # RT Image Storage
        (SecondaryCaptureImageStorage, "OT", False),
    ],
)
def test_dbt_sop_class_check(tmp_path, sop, modality, ok):
    path = make_dbt(tmp_path / "v.dcm", breast_volume(), 2000, 3000, sop=sop, modality=modality)
    if ok:
        assert read_dbt_volume(path, "lcc").pixels.shape == (3, 12, 10)
    else:
        _raises(
            lambda: read_dbt_volume(path, "lcc", csv=Path("f.csv"), row=2), path, "f.csv row 2", "SOP class"
        )
        _raises(lambda: read_dbt_header(path), path, "SOP class")


def test_bad_view_argument(tmp_path):
    path = make_dbt(tmp_path / "v.dcm", breast_volume(), 2000, 3000)
    _raises(lambda: read_dbt_volume(path, "xcc"), path, "view")


# ------------------------------------------------------------------------------------------ mammograms
def mammo_image(rows: int = 16, cols: int = 12) -> np.ndarray:
    return RNG.integers(0, 4096, size=(rows, cols)).astype(np.uint16)


def test_mammogram_no_voi_min_max(tmp_path):
    image = mammo_image()
    out = read_mammogram(make_mammo(tmp_path / "m.dcm", image))
    assert out.dtype == np.float32 and out.shape == image.shape
    expected = (image - image.min()) / (image.max() - image.min())
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_monochrome1_is_inverted(tmp_path):
    image = mammo_image()
    mono2 = read_mammogram(make_mammo(tmp_path / "a.dcm", image))
    mono1 = read_mammogram(make_mammo(tmp_path / "b.dcm", image, photometric="MONOCHROME1"))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    # the brightest stored value (least attenuation in MONOCHROME1) becomes the darkest output
    assert mono1.flat[np.argmax(image)] == pytest.approx(0.0)


def test_window_tags_vs_voi_lut_sequence(tmp_path):
    image = mammo_image()
    # DICOM linear window: [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2] = [1499.5, 2499.5]
    center, width = 2000, 1001
    windowed = read_mammogram(make_mammo(tmp_path / "w.dcm", image, WindowCenter=center, WindowWidth=width))
    # The same transform as a VOI LUT: entries for stored values 1500..2499 rising linearly.
    first, entries = 1500, 1000
    lut = Dataset()
    lut.add_new(0x00283002, "US", [entries, first, 16])  # LUTDescriptor (VR ambiguous: be explicit)
    lut.add_new(0x00283006, "US", [round(v) for v in np.linspace(0, 65535, entries)])  # LUTData
    lut_out = read_mammogram(make_mammo(tmp_path / "l.dcm", image, VOILUTSequence=[lut]))
    clipped = np.clip(image.astype(np.float64), 1500, 2499)
    expected = (clipped - 1500) / 999
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(windowed, expected, atol=1e-3)
    np.testing.assert_allclose(lut_out, expected, atol=1e-3)
    assert np.all(windowed[image <= 1499] == 0) and np.all(lut_out[image >= 2499] == 1)


def test_rescale_slope_intercept_applied_before_window(tmp_path):
    image = mammo_image()
    plain = read_mammogram(make_mammo(tmp_path / "a.dcm", image, WindowCenter=2000, WindowWidth=1000))
    # Rescaled = 2 * stored + 10: the same window in rescaled units gives the same image.
    scaled = read_mammogram(
        make_mammo(
            tmp_path / "b.dcm",
            image,
            WindowCenter=4010,
            WindowWidth=2000,
            RescaleSlope=2,
            RescaleIntercept=10,
        )
    )
    np.testing.assert_allclose(plain, scaled, atol=2e-3)


def _lut(entries: int, first: int, bits: int, data, vr: str = "US") -> Dataset:
    lut = Dataset()
    lut.add_new(0x00283002, "US", [entries, first, bits])  # LUTDescriptor
    lut.add_new(0x00283006, vr, data)  # LUTData
    return lut


def test_voi_lut_8bit_with_many_entries(tmp_path):
    image = mammo_image()
    table = [v // 16 for v in range(4096)]  # 4096 entries of 8-bit output: indices must not wrap at 256
    out = read_mammogram(make_mammo(tmp_path / "m.dcm", image, VOILUTSequence=[_lut(4096, 0, 8, table)]))
    expected = (image // 16).astype(np.float64)
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_voi_lut_after_rescale_and_ow_data(tmp_path):
    image = mammo_image()
    table = np.arange(4096, dtype=np.uint16)[::-1].copy()  # a decreasing LUT, stored as OW bytes
    plain = read_mammogram(
        make_mammo(tmp_path / "a.dcm", image, VOILUTSequence=[_lut(4096, 0, 16, list(table))])
    )
    # Rescaled = stored + 1000 (float output); the LUT's first mapped value moves with it.
    lut = _lut(4096, 0, 16, table.tobytes(), vr="OW")
    lut[0x00283002].value = [4096, 1000, 16]
    shifted = read_mammogram(
        make_mammo(tmp_path / "b.dcm", image, VOILUTSequence=[lut], RescaleSlope=1, RescaleIntercept=1000)
    )
    np.testing.assert_allclose(shifted, plain, atol=1e-6)
    np.testing.assert_allclose(plain, 1 - (image - image.min()) / (image.max() - image.min()), atol=1e-6)


def test_voi_lut_preferred_over_window(tmp_path):
    image = mammo_image()
    table = [v // 16 for v in range(4096)]
    lut_only = read_mammogram(make_mammo(tmp_path / "a.dcm", image, VOILUTSequence=[_lut(4096, 0, 8, table)]))
    both = read_mammogram(
        make_mammo(
            tmp_path / "b.dcm",
            image,
            VOILUTSequence=[_lut(4096, 0, 8, table)],
            WindowCenter=100,
            WindowWidth=10,
        )
    )
    np.testing.assert_array_equal(lut_only, both)


def test_deferred_pixel_data_reads_the_same(tmp_path, monkeypatch):
    volume = breast_volume(slices=2, rows=40, cols=36)
    native = make_dbt(tmp_path / "a.dcm", volume, 2000, 3000)
    j2k = make_dbt(tmp_path / "b.dcm", volume, 2000, 3000, compress=True)
    expected = read_dbt_volume(native, "rcc").pixels
    monkeypatch.setattr(dicom_io, "_DEFER_SIZE", 64)  # real volumes are deferred; make these ones too
    np.testing.assert_array_equal(read_dbt_volume(native, "rcc").pixels, expected)
    np.testing.assert_array_equal(read_dbt_volume(j2k, "rcc").pixels, expected)


def test_mammogram_jpeg2000_equals_uncompressed(tmp_path):
    image = mammo_image(64, 48)  # openjpeg needs >= ~32 px per side
    plain = read_mammogram(make_mammo(tmp_path / "a.dcm", image, photometric="MONOCHROME1"))
    j2k = read_mammogram(make_mammo(tmp_path / "b.dcm", image, photometric="MONOCHROME1", compress=True))
    np.testing.assert_array_equal(plain, j2k)


def test_mammogram_bad_window_is_an_error(tmp_path):
    path = make_mammo(tmp_path / "m.dcm", mammo_image(), WindowCenter=2000, WindowWidth=0)
    _raises(lambda: read_mammogram(path, csv=Path("ann.csv"), row=4), path, "ann.csv row 4", "VOI")


@pytest.mark.parametrize(
    "sop,modality,ok",
    [
        (DigitalMammographyXRayImageStorageForPresentation, "MG", True),
        ("1.2.840.10008.5.1.4.1.1.1.2.1", "MG", True),  # For Processing
        (SecondaryCaptureImageStorage, "MG", True),
        (SecondaryCaptureImageStorage, "OT", False),
        (CTImageStorage, "CT", False),
        (CTImageStorage, "MG", False),
    ],
)
def test_mammogram_sop_class_check(tmp_path, sop, modality, ok):
    path = make_mammo(tmp_path / "m.dcm", mammo_image(), sop=sop, modality=modality)
    if ok:
        assert read_mammogram(path).shape == (16, 12)
    else:
        _raises(lambda: read_mammogram(path, csv=Path("a.csv"), row=9), path, "a.csv row 9", "SOP class")


def test_mammogram_rejects_volume_and_colour(tmp_path):
    volume = make_dbt(
        tmp_path / "v.dcm", breast_volume(), 2000, 3000, sop=DigitalMammographyXRayImageStorageForPresentation
    )
    _raises(lambda: read_mammogram(volume), volume, "3 frames")
    colour = make_mammo(tmp_path / "c.dcm", mammo_image(), SamplesPerPixel=3)
    _raises(lambda: read_mammogram(colour), colour, "SamplesPerPixel")


# ------------------------------------------------------------------------------------ any DICOM file
def test_read_dicom_image_dbt_uses_tags(tmp_path):
    volume = breast_volume(side="left")
    path = make_dbt(tmp_path / "v.dcm", volume, 2000, 3000, ImageLaterality="R", ViewPosition="MLO")
    array, kind = read_dicom_image(path)
    assert kind == "dbt"
    assert view_from_dataset(pydicom.dcmread(path, stop_before_pixels=True)) == ("r", "mlo")
    np.testing.assert_array_equal(as_levels(array), official_reference(volume, "rmlo", 2000, 3000))


def test_read_dicom_image_dbt_frame_laterality(tmp_path):
    volume = breast_volume(side="left")
    anatomy = Dataset()
    anatomy.FrameLaterality = "R"
    group = Dataset()
    group.FrameAnatomySequence = [anatomy]
    path = make_dbt(tmp_path / "v.dcm", volume, 2000, 3000, PerFrameFunctionalGroupsSequence=[group] * 3)
    array, kind = read_dicom_image(path)
    assert kind == "dbt"
    np.testing.assert_array_equal(as_levels(array), official_reference(volume, "r", 2000, 3000))


def test_read_dicom_image_unknown_laterality_means_no_flip(tmp_path):
    for side in ("left", "right"):
        volume = breast_volume(side=side)
        path = make_dbt(tmp_path / f"{side}.dcm", volume, 2000, 3000)
        array, kind = read_dicom_image(path)
        assert kind == "dbt"
        np.testing.assert_array_equal(as_levels(array), _skimage_rescale_dtype(volume, 500.0, 3500.0))
        assert view_from_dataset(pydicom.dcmread(path, stop_before_pixels=True))[0] == ""


def test_read_dicom_image_mammogram(tmp_path):
    image = mammo_image()
    path = make_mammo(tmp_path / "m.dcm", image, photometric="MONOCHROME1")
    array, kind = read_dicom_image(path)
    assert kind == "mammo"
    np.testing.assert_array_equal(array, read_mammogram(path))


def test_read_dicom_image_foreign(tmp_path):
    path = make_mammo(tmp_path / "ct.dcm", mammo_image(), sop=CTImageStorage, modality="CT")
    _raises(lambda: read_dicom_image(path), path, "SOP class")


def test_apply_official_window_matches_reference_on_random_data():
    frame = RNG.integers(0, 65536, size=(50, 40)).astype(np.uint16)
    for center, width in [(30000.7, 20000.3), (100.0, 3.0), (65000.0, 4000.0)]:
        c, w = np.float32(center), np.float32(width)
        low, high = float((2 * c - w) / 2), float((2 * c + w) / 2)
        np.testing.assert_array_equal(
            as_levels(dicom_io.apply_official_window(frame, low, high)),
            _skimage_rescale_dtype(frame, low, high),
        )


# ------------------------------------------------------------------------------ frame-by-frame DBT reading
def _count_decoded(monkeypatch) -> list[int]:
    """Record every frame index pydicom is asked to decode."""
    import pydicom.pixels

    asked: list[int] = []
    real = pydicom.pixels.iter_pixels

    def counting(src, *, indices=None, **kwargs):
        asked.extend(indices if indices is not None else [])
        return real(src, indices=indices, **kwargs)

    monkeypatch.setattr(pydicom.pixels, "iter_pixels", counting)
    return asked


@pytest.mark.parametrize("view,compress", [("lcc", False), ("rmlo", False), ("rcc", True)])
def test_frames_decode_only_frame_zero_and_the_frames_asked_for(tmp_path, monkeypatch, view, compress):
    volume = breast_volume(slices=6, rows=40, cols=36, side="left")
    volume[1:] = volume[1:, :, ::-1]  # later frames would give the other laterality: only frame 0 may decide
    path = make_dbt(tmp_path / "v.dcm", volume, 1700.3, 2100.7, compress=compress)
    whole = official_reference(volume, view, 1700.3, 2100.7)
    asked = _count_decoded(monkeypatch)
    frames = dicom_io.open_dbt(path, view)
    assert frames.shape == (6, 40, 36) and frames.flipped == (view[0] == "r")
    got = dict(frames.frames([4, 2]))
    assert sorted(asked) == [0, 2, 4]  # frame 0 for the flip rule, then only the kept frames
    assert sorted(got) == [2, 4]
    for index, frame in got.items():
        assert frame.dtype == np.float32
        np.testing.assert_array_equal(as_levels(frame), whole[index])
    np.testing.assert_array_equal(as_levels(frames.read_all()), whole)


def test_frames_without_window_take_the_whole_volume_range(tmp_path, monkeypatch):
    volume = breast_volume(slices=4)
    volume[3, 2, 2] = 4095  # the volume's maximum sits in a frame that is not asked for
    path = make_dbt(tmp_path / "v.dcm", volume)
    frame = dict(dicom_io.open_dbt(path, "lcc").frames([1]))[1]
    expected = _skimage_rescale_dtype(volume, float(volume.min()), float(volume.max()))[1]
    np.testing.assert_array_equal(as_levels(frame), expected)


def test_signed_and_8_bit_frames_use_the_same_window_as_the_direct_formula():
    for dtype in (np.int16, np.uint8, np.uint16):
        info = np.iinfo(dtype)
        frame = np.linspace(info.min, info.max, 97).astype(dtype).reshape(1, 97)
        lut = dicom_io._window_lut(frame.dtype, float(info.min) / 3 + 7.25, float(info.max) / 2)
        offset = -int(info.min)
        np.testing.assert_array_equal(lut[frame.astype(np.int64) + offset],
                                      dicom_io.apply_official_window(frame, float(info.min) / 3 + 7.25,
                                                                     float(info.max) / 2))


def test_frame_out_of_range_is_one_line(tmp_path):
    path = make_dbt(tmp_path / "v.dcm", breast_volume(slices=3), 2048, 4096)
    with pytest.raises(InputDataError, match="the volume has 3"):
        list(dicom_io.open_dbt(path, "lcc").frames([5]))


# ------------------------------------------------------------------- header against pixel data, vouching, warnings
def _set_nested_sequence_length(path: Path, keyword_tag: bytes, length: int) -> None:
    """Garble a sequence inside the header: the explicit-VR length field of the first ``keyword_tag`` SQ."""
    data = bytearray(path.read_bytes())
    at = data.find(keyword_tag + b"SQ\x00\x00")
    assert at > 0
    data[at + 8:at + 12] = length.to_bytes(4, "little")
    path.write_bytes(bytes(data))


# Uncompressed: the stored length; JPEG 2000: the size in the codestream's own header (a compressed frame count is
# its fragments, checked when decoding).
@pytest.mark.parametrize("compress,tag,value", [(False, "Rows", 30), (False, "Rows", 34), (False, "Columns", 28),
                                                (False, "NumberOfFrames", 2), (True, "Rows", 30), (True, "Columns", 34)])
def test_header_size_that_does_not_match_the_pixel_data_blames_the_header(tmp_path, monkeypatch, compress, tag,
                                                                            value):
    path = _retag(make_dbt(tmp_path / "v.dcm", breast_volume(slices=3, rows=32, cols=32), 2000, 3000,
                           compress=compress), **{tag: value})
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda self: pytest.fail("decoded pixels")))
    message = _raises(lambda: read_dbt_header(path), path, "DICOM header", f"{tag} {value}")
    assert "does not match" in message
    if tag != "NumberOfFrames":
        mammo = _retag(make_mammo(tmp_path / "m.dcm", mammo_image(32, 32), compress=compress), **{tag: value})
        _raises(lambda: dicom_io.read_mammo_header(mammo, csv=Path("m.csv"), row=4), mammo, "m.csv row 4",
                "DICOM header", f"{tag} {value}")


def _retag(path: Path, **tags) -> Path:
    """Change header tags of a written file without touching its pixel data."""
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_truncated_native_pixel_data_is_seen_in_the_header(tmp_path):
    path = make_dbt(tmp_path / "v.dcm", breast_volume(slices=3, rows=12, cols=10), 2000, 3000)
    path.write_bytes(path.read_bytes()[:-50])
    _raises(lambda: read_dbt_header(path), path, "truncated")


def test_mammogram_header_reader_refuses_absurd_sizes_and_foreign_objects(tmp_path):
    assert dicom_io.read_mammo_header(make_mammo(tmp_path / "ok.dcm", mammo_image(16, 12))) == (1, 16, 12)
    zero = make_mammo(tmp_path / "zero.dcm", mammo_image(16, 12), Rows=0)
    _raises(lambda: dicom_io.read_mammo_header(zero), zero, "absurd", "Rows 0")
    ct = make_mammo(tmp_path / "ct.dcm", mammo_image(), sop=CTImageStorage, modality="CT")
    _raises(lambda: dicom_io.read_mammo_header(ct), ct, "SOP class")
    absent = tmp_path / "absent.dcm"
    _raises(lambda: dicom_io.read_mammo_header(absent), absent, "not found")


def test_garbled_sequence_is_a_corrupt_header_naming_the_file(tmp_path):
    path = make_dbt(tmp_path / "v.dcm", breast_volume(), 2000, 3000)
    _set_nested_sequence_length(path, b"\x28\x00\x32\x91", 5)  # FrameVOILUTSequence: 5 bytes, no room for an item
    _raises(lambda: read_dbt_volume(path, "lcc", csv=Path("p.csv"), row=7), path, "p.csv row 7",
            "corrupt DICOM header")
    _raises(lambda: read_dicom_image(path), path, "corrupt DICOM header")


@pytest.mark.parametrize("tags", [{"RescaleSlope": "1e308", "RescaleIntercept": "0"},
                                  {"RescaleSlope": "-1e308", "RescaleIntercept": "-1e308"}])
def test_absurd_rescale_or_window_is_one_error_without_numpy_warnings(tmp_path, tags):
    import warnings

    path = make_mammo(tmp_path / "m.dcm", mammo_image(), **tags)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _raises(lambda: read_mammogram(path), path, "modality/VOI")
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]


def test_window_beyond_float32_is_unusable_without_numpy_warnings(tmp_path):
    import warnings

    path = make_dbt(tmp_path / "v.dcm", breast_volume(), "1e39", "1e300")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _raises(lambda: read_dbt_volume(path, "lcc"), path, "window")
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]


def test_accept_modality_vouches_only_for_generic_x_ray_classes(tmp_path):
    image = mammo_image()
    film = make_mammo(tmp_path / "rg.dcm", image, sop=SecondaryCaptureImageStorage, modality="RG")
    message = _raises(lambda: read_mammogram(film), film, "SOP class", "--accept-modality RG")
    assert "'RG'" in message
    np.testing.assert_array_equal(read_mammogram(film, accept_modality=["rg"]),
                                  read_mammogram(make_mammo(tmp_path / "mg.dcm", image)))
    assert dicom_io.read_mammo_header(film, accept_modality=("RG",)) == (1, 16, 12)
    _raises(lambda: read_mammogram(film, accept_modality=["OT"]), film, "SOP class")
    assert read_dicom_image(film, accept_modality=["RG"])[1] == "mammo"
    _raises(lambda: read_dicom_image(film), film, "SOP class")
    ct = make_mammo(tmp_path / "ct.dcm", image, sop=CTImageStorage, modality="CT")
    message = _raises(lambda: read_mammogram(ct, accept_modality=["CT"]), ct, "SOP class")
    assert "--accept-modality" not in message  # no word of the user makes a CT slice a mammogram
    volume = make_dbt(tmp_path / "v.dcm", breast_volume(), 2000, 3000, sop=SecondaryCaptureImageStorage,
                      modality="OT")
    _raises(lambda: read_dicom_image(volume), volume, "SOP class")
    assert read_dicom_image(volume, accept_modality=["OT"])[1] == "dbt"


def test_header_checks_leave_the_pixel_data_unread(tmp_path):
    """The size check reads the pixel data element's stored length only: reading the value would load a whole
    uncompressed volume (628 MB at BCS-DBT size) just to open it."""
    path = make_dbt(tmp_path / "v.dcm", breast_volume(slices=4), 2048, 4096)
    ds = pydicom.dcmread(path, defer_size=64)
    assert dicom_io._check_header(ds, path, None, None, need_pixels=True) == (4, 12, 10)
    assert ds.get_item("PixelData", keep_deferred=True).value is None
