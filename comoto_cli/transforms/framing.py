"""Framing: where an image in the official frame lands in the cache's fixed (image_height, image_width) frame.

A framing keeps a rectangle of the official frame (the *crop*: ``rows`` rows from ``offset_y``, ``cols`` columns
from ``offset_x``), resizes it with the area filter (:func:`comoto_cli.transforms.resize.resize_area`) to
(content_height, content_width) and puts it at the top-left corner of the cache image; the rest is 0 (air, after
the VOI window). A point maps per axis as

    cache = (official - offset) * scale,        scale = content / crop,

exactly: the area filter maps input ``[0, n)`` onto output ``[0, N)``, so boxes go both ways without rounding
(:func:`comoto_cli.transforms.geometry.official_to_cache` and its inverse take these four numbers).

The framings are plug-ins by name (``preprocess.geometry``):

- ``stretch`` (default): the whole image to the whole cache frame, each axis its own scale. A 2457 x 1996 DBT
  slice and a 4664 x 3064 mammogram at 2048 x 1024 are squashed by different ratios (0.83 / 0.51 and
  0.44 / 0.33), so a round mass is a different ellipse in each modality.
- ``breast-crop``: the bounding box of the breast (:func:`breast_box`, found on a *reference* frame: a DBT
  volume's central slice, or the mammogram itself) plus a margin, resized with one scale for both axes, so
  shapes are kept and no pixels are spent on air. The pixels outside the crop are gone: a box that leaves it
  is cut to it (preprocess counts those).

A framing function takes ``(shape, height, width, reference)``: the official (rows, cols), the cache size, and a
zero-argument callable returning the reference frame (float32 in [0, 1]), called only by framings that look at
pixels (for DBT it decodes one more frame).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from comoto_cli.config import PreprocessConfig
from comoto_cli.transforms.resize import resize_area
from comoto_cli.utils.registry import Registry

#: How much of the image's intensity range, above its darkest percentile, counts as tissue (the VOI window puts
#: air near 0; fatty tissue is well above 5 % of the range in mammograms and DBT slices alike).
TISSUE_FRACTION = 0.05
#: Air after the VOI window is at most this: the darkest level used is never above it, so a breast that fills the
#: frame (its darkest percentile being fat, not air) keeps all of its tissue.
AIR_LEVEL = 0.02
#: Margin added around the breast on each side, as a fraction of the image's side: out-of-plane blur and skin.
MARGIN_FRACTION = 0.02
#: The breast is looked for on a thumbnail with this many pixels on its longer side (a few ms per volume).
THUMBNAIL_SIDE = 256


@dataclass(frozen=True)
class Framing:
    """Crop (official pixels) -> content (cache pixels, top-left; the rest of height x width is zero)."""

    offset_y: int
    offset_x: int
    rows: int
    cols: int
    content_height: int
    content_width: int
    height: int
    width: int

    @property
    def scale_y(self) -> float:
        return self.content_height / self.rows

    @property
    def scale_x(self) -> float:
        return self.content_width / self.cols

    def mapping(self) -> dict[str, float]:
        """The four numbers the cache stores per volume: ``scale_y``, ``scale_x``, ``offset_y``, ``offset_x``."""
        return {"scale_y": float(self.scale_y), "scale_x": float(self.scale_x),
                "offset_y": float(self.offset_y), "offset_x": float(self.offset_x)}

    def apply(self, frame: np.ndarray) -> np.ndarray:
        """One official-frame image (rows, cols) -> the cache image (height, width), float32."""
        crop = frame[self.offset_y:self.offset_y + self.rows, self.offset_x:self.offset_x + self.cols]
        if (self.content_height, self.content_width) == (self.height, self.width):
            return resize_area(crop, self.height, self.width)
        out = np.zeros((self.height, self.width), dtype=np.float32)
        out[:self.content_height, :self.content_width] = resize_area(crop, self.content_height, self.content_width)
        return out


FramingFunction = Callable[[tuple[int, int], int, int, Callable[[], np.ndarray]], Framing]
_FRAMINGS: Registry[FramingFunction] = Registry("framing", "geometry", PreprocessConfig.geometry_names)


def register_framing(name: str) -> Callable[[FramingFunction], FramingFunction]:
    """Decorator: make a framing function available as ``preprocess.geometry: NAME``."""
    return lambda function: _FRAMINGS.add(name, function)


def framing_for(name: str, shape: tuple[int, int], height: int, width: int,
                reference: Callable[[], np.ndarray]) -> Framing:
    """The framing ``name`` of an official-frame image of ``shape`` (rows, cols) into height x width."""
    return _FRAMINGS.lookup(name)((int(shape[0]), int(shape[1])), int(height), int(width), reference)


@register_framing("stretch")
def stretch(shape: tuple[int, int], height: int, width: int, reference) -> Framing:
    return Framing(0, 0, shape[0], shape[1], height, width, height, width)


@register_framing("breast-crop")
def breast_crop(shape: tuple[int, int], height: int, width: int, reference) -> Framing:
    y0, y1, x0, x1 = breast_box(reference())
    rows, cols = y1 - y0, x1 - x0
    scale = min(height / rows, width / cols)
    content_height = min(height, max(1, round(rows * scale)))
    content_width = min(width, max(1, round(cols * scale)))
    return Framing(y0, x0, rows, cols, content_height, content_width, height, width)


def breast_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): rows y0..y1-1 and columns x0..x1-1 of ``image`` (rows, cols; [0, 1], air dark) that hold
    the breast, with a margin; the whole image when no breast stands out (blank, or tissue from edge to edge).

    The breast is the largest 8-connected region brighter than the darkest percentile (at most ``AIR_LEVEL``) by
    ``TISSUE_FRACTION`` of the range, on a thumbnail: markers and burnt-in labels are smaller regions, and are left
    out.
    """
    from scipy import ndimage  # noqa: PLC0415 - only the breast-crop framing needs it

    rows, cols = image.shape
    factor = max(rows, cols) / THUMBNAIL_SIDE
    small_rows, small_cols = max(1, round(rows / factor)), max(1, round(cols / factor))
    small = resize_area(image, small_rows, small_cols) if factor > 1 else np.asarray(image, np.float32)
    small_rows, small_cols = small.shape
    low, high = np.percentile(small, [1.0, 99.5])
    low = min(float(low), AIR_LEVEL)
    whole = (0, rows, 0, cols)
    if not np.isfinite(high - low) or high - low < 1e-3:
        return whole
    labels, count = ndimage.label(small > low + TISSUE_FRACTION * (high - low), structure=np.ones((3, 3)))
    if count == 0:
        return whole
    largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    inside = labels == largest
    ys, xs = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    margin_y, margin_x = math.ceil(MARGIN_FRACTION * rows), math.ceil(MARGIN_FRACTION * cols)
    y0 = max(0, math.floor(ys[0] * rows / small_rows) - margin_y)
    y1 = min(rows, math.ceil((ys[-1] + 1) * rows / small_rows) + margin_y)
    x0 = max(0, math.floor(xs[0] * cols / small_cols) - margin_x)
    x1 = min(cols, math.ceil((xs[-1] + 1) * cols / small_cols) + margin_x)
    return y0, y1, x0, x1
