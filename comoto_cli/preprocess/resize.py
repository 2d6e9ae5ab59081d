"""Resizing slices to the cache frame by exact area averaging.

Downsampling a 16-bit DBT slice (about 2457 x 1890) to the cache size (for example 2048 x 1024) must not
alias: calcifications are a few pixels wide and would flicker in and out with point sampling. Each output
pixel is therefore the mean of the input over its footprint (a box filter), with fractional weights for the
input pixels cut by the footprint's border. This is what ``torch.nn.functional.interpolate(mode="area")``
computes for integer ratios, but exact for any ratio (torch's adaptive pooling rounds the footprints to whole
pixels). Computed separably with cumulative sums in float64: O(pixels), no torch in the worker processes.

Geometry: output pixel ``i`` covers input ``[i * n / N, (i + 1) * n / N)``, so a point ``p`` in the official
frame maps to ``p * N / n`` in the cache frame, which is exactly ``scale = N / n`` used for the boxes
(``comoto_cli.transforms.geometry.official_to_cache``).
"""

from __future__ import annotations

import numpy as np


def _area_axis(values: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Area-resample ``values`` along ``axis`` to ``size`` samples (float64 in, float64 out)."""
    length = values.shape[axis]
    if length == size:
        return values
    # integral[k] = sum of the first k input pixels; the integral up to a fractional position t is the linear
    # interpolation of ``integral`` at t because the signal is constant within a pixel. Working along the
    # axis in place (no moveaxis copy) keeps the memory access contiguous for the last axis.
    pad = [(0, 0)] * values.ndim
    pad[axis] = (1, 0)
    integral = np.pad(np.cumsum(values, axis=axis), pad)
    edges = np.arange(size + 1, dtype=np.float64) * (length / size)
    low = np.minimum(np.floor(edges).astype(np.int64), length - 1)
    shape = [1] * values.ndim
    shape[axis] = size + 1
    fraction = (edges - low).reshape(shape)
    below = np.take(integral, low, axis=axis)
    at_edges = below + fraction * (np.take(integral, low + 1, axis=axis) - below)
    return np.diff(at_edges, axis=axis) * (size / length)


def resize_area(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (k, rows, cols) or (rows, cols) images to (…, height, width) by exact area averaging.

    Works for down- and upsampling (upsampling by area is nearest-neighbour with blended borders). The mean
    intensity and the range of the input are preserved; returns float32.
    """
    array = np.asarray(images, dtype=np.float64)
    if array.ndim not in (2, 3):
        raise ValueError(f"expected (rows, cols) or (k, rows, cols) images, got shape {array.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    # Shrink the axis with the larger reduction first: the second pass then works on fewer pixels.
    rows_axis, cols_axis = array.ndim - 2, array.ndim - 1
    if height / array.shape[rows_axis] <= width / array.shape[cols_axis]:
        resized = _area_axis(_area_axis(array, int(height), rows_axis), int(width), cols_axis)
    else:
        resized = _area_axis(_area_axis(array, int(width), cols_axis), int(height), rows_axis)
    return resized.astype(np.float32)
