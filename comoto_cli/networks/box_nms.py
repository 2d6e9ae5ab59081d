"""Greedy 2-D box NMS with exactly MONAI's results, for the detector's own post-processing.

MONAI's ``non_max_suppression`` is a Python loop with heavy per-call checks; :func:`greedy_nms` gives the same
indices (same float32 arithmetic, same tie-break) at a fraction of the cost. Boxes may be in either coordinate
order, as long as it is the same for all of them: IoU does not depend on it.
"""

from __future__ import annotations

import numpy as np

# Candidates resolved per matrix step: large enough to amortise numpy calls, small enough that a chunk's IoU
# matrix stays cheap when only a few picks are needed.
_CHUNK = 256


def _iou_with(coords: tuple[np.ndarray, ...], area: np.ndarray, others: np.ndarray, picked: np.ndarray) -> np.ndarray:
    """IoU (len(picked), len(others)) in MONAI's float32 arithmetic: intersection of the clamped overlaps over
    (area + area - intersection + eps). ``coords``: 4 arrays (n,), ``area`` (n,), index arrays into them."""
    a0, a1, a2, a3 = (c[picked][:, None] for c in coords)
    b0, b1, b2, b3 = (c[others][None, :] for c in coords)
    extent0 = np.maximum(np.minimum(b2, a2) - np.maximum(b0, a0), 0)
    extent1 = np.maximum(np.minimum(b3, a3) - np.maximum(b1, a1), 0)
    inter = extent0 * extent1
    return inter / ((area[others][None, :] + area[picked][:, None] - inter) + np.finfo(np.float32).eps)


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, max_keep: int) -> np.ndarray:
    """Indices (m,) int64 of the boxes kept, best first: exactly MONAI's ``non_max_suppression`` (stable
    descending sort, a box survives when its float32 IoU with every earlier pick is <= threshold, stop after
    ``max_keep`` picks; ``max_keep`` < 1: no limit). ``boxes`` (n, 4) corner form, ``scores`` (n,).

    Greedy NMS decides a box only from the picks made before it, so candidates are taken in score-ordered chunks:
    a chunk is first checked against all picks so far in one matrix operation, then resolved greedily within
    itself from its own IoU matrix (one boolean row operation per pick). Once ``max_keep`` boxes are picked the
    low-scoring rest is never looked at.
    """
    order = np.argsort(-scores, kind="stable")
    sorted_boxes = np.ascontiguousarray(boxes[order], dtype=np.float32)
    coords = tuple(np.ascontiguousarray(sorted_boxes[:, k]) for k in range(4))
    area = (coords[2] - coords[0]) * (coords[3] - coords[1])
    picks: list[int] = []
    for start in range(0, len(order), _CHUNK):
        candidates = np.arange(start, min(start + _CHUNK, len(order)))
        if picks:
            overlap = _iou_with(coords, area, candidates, np.asarray(picks))
            candidates = candidates[np.all(overlap <= threshold, axis=0)]
        if not candidates.size:
            continue
        # survives[i, j]: candidate j is not suppressed if candidate i is picked.
        survives = _iou_with(coords, area, candidates, candidates) <= threshold
        alive = np.ones(len(candidates), dtype=bool)
        for i in range(len(candidates)):
            if not alive[i]:
                continue
            picks.append(int(candidates[i]))
            if len(picks) >= max_keep >= 1:
                return order[np.asarray(picks, dtype=np.int64)]
            alive &= survives[i]
    return order[np.asarray(picks, dtype=np.int64)]


__all__ = ["greedy_nms"]
