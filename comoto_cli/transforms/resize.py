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


def _rows_kernel(values, low, fraction, scale, out):  # pragma: no cover - compiled by numba
    """Compiled twin of :func:`_area_rows`: the same running sums in the same order, no buffers of the whole
    integral, so its output is bit-identical (tests/test_realsize.py checks it)."""
    rows, width = values.shape
    run = np.zeros(width)
    at_previous = np.empty(width)
    k = 0
    for edge in range(low.shape[0]):
        while k < low[edge]:
            for j in range(width):
                run[j] = run[j] + values[k, j]
            k += 1
        f = fraction[edge]
        for j in range(width):
            below = run[j]
            above = run[j] + values[k, j]
            at = below + f * (above - below)
            if edge > 0:
                out[edge - 1, j] = (at - at_previous[j]) * scale
            at_previous[j] = at
    return out


def _columns_kernel(values, low, fraction, scale, out):  # pragma: no cover - compiled by numba
    """The same along each row (the columns axis), one contiguous row at a time."""
    rows, cols = values.shape
    for r in range(rows):
        run = 0.0
        at_previous = 0.0
        k = 0
        for edge in range(low.shape[0]):
            while k < low[edge]:
                run = run + values[r, k]
                k += 1
            below = run
            above = run + values[r, k]
            at = below + fraction[edge] * (above - below)
            if edge > 0:
                out[r, edge - 1] = (at - at_previous) * scale
            at_previous = at
    return out


try:  # numba compiles the two kernels once per machine (cached beside this file); numpy below is the fallback
    import numba

    _rows_kernel = numba.njit(cache=True, nogil=True)(_rows_kernel)
    _columns_kernel = numba.njit(cache=True, nogil=True)(_columns_kernel)
    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a dependency; kept for platforms without its wheels
    HAVE_NUMBA = False


def _compiled_axis(values: np.ndarray, size: int, axis: int) -> np.ndarray:
    length = values.shape[axis]
    if length == size:
        return values.astype(np.float64)
    low, fraction = _edges(length, size)
    if axis == 0:
        return _rows_kernel(values, low, fraction, size / length, np.empty((size, values.shape[1])))
    return _columns_kernel(values, low, fraction, size / length, np.empty((values.shape[0], size)))


def _resize_one(image: np.ndarray, height: int, width: int, compiled: bool = True) -> np.ndarray:
    rows, cols = image.shape
    # Shrink the axis with the larger reduction first: the second pass then works on fewer pixels.
    rows_first = height / rows <= width / cols
    if compiled and HAVE_NUMBA:
        image = np.ascontiguousarray(image)
        if rows_first:
            return _compiled_axis(_compiled_axis(image, height, 0), width, 1)
        return _compiled_axis(_compiled_axis(image, width, 1), height, 0)
    # numpy: the result is built transposed where that keeps every running sum on contiguous rows.
    if rows_first:
        first = _area_rows(image, height) if rows != height else image.astype(np.float64)
        return first if cols == width else _area_rows(first, width, along_columns=True).T
    first = _area_rows(image, width, along_columns=True) if cols != width else image.T.astype(np.float64)
    return first.T if rows == height else _area_rows(first, height, along_columns=True)


def resize_area(images: np.ndarray, height: int, width: int, *, compiled: bool = True) -> np.ndarray:
    """Resize (k, rows, cols) or (rows, cols) images to (…, height, width) by exact area averaging.

    Works for down- and upsampling (upsampling by area is nearest-neighbour with blended borders). The mean
    intensity and the range of the input are preserved; returns float32. Memory: a few float64 copies of one
    image at a time, whatever k is. ``compiled=False`` forces the numpy path (the same bits, slower).
    """
    array = np.asarray(images)
    if array.ndim not in (2, 3):
        raise ValueError(f"expected (rows, cols) or (k, rows, cols) images, got shape {array.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    if array.ndim == 2:
        return _resize_one(array, int(height), int(width), compiled).astype(np.float32)
    out = np.empty((array.shape[0], int(height), int(width)), dtype=np.float32)
    for index, image in enumerate(array):
        out[index] = _resize_one(image, int(height), int(width), compiled)
    return out
