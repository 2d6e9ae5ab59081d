"""Per-image FROC: hand-built cases and a loop reference of the documented rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comoto_cli.metrics.image_froc import FROC_KEYS, froc_metrics, image_froc


def loop_image_froc(predictions, ground_truth, fps_per_image=(1, 2, 3, 4)):
    """Centre-in-box hits (nearest GT centre, first on ties), official threshold walk, numpy.interp."""
    scores, hits, offset = [], [], 0
    for pred, gt in zip(predictions, ground_truth):
        for (x0, y0, x1, y1), s in zip(pred["boxes"], pred["scores"]):
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            best = None
            for g, (a0, b0, a1, b1) in enumerate(gt):
                if a0 <= cx <= a1 and b0 <= cy <= b1:
                    d = math.hypot(cx - (a0 + a1) / 2, cy - (b0 + b1) / 2)
                    if best is None or d < best[0]:
                        best = (d, g)
            scores.append(float(s))
            hits.append(None if best is None else offset + best[1])
        offset += len(gt)
    if scores:
        thresholds = sorted([max(scores) + 1] + [s for s, h in zip(scores, hits) if h is not None]
                            + [min(scores) - 1], reverse=True)
    else:
        thresholds = [0.0]
    fps, sens = [], []
    for t in thresholds:
        found = {h for s, h in zip(scores, hits) if s >= t and h is not None}
        fps.append(sum(1 for s, h in zip(scores, hits) if s >= t and h is None) / len(ground_truth))
        sens.append(len(found) / offset)
        if fps[-1] > max(fps_per_image):
            break
    return [float(np.interp(f, fps, sens)) for f in fps_per_image]


def _image(boxes, scores):
    return {"boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4), "scores": np.asarray(scores, dtype=np.float64)}


def test_hand_built_case():
    gt = [np.array([[10, 10, 50, 50], [100, 100, 200, 200]]), np.zeros((0, 4)), np.array([[0, 0, 20, 20]])]
    preds = [
        _image([[20, 20, 40, 40], [25, 25, 45, 45], [300, 300, 320, 320]], [0.9, 0.8, 0.7]),  # hit, repeat, FP
        _image([[0, 0, 10, 10]], [0.95]),  # FP on a normal image
        _image([[-10, -10, 10, 10]], [0.6]),  # centre (0, 0) on the GT border: a hit
    ]
    result = image_froc(preds, gt)
    # thresholds 1.95, .9, .8 (the repeat hit is a threshold too), .6, -.4 -> lesions found 0, 1, 1, 2, 2;
    # FPs (0.95 and 0.7) 0, 1, 1, 2, 2 over 3 images
    assert result["sensitivities"].tolist() == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert result["fps"].tolist() == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert result["sensitivity_at_1_fp"] == pytest.approx(2 / 3)
    assert set(result) == {"sensitivity_at_1_fp", "sensitivity_at_2_fp", "sensitivity_at_3_fp",
                           "sensitivity_at_4_fp", "mean_sensitivity", "fps", "sensitivities"}


def test_nearest_gt_wins_when_centre_in_two_boxes():
    gt = [np.array([[0, 0, 100, 100], [40, 40, 140, 140]])]
    preds = [_image([[80, 80, 100, 100], [20, 20, 40, 40]], [0.9, 0.8])]  # centres (90,90)->box 1, (30,30)->box 0
    assert image_froc(preds, gt)["sensitivity_at_1_fp"] == 1.0


def test_no_ground_truth_gives_nan_and_no_predictions_gives_zero():
    result = image_froc([_image([[0, 0, 1, 1]], [0.5])], [np.zeros((0, 4))])
    assert math.isnan(result["mean_sensitivity"]) and result["fps"].size == 0
    result = image_froc([_image(np.zeros((0, 4)), [])], [np.array([[0, 0, 5, 5]])])
    assert result["mean_sensitivity"] == 0.0


def test_froc_metrics_are_the_validation_keys_with_nan_as_none():
    """The registered ``froc`` family: image_froc at 1-4 FP per image, undefined (no GT box) logged as None."""
    gt = [np.array([[10, 10, 50, 50]]), np.zeros((0, 4))]
    preds = [_image([[20, 20, 40, 40]], [0.9]), _image([[0, 0, 5, 5]], [0.5])]
    metrics = froc_metrics(preds, gt)
    assert tuple(metrics) == FROC_KEYS
    assert metrics == {key: image_froc(preds, gt)[key] for key in FROC_KEYS}
    assert froc_metrics([preds[1]], [gt[1]]) == dict.fromkeys(FROC_KEYS)


def test_mismatched_lengths_are_errors():
    with pytest.raises(ValueError):
        image_froc([_image([[0, 0, 1, 1]], [0.5])], [])


@st.composite
def image_cases(draw):
    images = draw(st.integers(1, 4))
    predictions, ground_truth = [], []
    for _ in range(images):
        gt = [[x, y, x + w, y + h] for x, y, w, h in
              draw(st.lists(st.tuples(*[st.integers(0, 30)] * 2, *[st.integers(0, 20)] * 2), max_size=3))]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in
                 draw(st.lists(st.tuples(*[st.integers(0, 40)] * 2, *[st.integers(0, 10)] * 2), max_size=6))]
        scores = [draw(st.sampled_from([0.2, 0.5, 0.8]) | st.floats(0, 1)) for _ in boxes]
        predictions.append(_image(boxes, scores))
        ground_truth.append(np.asarray(gt, dtype=np.float64).reshape(-1, 4))
    return predictions, ground_truth


@settings(max_examples=120, deadline=None)
@given(image_cases())
def test_matches_loop_reference(case):
    predictions, ground_truth = case
    result = image_froc(predictions, ground_truth)
    if sum(len(g) for g in ground_truth) == 0:
        assert math.isnan(result["mean_sensitivity"])
        return
    expected = loop_image_froc(predictions, ground_truth)
    for f, value in zip((1, 2, 3, 4), expected):
        assert result[f"sensitivity_at_{f}_fp"] == pytest.approx(value, abs=1e-12)
    assert result["mean_sensitivity"] == pytest.approx(float(np.mean(expected)), abs=1e-12)
