"""Volume NMS: merge per-slice 2D detections of one DBT volume into 3D detections (docs/design.md section 3).

Reference: ``NMS_volume`` in Muhammad-Al-Barbary/CoMoTo (``comoto/engine/utils.py``, itself from
ICEBERG-VICOROB/DBT_phase2). There, with L slices in the volume's prediction list, ``depth = int(L / 4)``
(truncation) and a box on slice i is compared with every box on slices ``[max(i - depth, 0), min(i + depth, L))``
-- inclusive below, EXCLUSIVE above, the box's own slice and itself included. A box is kept when its score is
``>=`` the score of every box in that window whose IoU with it is ``> 0.5`` (itself included, so a box is never
suppressed by itself), and its score is ``>= 0.001``.

Our choices where the reference is silent or accidental (documented, deliberate):

- ``window_fraction`` generalises the 4: ``depth = int(num_slices * window_fraction)``; the window is
  ``slice_index[j] in [slice_index[i] - depth, slice_index[i] + depth)``. Clipping to [0, L) does not change
  which boxes are in the window because every box lies on a slice of the volume; comparisons use the caller's
  slice numbers, so skipped edge slices need no offset.
- ``depth == 0`` (fewer than 1 / window_fraction slices) makes the reference's window empty (it crashes);
  we then use the box's own slice only.
- The reference keeps a box that is alone in its window whatever its score (a ``min_score_s = 0`` branch) and
  drops a zero-area box (IoU with itself is 0, so it has no 'overlapping' box). We apply ``min_score`` to every
  box and also drop zero-area boxes (they cannot be located).
- IoU in float64 (the reference: float32); boxes below ``min_score`` are removed first: they can never be kept
  and can never suppress a box that scores ``>= min_score``, so the result is unchanged.
"""

from __future__ import annotations

import numpy as np

#: Work arrays of the chunked pairwise IoU stay below this many elements (memory bound ~ 8 bytes x this x 6).
_CHUNK_ELEMENTS = 2_000_000


def pairwise_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of every pair of xyxy boxes: (n, 4) x (m, 4) -> (n, m); 0 where the union is empty."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    width = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    height = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = width * height
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=inter > 0)


def volume_nms(
    slice_index: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    num_slices: int,
    *,
    iou_threshold: float = 0.5,
    min_score: float = 0.001,
    window_fraction: float = 0.25,
    max_boxes: int | None = None,
) -> np.ndarray:
    """Indices of the boxes kept, sorted by descending score (ties: input order), at most ``max_boxes``.

    ``slice_index`` (n,) slice of each box, ``boxes`` (n, 4) xyxy on that slice, ``scores`` (n,),
    ``num_slices`` the volume's number of slices L. A box survives when no box on slices
    ``[i - int(L * window_fraction), i + int(L * window_fraction))`` overlapping it with IoU > ``iou_threshold``
    scores higher, and its own score is >= ``min_score``.
    """
    slice_index = np.asarray(slice_index).reshape(-1)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not (slice_index.size == boxes.shape[0] == scores.size):
        raise ValueError(
            f"volume_nms: {slice_index.size} slice indices, {boxes.shape[0]} boxes, {scores.size} scores"
        )
    if num_slices < 1:
        raise ValueError("volume_nms: num_slices must be >= 1")
    if max_boxes is not None and max_boxes < 0:
        raise ValueError("volume_nms: max_boxes must be >= 0")
    depth = int(num_slices * window_fraction)
    low_offset, high_offset = -depth, max(depth, 1)  # window [i + low, i + high)

    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    candidates = np.flatnonzero((scores >= min_score) & (area > 0) & np.isfinite(scores))
    if candidates.size == 0:
        return np.zeros(0, dtype=np.int64)

    # Sort candidates by slice so each box's window is one contiguous run of columns.
    order = candidates[np.argsort(slice_index[candidates], kind="stable")]
    z = slice_index[order]
    box = boxes[order]
    score = scores[order]
    lo = np.searchsorted(z, z + low_offset, side="left")
    hi = np.searchsorted(z, z + high_offset, side="left")

    kept = np.zeros(order.size, dtype=bool)
    start = 0
    while start < order.size:
        # Grow the row chunk while rows x (their window span) stays within the memory bound.
        stop = start + 1
        while stop < order.size and (stop + 1 - start) * (hi[stop] - lo[start]) <= _CHUNK_ELEMENTS:
            stop += 1
        col0, col1 = lo[start], hi[stop - 1]
        iou = pairwise_iou(box[start:stop], box[col0:col1])
        columns = np.arange(col0, col1)
        in_window = (columns[None, :] >= lo[start:stop, None]) & (columns[None, :] < hi[start:stop, None])
        rivals = in_window & (iou > iou_threshold)
        best_rival = np.max(np.where(rivals, score[None, col0:col1], -np.inf), axis=1)
        kept[start:stop] = score[start:stop] >= best_rival
        start = stop

    survivors = np.sort(order[kept])  # input order first, so the stable sort breaks score ties by it
    survivors = survivors[np.argsort(-scores[survivors], kind="stable")]
    if max_boxes is not None:
        survivors = survivors[:max_boxes]
    return survivors.astype(np.int64)
