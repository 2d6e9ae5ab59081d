"""Volume NMS: window rounding of the reference, vectorised vs a loop reference, invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comoto_cli.inference import volume_nms as nms_module
from comoto_cli.inference.volume_nms import pairwise_iou, volume_nms


def loop_volume_nms(z, boxes, scores, num_slices, iou_threshold=0.5, min_score=0.001, window_fraction=0.25):
    """One box at a time: suppressed when a box in its slice window overlaps it (IoU > t) with a higher score."""
    depth = int(num_slices * window_fraction)
    kept = []
    for i in range(len(scores)):
        x0, y0, x1, y1 = boxes[i]
        if scores[i] < min_score or (x1 - x0) * (y1 - y0) <= 0:
            continue
        suppressed = False
        for j in range(len(scores)):
            if not (z[i] - depth <= z[j] < z[i] + max(depth, 1)):
                continue
            a0, b0, a1, b1 = boxes[j]
            inter = max(0.0, min(x1, a1) - max(x0, a0)) * max(0.0, min(y1, b1) - max(y0, b0))
            union = (x1 - x0) * (y1 - y0) + (a1 - a0) * (b1 - b0) - inter
            if inter > 0 and inter / union > iou_threshold and scores[j] > scores[i]:
                suppressed = True
        if not suppressed:
            kept.append(i)
    return sorted(kept, key=lambda k: (-scores[k], k))


@st.composite
def detections(draw):
    n = draw(st.integers(0, 25))
    num_slices = draw(st.integers(1, 30))
    z = np.array([draw(st.integers(0, num_slices - 1)) for _ in range(n)], dtype=np.int64)
    corners = np.array([[draw(st.integers(0, 40)), draw(st.integers(0, 40))] for _ in range(n)], dtype=np.float64).reshape(-1, 2)
    sizes = np.array([[draw(st.integers(0, 20)), draw(st.integers(0, 20))] for _ in range(n)], dtype=np.float64).reshape(-1, 2)
    boxes = np.concatenate([corners, corners + sizes], axis=1)
    scores = np.array([draw(st.sampled_from([0.0005, 0.2, 0.5, 0.9]) | st.floats(0, 1)) for _ in range(n)])
    return z, boxes, scores, num_slices


@settings(max_examples=150, deadline=None)
@given(detections())
def test_matches_loop_reference(case):
    z, boxes, scores, num_slices = case
    assert volume_nms(z, boxes, scores, num_slices).tolist() == loop_volume_nms(z, boxes, scores, num_slices)


@settings(max_examples=80, deadline=None)
@given(detections(), st.randoms(use_true_random=False))
def test_kept_set_is_invariant_under_input_order(case, rnd):
    z, boxes, scores, num_slices = case
    order = np.array(rnd.sample(range(len(scores)), len(scores)), dtype=np.int64)
    kept = set(volume_nms(z, boxes, scores, num_slices).tolist())
    kept_permuted = set(order[volume_nms(z[order], boxes[order], scores[order], num_slices)].tolist())
    assert kept == kept_permuted


@settings(max_examples=80, deadline=None)
@given(detections())
def test_best_box_is_kept_and_output_sorted(case):
    z, boxes, scores, num_slices = case
    kept = volume_nms(z, boxes, scores, num_slices)
    assert np.all(np.diff(scores[kept]) <= 0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    eligible = np.flatnonzero((area > 0) & (scores >= 0.001))
    if eligible.size:
        assert eligible[np.argmax(scores[eligible])] in kept.tolist()


def test_lone_box_is_kept_and_low_or_empty_boxes_are_not():
    box = np.array([[10.0, 10.0, 30.0, 40.0]])
    assert volume_nms(np.array([3]), box, np.array([0.4]), 10).tolist() == [0]
    assert volume_nms(np.array([3]), box, np.array([0.0009]), 10).tolist() == []
    assert volume_nms(np.array([3]), np.array([[5.0, 5.0, 5.0, 9.0]]), np.array([0.9]), 10).tolist() == []
    assert volume_nms(np.zeros(0), np.zeros((0, 4)), np.zeros(0), 10).tolist() == []


def test_window_is_truncated_and_half_open_like_the_reference():
    # L = 11, fraction 1/4 -> depth int(2.75) = 2; box on slice i sees slices [i - 2, i + 2).
    box = np.array([10.0, 10.0, 50.0, 50.0])
    boxes = np.stack([box, box])
    # Higher-scoring twin two slices BELOW: inside the window -> suppressed.
    assert volume_nms(np.array([5, 3]), boxes, np.array([0.5, 0.9]), 11).tolist() == [1]
    # Higher-scoring twin two slices ABOVE: outside (exclusive upper end) -> both kept.
    assert volume_nms(np.array([5, 7]), boxes, np.array([0.5, 0.9]), 11).tolist() == [1, 0]
    # Three slices below: outside.
    assert volume_nms(np.array([5, 2]), boxes, np.array([0.5, 0.9]), 11).tolist() == [1, 0]
    # L = 3 -> depth 0: only the box's own slice.
    assert volume_nms(np.array([1, 1, 0]), np.stack([box] * 3), np.array([0.5, 0.9, 0.95]), 3).tolist() == [2, 1]


def test_iou_threshold_is_strict_and_ties_keep_both():
    a = np.array([0.0, 0.0, 30.0, 10.0])
    b = np.array([10.0, 0.0, 40.0, 10.0])  # IoU = 20 / 40 = 0.5 exactly
    assert pairwise_iou(a, b)[0, 0] == 0.5
    assert volume_nms(np.array([0, 0]), np.stack([a, b]), np.array([0.4, 0.8]), 8).tolist() == [1, 0]
    assert volume_nms(np.array([0, 0]), np.stack([a, b]), np.array([0.4, 0.8]), 8, iou_threshold=0.49).tolist() == [1]
    # Equal scores never suppress each other (score >= every rival).
    assert volume_nms(np.array([0, 0]), np.stack([a, a]), np.array([0.7, 0.7]), 8).tolist() == [0, 1]


def test_max_boxes_and_chunked_path(monkeypatch):
    rng = np.random.default_rng(0)
    n = 300
    z = rng.integers(0, 40, n)
    xy = rng.uniform(0, 200, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (n, 2))], axis=1)
    scores = rng.random(n)
    full = volume_nms(z, boxes, scores, 40)
    assert full.tolist() == loop_volume_nms(z, boxes, scores, 40)
    monkeypatch.setattr(nms_module, "_CHUNK_ELEMENTS", 50)  # many small chunks
    assert volume_nms(z, boxes, scores, 40).tolist() == full.tolist()
    assert volume_nms(z, boxes, scores, 40, max_boxes=5).tolist() == full[:5].tolist()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="slice indices"):
        volume_nms(np.array([0, 1]), np.zeros((1, 4)), np.array([0.5]), 4)


def reference_nms_volume(num_slices, z, boxes, scores, skip=4):
    """The reference implementation's volume NMS, restated: its prediction list holds the ``num_slices - 2 * skip``
    slices that went through the detector (slice ``skip + k`` at position k); ``depth = int(len / 4)`` over list
    positions; a box at position i sees positions ``[max(i - depth, 0), min(i + depth, len))`` and is kept when its
    score is >= every score there with IoU > 0.5 and >= 0.001 (a box alone in its window: score >= 0)."""
    length = num_slices - 2 * skip
    depth = int(length / 4)
    kept = []
    for i in range(len(scores)):
        position = z[i] - skip
        window = [j for j in range(len(scores))
                  if max(position - depth, 0) <= z[j] - skip < min(position + depth, length)]
        if len(window) == 1:
            if scores[i] >= 0.0:
                kept.append(i)
            continue
        iou = pairwise_iou(boxes[i:i + 1], boxes[window])[0]
        rivals = [scores[j] for j, overlap in zip(window, iou) if overlap > 0.5]
        if rivals and scores[i] >= max(rivals) and scores[i] >= 0.001:
            kept.append(i)
    return sorted(kept)


def test_detected_window_is_the_reference_formula_on_random_volumes():
    """``skip_edge_slices`` 4 with ``nms_window_slices`` "detected" keeps what the reference keeps on 60 random
    volumes (boxes of positive area, scores >= 0.001); the volume's own slice count gives another window on some."""
    from comoto_cli.config import InferenceConfig
    from comoto_cli.inference.volume import top_volume_nms

    rng = np.random.default_rng(0)
    reference = InferenceConfig(skip_edge_slices=4, nms_window_slices="detected", max_boxes_per_volume=10_000)
    ours = InferenceConfig(skip_edge_slices=4, max_boxes_per_volume=10_000)
    differ = 0
    for _ in range(60):
        n = int(rng.integers(12, 80))
        count = int(rng.integers(1, 40))
        z = rng.integers(4, n - 4, count)
        corner = np.round(rng.uniform(0, 60, (count, 2)) / 6) * 6  # on a grid: many overlaps above IoU 0.5
        boxes = np.concatenate([corner, corner + rng.choice([18.0, 24.0], (count, 2))], axis=1)
        scores = np.round(rng.uniform(0.001, 1.0, count), 2)  # ties included
        expected = reference_nms_volume(n, z, boxes, scores)
        assert sorted(top_volume_nms(z, boxes, scores, n, reference).tolist()) == expected, (n, z.tolist())
        differ += sorted(top_volume_nms(z, boxes, scores, n, ours).tolist()) != expected
    assert differ > 0  # the option matters: the window of all n slices is wider


def test_detected_window_depth_is_int_of_n_minus_8_over_4():
    from comoto_cli.config import InferenceConfig
    from comoto_cli.inference.volume import window_slices

    config = InferenceConfig(skip_edge_slices=4, nms_window_slices="detected")
    for n in (9, 12, 13, 40, 61, 64, 99):
        assert int(window_slices(n, config) * 0.25) == int((n - 8) / 4)
    assert window_slices(64, InferenceConfig(skip_edge_slices=4)) == 64
