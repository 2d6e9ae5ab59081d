"""Box geometry between the three frames a lesion box lives in. Pure numpy functions.

- *stored frame*: pixels as the DICOM stores them;
- *official frame*: the official BCS-DBT reader's frame (after its 180-degree flip rule); the CSV boxes and the
  DBTex submission CSV use it, at full resolution;
- *cache frame*: the official frame framed into the cache's (image_height, image_width): resized whole, or cropped
  to the breast and resized keeping its aspect (``comoto_cli.transforms.framing``); per volume an offset and a
  scale per axis map one to the other.

Coordinates are continuous pixel coordinates: pixel ``i`` covers ``[i, i + 1)``. Boxes are ``xyxy`` arrays
of shape (N, 4) unless named ``xywh`` (top-left X, Y, Width, Height as in the CSVs).
"""

from __future__ import annotations

import numpy as np


def xywh_to_xyxy(boxes_xywh: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def xyxy_to_xywh(boxes_xyxy: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def official_to_cache(boxes_xywh: np.ndarray, scale_y: float, scale_x: float, offset_y: float = 0.0,
                      offset_x: float = 0.0) -> np.ndarray:
    """CSV boxes (official frame, xywh) -> cache-frame xyxy: ``(official - offset) * scale`` per axis, with
    ``scale_*`` cache pixels per official pixel and ``offset_*`` the official pixel at the cache frame's origin
    (0 unless the cache's framing crops, :mod:`comoto_cli.transforms.framing`)."""
    offset = np.array([offset_x, offset_y, offset_x, offset_y])
    return (xywh_to_xyxy(boxes_xywh) - offset) * np.array([scale_x, scale_y, scale_x, scale_y])


def cache_to_official(boxes_xyxy: np.ndarray, scale_y: float, scale_x: float, offset_y: float = 0.0,
                      offset_x: float = 0.0) -> np.ndarray:
    """Cache-frame xyxy -> official-frame xywh at full resolution (inverse of :func:`official_to_cache`)."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    offset = np.array([offset_x, offset_y, offset_x, offset_y])
    return xyxy_to_xywh(boxes / np.array([scale_x, scale_y, scale_x, scale_y]) + offset)


def clip_boxes(boxes_xyxy: np.ndarray, height: float, width: float) -> np.ndarray:
    """Boxes cut to ``[0, width] x [0, height]`` (a box wholly outside becomes one of no area)."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    return np.clip(boxes, 0.0, np.array([width, height, width, height], dtype=np.float64))


def hflip_boxes(boxes_xyxy: np.ndarray, width: int) -> np.ndarray:
    """Boxes under a left-right mirror of an image ``width`` pixels wide (augmentation)."""
    boxes = np.asarray(boxes_xyxy).reshape(-1, 4)
    return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1).astype(boxes.dtype)


def vflip_boxes(boxes_xyxy: np.ndarray, height: int) -> np.ndarray:
    """Boxes under an up-down mirror of an image ``height`` pixels tall (augmentation)."""
    boxes = np.asarray(boxes_xyxy).reshape(-1, 4)
    return np.stack([boxes[:, 0], height - boxes[:, 3], boxes[:, 2], height - boxes[:, 1]], axis=1).astype(boxes.dtype)


def box_problem(x: float, y: float, width: float, height: float, image_height: int, image_width: int) -> str | None:
    """Why an xywh box is unusable in an image of the given size, or None if it is fine."""
    values = np.array([x, y, width, height], dtype=np.float64)
    if not np.all(np.isfinite(values)):
        return f"box has a non-finite coordinate ({x}, {y}, {width}, {height})"
    if width <= 0 or height <= 0:
        return f"box is degenerate (width {width}, height {height})"
    if x < 0 or y < 0 or x + width > image_width or y + height > image_height:
        return (
            f"box ({x:g}, {y:g}, {width:g}, {height:g}) lies outside the {image_width}x{image_height} image"
        )
    return None
