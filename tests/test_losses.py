"""CoMoTo losses against hand-computed values (docs/design.md section 3, reference semantics)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from comoto_cli.losses import (
    PointProjection,
    background_points,
    image_kd_loss,
    image_projection,
    impa_loss,
    lesion_kd_loss,
    lesion_points,
    masked_batch_mean,
)

# Feature map (1, 2, 4, 8): channel 0 at (row y, col x) holds 10*y + x, channel 1 holds 100 + 10*y + x.
# Input images are 32 x 64 (height x width): scale = 8 / 64 = 0.125 for both axes.
H, W = 4, 8
IMAGE = (32, 64)


def coded_features(batch: int = 1) -> torch.Tensor:
    rows = torch.arange(H).view(H, 1).float()
    cols = torch.arange(W).view(1, W).float()
    base = 10 * rows + cols
    single = torch.stack([base, 100 + base])
    return single.unsqueeze(0).repeat(batch, 1, 1, 1)


def value(y: int, x: int) -> float:
    return 10.0 * y + x


# Box [8, 4, 40, 28] -> x 1, y 0.5 -> 0, x 5, y 3.5 -> 3: xmin 1, ymin 0, xmax 5, ymax 3, cx 3, cy 1.
BOX = torch.tensor([[8.0, 4.0, 40.0, 28.0]])


@pytest.mark.parametrize(
    "num_points, expected",
    [
        (1, [value(1, 3)]),
        (4, [value(0, 1), value(0, 5), value(3, 1), value(3, 5)]),
        (5, [value(1, 3), value(1, 1), value(1, 5), value(0, 3), value(3, 3)]),
        (
            9,
            [
                value(0, 1),
                value(0, 5),
                value(3, 1),
                value(3, 5),
                value(1, 3),
                value(1, 1),
                value(1, 5),
                value(0, 3),
                value(3, 3),
            ],
        ),
    ],
)
def test_lesion_points_order_and_values(num_points, expected):
    points = lesion_points(coded_features(), [BOX], IMAGE, num_points)
    assert points.shape == (1, 2, num_points)
    assert points[0, 0].tolist() == expected
    assert points[0, 1].tolist() == [100 + v for v in expected]


def test_lesion_points_average_over_boxes():
    # Second box [0, 0, 16, 16] -> [0, 0, 2, 2]: centre (1, 1).
    boxes = torch.tensor([[8.0, 4.0, 40.0, 28.0], [0.0, 0.0, 16.0, 16.0]])
    centre = lesion_points(coded_features(), [boxes], IMAGE, 1)
    assert centre[0, 0, 0].item() == pytest.approx((value(1, 3) + value(1, 1)) / 2)
    corners = lesion_points(coded_features(), [boxes], IMAGE, 4)
    expected = [
        (value(0, 1) + value(0, 0)) / 2,
        (value(0, 5) + value(0, 2)) / 2,
        (value(3, 1) + value(2, 0)) / 2,
        (value(3, 5) + value(2, 2)) / 2,
    ]
    assert corners[0, 0].tolist() == pytest.approx(expected)


def test_lesion_points_truncate_not_round():
    # [15.9, 7.9, 23.9, 15.9] * 0.125 = [1.99, 0.99, 2.99, 1.99] -> [1, 0, 2, 1]; centre ((0+1)//2, (1+2)//2).
    box = torch.tensor([[15.9, 7.9, 23.9, 15.9]])
    assert lesion_points(coded_features(), [box], IMAGE, 1)[0, 0, 0].item() == value(0, 1)


def test_lesion_points_clamp_at_border():
    # Touching the right/bottom border: [56, 24, 64, 32] -> [7, 3, 8, 4]; xmax, ymax clamp to 7 and 3.
    touching = torch.tensor([[56.0, 24.0, 64.0, 32.0]])
    assert lesion_points(coded_features(), [touching], IMAGE, 9)[0, 0].tolist() == [value(3, 7)] * 9
    # Reaching past the image: only the last index is read.
    beyond = torch.tensor([[40.0, 8.0, 100.0, 90.0]])  # -> [5, 1, 12, 11] -> [5, 1, 7, 3]; c = (6, 2)
    points = lesion_points(coded_features(), [beyond], IMAGE, 5)[0, 0].tolist()
    assert points == [value(2, 6), value(2, 5), value(2, 7), value(1, 6), value(3, 6)]


def test_lesion_points_scale_uses_width_only():
    # The reference scales both axes by feature width / image width; the image height plays no part.
    a = lesion_points(coded_features(), [BOX], (32, 64), 9)
    b = lesion_points(coded_features(), [BOX], (1000, 64), 9)
    assert torch.equal(a, b)
    c = lesion_points(coded_features(), [BOX], (32, 128), 9)  # scale halves -> other cells
    assert not torch.equal(a, c)


def test_lesion_points_images_without_boxes_and_mask():
    features = coded_features(batch=3)
    boxes = [BOX, torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 16.0, 16.0]])]
    points, mask = lesion_points(features, boxes, IMAGE, 1, return_mask=True)
    assert mask.tolist() == [True, False, True]
    assert torch.count_nonzero(points[1]) == 0
    mean = masked_batch_mean(points, mask)
    assert mean[0, 0].item() == pytest.approx((value(1, 3) + value(1, 1)) / 2)
    assert masked_batch_mean(points[1:2], mask[1:2]) is None


def test_lesion_points_gradient_reaches_features():
    features = coded_features().requires_grad_(True)
    lesion_points(features, [BOX], IMAGE, 1).sum().backward()
    grad = features.grad[0, 0]
    assert grad[1, 3].item() == 1.0 and grad.sum().item() == 1.0


def test_lesion_points_rejects_bad_num_points():
    with pytest.raises(ValueError):
        lesion_points(coded_features(), [BOX], IMAGE, 3)


# ---------------------------------------------------------------------------------------------- background
def test_background_points_outside_boxes_and_seeded():
    # Box [0, 0, 48, 32] -> cells x 0..5, all rows: free cells are columns 6 and 7.
    box = torch.tensor([[0.0, 0.0, 48.0, 32.0]])
    features = coded_features(batch=2)
    generator = torch.Generator().manual_seed(3)
    points = background_points(features, [box, box], IMAGE, 5, generator=generator)
    assert points.shape == (2, 2, 5)
    columns = (points[:, 0] % 10).flatten().tolist()
    assert set(columns) <= {6.0, 7.0}
    # Without replacement: five distinct free cells per image.
    assert len(set(points[0, 0].tolist())) == 5
    again = background_points(features, [box, box], IMAGE, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(points, again)


def test_background_points_box_end_is_exclusive_and_few_free_cells():
    # [0, 0, 56, 32] -> x 0..6 excluded (end 7 exclusive): only column 7 is free (4 cells) for 9 points.
    box = torch.tensor([[0.0, 0.0, 56.0, 32.0]])
    points = background_points(coded_features(), [box], IMAGE, 9, generator=torch.Generator().manual_seed(0))
    assert points.shape == (1, 2, 9)
    assert set((points[0, 0] % 10).tolist()) == {7.0}
    covered = torch.tensor([[0.0, 0.0, 64.0, 32.0]])
    assert torch.count_nonzero(background_points(coded_features(), [covered], IMAGE, 4)) == 0


def test_background_points_image_without_box_uses_whole_map():
    points = background_points(
        coded_features(), [torch.zeros(0, 4)], IMAGE, 32, generator=torch.Generator().manual_seed(1)
    )
    assert sorted(points[0, 0].tolist()) == sorted(coded_features()[0, 0].flatten().tolist())


# ---------------------------------------------------------------------------------------------- ImPA
def test_impa_identical_positives_orthogonal_negatives_is_zero():
    positive = torch.tensor([[[1.0], [2.0]], [[2.0], [4.0]]])  # (2, 2, 1): parallel vectors
    negative = torch.tensor([[[2.0], [-1.0]]])  # orthogonal to both
    assert impa_loss(positive, negative, beta=2.0).item() == pytest.approx(0.0, abs=1e-6)
    # Opposite negatives: cos = -1, relu -> 0 as well.
    assert impa_loss(positive, -positive, beta=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_impa_hand_computed():
    positive = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (B=2, C=1, P=2) -> flat [1,0] and [0,1]
    negative = torch.tensor([[[1.0, 1.0]]])
    # pos cos matrix [[1, 0], [0, 1]] -> relu(1 - cos) mean = 2 / 4; neg cos = 1/sqrt(2) for both.
    expected = 3.0 * (0.5 + 1 / math.sqrt(2))
    assert impa_loss(positive, negative, beta=3.0).item() == pytest.approx(expected, rel=1e-6)
    # Negatives equal to the positives: second term = mean of the cosine matrix = 2 / 4.
    assert impa_loss(positive, positive, beta=1.0).item() == pytest.approx(0.5 + 0.5, rel=1e-6)


# ---------------------------------------------------------------------------------------------- LsKD
def manual_kd(student, teacher, alpha, temperature):
    channels, points = student.shape
    total = 0.0
    for c in range(channels):
        s = [student[c, p].item() / temperature for p in range(points)]
        t = [teacher[c, p].item() / temperature for p in range(points)]
        s_norm = math.log(sum(math.exp(v) for v in s))
        t_norm = sum(math.exp(v) for v in t)
        for p in range(points):
            pt = math.exp(t[p]) / t_norm
            log_qs = s[p] - s_norm
            total += pt * (math.log(pt) - log_qs)
    return alpha * temperature**2 * total / channels


def test_lesion_kd_matches_hand_computed_kl():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 9, generator=generator)
    teacher = torch.randn(3, 9, generator=generator)
    got = lesion_kd_loss(student, teacher, alpha=2.0, temperature=4.0).item()
    assert got == pytest.approx(manual_kd(student, teacher, 2.0, 4.0), rel=1e-5)
    assert lesion_kd_loss(teacher, teacher, 2.0, 4.0).item() == pytest.approx(0.0, abs=1e-5)


def test_lesion_kd_softmax_is_over_points():
    teacher = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    # A per-channel constant shift leaves each channel's distribution over points unchanged ...
    shifted_rows = teacher + torch.arange(4.0).view(4, 1)
    assert lesion_kd_loss(shifted_rows, teacher, 1.0, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    # ... a per-point shift does not.
    shifted_cols = teacher + torch.arange(5.0).view(1, 5)
    assert lesion_kd_loss(shifted_cols, teacher, 1.0, 2.0).item() > 0.01


def test_lesion_kd_gradients_reach_student_and_projection_only():
    torch.manual_seed(0)
    student_map = torch.randn(2, 3, 4, 8, requires_grad=True)
    teacher_map = torch.randn(2, 3, 4, 8, requires_grad=True)
    projection = PointProjection(9)
    student = projection(lesion_points(student_map, [BOX, BOX], IMAGE, 9).mean(0))
    teacher = lesion_points(teacher_map, [BOX, BOX], IMAGE, 9).mean(0)
    loss = lesion_kd_loss(student, teacher, alpha=2.0, temperature=4.0)
    loss.backward()
    assert student_map.grad is not None and student_map.grad.abs().sum() > 0
    assert projection.linear.weight.grad is not None and projection.linear.weight.grad.abs().sum() > 0
    assert teacher_map.grad is None


def test_point_projection_is_linear_over_points():
    projection = PointProjection(4)
    with torch.no_grad():
        projection.linear.weight.copy_(torch.eye(4).flip(0))
        projection.linear.bias.zero_()
    points = torch.arange(8.0).view(2, 4)
    assert projection(points).tolist() == [[3.0, 2.0, 1.0, 0.0], [7.0, 6.0, 5.0, 4.0]]
    with pytest.raises(ValueError):
        PointProjection(7)


# ---------------------------------------------------------------------------------------------- image-level KD
def test_image_kd_loss_matches_manual():
    generator = torch.Generator().manual_seed(2)
    student_map = torch.randn(2, 3, 2, 4, generator=generator, requires_grad=True)
    teacher_map = torch.randn(3, 3, 4, 4, generator=generator)
    projection = image_projection(student_map.shape, teacher_map.shape)
    assert (projection.in_features, projection.out_features) == (8, 16)
    loss = image_kd_loss(student_map, teacher_map, projection, alpha=2.0, temperature=4.0)
    student = projection(student_map.flatten(2).mean(0))
    teacher = teacher_map.flatten(2).mean(0)
    assert loss.item() == pytest.approx(manual_kd(student.detach(), teacher, 2.0, 4.0), rel=1e-5)
    loss.backward()
    assert projection.weight.grad is not None and student_map.grad is not None


def test_image_kd_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="channel"):
        image_kd_loss(torch.randn(1, 2, 2, 2), torch.randn(1, 3, 2, 2), nn.Linear(4, 4), 1.0, 1.0)
