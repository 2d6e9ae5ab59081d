"""The cache's direct slice reader (the stored chunk inflated by zlib, its shuffle undone in numpy) returns exactly
the pixels h5py's own filter pipeline returns, and falls back to h5py wherever the stored layout is not the one it
knows."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from comoto_cli.cache.h5cache import SliceCache, SliceReader, create_image_dataset
from tests.conftest import build_tiny_cache


def _bits(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image).view(np.uint16)  # NaN payloads compare too


def _stored(path, images: np.ndarray, level: int = 4, **layout) -> None:
    with h5py.File(path, "w") as handle:
        if layout:
            handle.create_dataset("images", data=images, **layout)
        else:
            dataset = create_image_dataset(handle, "images", len(images), *images.shape[1:], compression_level=level)
            dataset[...] = images


@pytest.mark.parametrize("level", [4, 0])
@pytest.mark.parametrize("shape", [(5, 37, 53), (3, 64, 64), (2, 1, 7)])
def test_direct_read_equals_h5py_bit_for_bit(tmp_path, shape, level):
    rng = np.random.default_rng(sum(shape))
    images = rng.integers(0, 2**16, shape, dtype=np.uint16).view(np.float16)  # every bit pattern, NaNs included
    images[0] = 0  # a constant slice compresses to almost nothing
    images[1, : shape[1] // 2] = np.float16(0.5)
    path = tmp_path / "slices.h5"
    _stored(path, images, level)
    with h5py.File(path, "r") as handle:
        reader = SliceReader(handle["images"])
        assert reader.direct and reader.deflated == (level > 0)
        assert (handle["images"].compression is None) == (level == 0)
        for row in range(shape[0]):
            got = reader(row)
            assert got.dtype == np.float16 and got.shape == shape[1:]
            np.testing.assert_array_equal(_bits(got), _bits(handle["images"][row]))


@pytest.mark.parametrize("layout", [
    {"chunks": (1, 16, 16), "compression": "gzip", "shuffle": False},  # deflate without shuffle
    {"chunks": (1, 8, 16), "compression": "gzip", "shuffle": True},  # a slice split over chunks
    {"chunks": (1, 16, 16), "compression": "lzf", "shuffle": True},  # another codec
    {"chunks": (1, 16, 16), "compression": "gzip", "shuffle": True, "fletcher32": True},  # a third filter
])
def test_other_layouts_are_read_by_h5py(tmp_path, layout):
    images = np.random.default_rng(1).random((3, 16, 16)).astype(np.float16)
    path = tmp_path / "slices.h5"
    _stored(path, images, **layout)
    with h5py.File(path, "r") as handle:
        reader = SliceReader(handle["images"])
        assert not reader.direct
        np.testing.assert_array_equal(reader(2), images[2])


def test_slices_stored_without_a_filter_are_read_by_h5py(tmp_path):
    images = np.random.default_rng(2).random((2, 16, 16)).astype(np.float16)
    path = tmp_path / "slices.h5"
    _stored(path, images)
    with h5py.File(path, "a") as handle:  # as HDF5 stores a chunk when an optional filter fails: its mask bit set
        dataset = handle["images"]
        dataset.id.write_direct_chunk((1, 0, 0), images[1].tobytes(), filter_mask=0b11)
    with h5py.File(path, "r") as handle:
        reader = SliceReader(handle["images"])
        assert reader.direct
        np.testing.assert_array_equal(reader(1), images[1])
        np.testing.assert_array_equal(reader(0), images[0])


def test_cache_reads_equal_h5py_reads(tmp_path):
    path = build_tiny_cache(tmp_path / "cache.h5", height=40, width=24, train=3, val=2)
    cache = SliceCache(path)
    with h5py.File(path, "r") as handle:
        stored = handle["slices/images"][()]
        assert SliceReader(handle["slices/images"]).direct
    for row in range(cache.num_slices):
        np.testing.assert_array_equal(cache.images_f16(row), stored[row])
        image = cache.image(row)
        assert image.dtype == np.float32
        np.testing.assert_array_equal(image, stored[row].astype(np.float32))
    volume = cache.images(slice(1, 4))
    assert volume.dtype == np.float32 and volume.shape == (3, 40, 24)
    np.testing.assert_array_equal(volume, stored[1:4].astype(np.float32))
    assert cache.images(slice(2, 2)).shape == (0, 40, 24)
    with h5py.File(path, "r") as handle:
        assert not SliceReader(handle["slices/images"], direct=False).direct


def test_a_corrupt_chunk_is_an_error_not_pixels(tmp_path):
    images = np.random.default_rng(3).random((2, 16, 16)).astype(np.float16)
    path = tmp_path / "slices.h5"
    _stored(path, images)
    with h5py.File(path, "a") as handle:
        handle["images"].id.write_direct_chunk((0, 0, 0), b"not a deflate stream", filter_mask=0)
    with h5py.File(path, "r") as handle:
        reader = SliceReader(handle["images"])
        with pytest.raises(OSError, match="slice 0"):  # what the loaders turn into one line naming the cache
            reader(0)
        with pytest.raises(OSError):
            handle["images"][0]


def test_an_uncompressed_cache_holds_the_same_slices_as_a_gzip_one(tiny_synth, tmp_path):
    from comoto_cli.config import PreprocessConfig
    from comoto_cli.preprocess.pipeline import preprocess

    caches = {}
    for level in (4, 0):
        config = PreprocessConfig(modality="dbt", image_height=64, image_width=48, workers=1, compression_level=level)
        caches[level] = tmp_path / f"level{level}.h5"
        preprocess(tiny_synth / "dbt", caches[level], config, progress=False)
    with h5py.File(caches[0], "r") as raw, h5py.File(caches[4], "r") as gzip:
        assert raw["slices/images"].compression is None and gzip["slices/images"].compression == "gzip"
        assert raw["slices/images"].shape == gzip["slices/images"].shape
        np.testing.assert_array_equal(raw["slices/images"][()], gzip["slices/images"][()])
        np.testing.assert_array_equal(raw["slices/boxes"][()], gzip["slices/boxes"][()])
        assert gzip.id.get_filesize() < raw.id.get_filesize()
    cache = SliceCache(caches[0])
    np.testing.assert_array_equal(cache.images(slice(0, 3)), SliceCache(caches[4]).images(slice(0, 3)))
