"""Resizing slices to the cache frame by exact area averaging.

Downsampling a 16-bit DBT slice (about 2457 x 1890) to the cache size (for example 2048 x 1024) must not
alias: calcifications are a few pixels wide and would flicker in and out with point sampling. Each output
pixel is therefore the mean of the input over its footprint (a box filter), with fractional weights for the
input pixels cut by the footprint's border. This is what ``torch.nn.functional.interpolate(mode="area")``
computes for integer ratios, but exact for any ratio (torch's adaptive pooling rounds the footprints to whole
pixels). Computed separably with running sums in float64, one image at a time: O(pixels), no torch in the
worker processes.

Geometry: output pixel ``i`` covers input ``[i * n / N, (i + 1) * n / N)``, so a point ``p`` in the official
frame maps to ``p * N / n`` in the cache frame, which is exactly ``scale = N / n`` used for the boxes
(``comoto_cli.transforms.geometry.official_to_cache``).
"""

from __future__ import annotations

import numpy as np


def _edges(length: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Output pixel borders on the input axis: the whole input pixel each starts in, and the fraction past it."""
    edges = np.arange(size + 1, dtype=np.float64) * (length / size)
    low = np.minimum(np.floor(edges).astype(np.int64), length - 1)
    return low, edges - low


def _area_rows(values: np.ndarray, size: int, *, along_columns: bool = False) -> np.ndarray:
    """Area-resample the rows of 2-D ``values`` (n, m) to ``size`` rows, float64 (size, m). With
    ``along_columns`` the columns of ``values`` (m, n) are resampled instead and the result is still (size, m).

    integral[k] = sum of the first k input rows; the integral up to a fractional position t is the linear
    interpolation of ``integral`` at t because the signal is constant within a pixel. The running sum is built
    one row at a time (a contiguous vector add each): the same sequential sums as ``np.cumsum``, at a fraction of
    its cost along the first axis, and the arithmetic below is done in place on one buffer.
    """
    length, width = (values.shape[1], values.shape[0]) if along_columns else values.shape
    low, fraction = _edges(length, size)
    integral = np.empty((length + 1, width), dtype=np.float64)
    integral[0] = 0.0
    for k in range(length):
        np.add(integral[k], values[:, k] if along_columns else values[k], out=integral[k + 1])
    at_edges = integral[low + 1]
    below = integral[low]
    at_edges -= below
    at_edges *= fraction[:, np.newaxis]
    at_edges += below
    resized = np.subtract(at_edges[1:], at_edges[:-1])
    resized *= size / length
    return resized


def _resize_one(image: np.ndarray, height: int, width: int) -> np.ndarray:
    rows, cols = image.shape
    # Shrink the axis with the larger reduction first: the second pass then works on fewer pixels. The result is
    # built transposed where that keeps every running sum on contiguous rows.
    if height / rows <= width / cols:
        first = _area_rows(image, height) if rows != height else image.astype(np.float64)
        return first if cols == width else _area_rows(first, width, along_columns=True).T
    first = _area_rows(image, width, along_columns=True) if cols != width else image.T.astype(np.float64)
    return first.T if rows == height else _area_rows(first, height, along_columns=True)


def resize_area(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (k, rows, cols) or (rows, cols) images to (…, height, width) by exact area averaging.

    Works for down- and upsampling (upsampling by area is nearest-neighbour with blended borders). The mean
    intensity and the range of the input are preserved; returns float32. Memory: a few float64 copies of one
    image at a time, whatever k is.
    """
    array = np.asarray(images)
    if array.ndim not in (2, 3):
        raise ValueError(f"expected (rows, cols) or (k, rows, cols) images, got shape {array.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    if array.ndim == 2:
        return _resize_one(array, int(height), int(width)).astype(np.float32)
    out = np.empty((array.shape[0], int(height), int(width)), dtype=np.float32)
    for index, image in enumerate(array):
        out[index] = _resize_one(image, int(height), int(width))
    return out
