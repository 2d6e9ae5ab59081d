"""Pictures for the evaluation report: a cached slice with boxes drawn on it, whole and zoomed, as JPEG bytes.

Boxes arrive in the official frame at full resolution (as the DBTex tables hold them) and are drawn in the cache
frame through the volume's framing (its scale and offset, ``official_to_cache``). Only the slices shown are read, one at a time,
so a report over thousands of volumes never holds more than one slice.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from comoto_cli.cache.h5cache import SliceCache
from comoto_cli.transforms.geometry import official_to_cache

OVERVIEW_SIDE = 220  # pixels of the longer side of the whole-slice picture
ZOOM_SIDE = 200
ZOOM_CONTEXT = 4.0  # the zoomed crop spans this many lesion sizes
ZOOM_MIN_CACHE_PIXELS = 48


@dataclass(frozen=True)
class Outline:
    """A box to draw: (X, Y, Width, Height) in the official frame, and its colour."""

    box: tuple[float, float, float, float]
    color: str


@dataclass(frozen=True)
class ShownSlice:
    image: np.ndarray  # (H, W) float32 in [0, 1], cache frame
    slice: int  # the slice read: the one asked for, or the nearest cached one
    mapping: dict[str, float]  # the volume's scale_y, scale_x, offset_y, offset_x (SliceCache.mapping)


class CacheImages:
    """The slices of a cache's views, found by (StudyUID, View) as the DBTex tables name them."""

    def __init__(self, cache: SliceCache):
        self.cache = cache
        volumes = cache.volumes
        self._volume = {(str(study), str(view)): index
                        for index, (study, view) in enumerate(zip(volumes["study_uid"], volumes["view"]))}

    def read(self, study_uid: str, view: str, slice_index: float) -> ShownSlice | None:
        """The cached slice nearest ``slice_index`` of that view; None if the cache does not hold the view."""
        volume = self._volume.get((study_uid, view))
        if volume is None:
            return None
        rows = self.cache.volume_slice_rows(volume)
        indices = self.cache.slice_index[rows]
        if indices.size == 0:
            return None
        nearest = int(np.argmin(np.abs(indices - slice_index)))
        return ShownSlice(image=self.cache.image(rows.start + nearest), slice=int(indices[nearest]),
                          mapping=self.cache.mapping(volume))


def _to_cache(box: tuple[float, ...], shown: ShownSlice) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = official_to_cache(np.asarray(box, dtype=np.float64), **shown.mapping)[0]
    return float(x0), float(y0), float(x1), float(y1)


def _windowed(pixels: np.ndarray) -> np.ndarray:
    """uint8 grey levels, stretched between the 1st and 99.5th percentile so faint lesions are visible."""
    low, high = np.percentile(pixels, [1.0, 99.5]) if pixels.size else (0.0, 1.0)
    scale = 255.0 / max(float(high - low), 1e-6)
    return np.clip((pixels - low) * scale, 0, 255).astype(np.uint8)


def _draw(picture: Image.Image, boxes: list[tuple[tuple[float, ...], str]], factor: float,
          origin: tuple[float, float]) -> Image.Image:
    picture = picture.convert("RGB")
    draw = ImageDraw.Draw(picture)
    for (x0, y0, x1, y1), color in boxes:
        corners = [(x0 - origin[0]) * factor, (y0 - origin[1]) * factor,
                   (x1 - origin[0]) * factor, (y1 - origin[1]) * factor]
        corners[2], corners[3] = max(corners[2], corners[0] + 1), max(corners[3], corners[1] + 1)
        draw.rectangle(corners, outline=color, width=2)
    return picture


def _jpeg(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def overview_jpeg(shown: ShownSlice, outlines: list[Outline]) -> bytes:
    """The whole slice, its longer side :data:`OVERVIEW_SIDE` pixels, with every outline."""
    height, width = shown.image.shape
    factor = OVERVIEW_SIDE / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    picture = Image.fromarray(_windowed(shown.image)).resize(size, Image.Resampling.BILINEAR)
    boxes = [(_to_cache(o.box, shown), o.color) for o in outlines]
    return _jpeg(_draw(picture, boxes, factor, (0.0, 0.0)))


def zoom_jpeg(shown: ShownSlice, focus: tuple[float, float, float, float], outlines: list[Outline]) -> bytes:
    """A square crop around ``focus`` (an official-frame box), :data:`ZOOM_CONTEXT` times its size, enlarged to
    :data:`ZOOM_SIDE` pixels, windowed on its own pixels."""
    height, width = shown.image.shape
    x0, y0, x1, y1 = _to_cache(focus, shown)
    side = min(max(ZOOM_CONTEXT * max(x1 - x0, y1 - y0), ZOOM_MIN_CACHE_PIXELS), max(height, width))
    left = int(np.clip(round((x0 + x1 - side) / 2), 0, max(width - side, 0)))
    top = int(np.clip(round((y0 + y1 - side) / 2), 0, max(height - side, 0)))
    crop = shown.image[top:top + int(side), left:left + int(side)]
    factor = ZOOM_SIDE / max(crop.shape)
    size = (max(1, round(crop.shape[1] * factor)), max(1, round(crop.shape[0] * factor)))
    picture = Image.fromarray(_windowed(crop)).resize(size, Image.Resampling.BILINEAR)
    boxes = [(_to_cache(o.box, shown), o.color) for o in outlines]
    return _jpeg(_draw(picture, boxes, factor, (float(left), float(top))))
