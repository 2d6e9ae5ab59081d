"""CoMoTo's losses as pure functions: lesion feature points, ImPA and LsKD (Alberb et al., arXiv 2407.17620).

Semantics follow the reference implementation (docs/design.md section 3):

* **Lesion points** (the paper's "lesion-specific features", reference ``extract_critical_features``): P fixed
  points of each ground-truth box, read from a feature map (B, C, h, w) and averaged over the image's boxes.
* **Background points** (ImPA's negatives, reference ``extract_noncritical_features``): P random feature positions
  outside every box.
* **ImPA** (intra-modal point alignment, teacher training): pull the lesion points of all images together
  (cosine similarity -> 1) and push lesion points away from background points (cosine similarity -> <= 0).
* **LsKD** (lesion-specific knowledge distillation, student training): KL divergence between temperature-softened
  distributions over the P points of the teacher's (mammography) and the student's (DBT) batch-averaged lesion
  points, after a learnable Linear(P, P) on the student side.
* **Image-level KD** (baseline): the same KL on whole flattened feature maps.

Images without any box (lesion-free slices, which the reference never trains on) have no lesion points:
:func:`lesion_points` gives zeros for them and, with ``return_mask=True``, a mask; callers must leave them out
(:func:`masked_batch_mean`, or index ``points[mask]`` before :func:`impa_loss`) and skip the loss for a batch
without any box.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VALID_NUM_POINTS = (1, 4, 5, 9)


def _scale(features: Tensor, image_size: tuple[int, int] | list[int] | torch.Size) -> float:
    # One ratio for both axes, from the widths (feature width / image width), as the reference does.
    return features.shape[-1] / float(image_size[-1])


def _scaled_boxes(boxes: Tensor, scale: float) -> Tensor:
    # Same arithmetic as the reference (multiply in the boxes' own float dtype, then truncate toward zero), so
    # coordinates on a cell boundary land in the same cell.
    boxes = boxes.detach()
    if not boxes.is_floating_point():
        boxes = boxes.float()
    return (boxes * scale).to(torch.int64)


def has_boxes(boxes: list[Tensor]) -> Tensor:
    """(B,) bool: which images have at least one box."""
    return torch.tensor([b.numel() > 0 for b in boxes], dtype=torch.bool)


def _point_indices(scaled: Tensor, height: int, width: int, num_points: int) -> tuple[Tensor, Tensor]:
    """(rows (P, k), cols (P, k)) of the P points of k boxes on an h x w map, in the reference's order."""
    # Clamp to the last index as the reference; the lower bound only guards invalid negative input, which the
    # reference would wrap around to the far side of the map.
    xmin = scaled[:, 0].clamp(0, width - 1)
    ymin = scaled[:, 1].clamp(0, height - 1)
    xmax = scaled[:, 2].clamp(0, width - 1)
    ymax = scaled[:, 3].clamp(0, height - 1)
    cx = torch.div(xmin + xmax, 2, rounding_mode="floor")
    cy = torch.div(ymin + ymax, 2, rounding_mode="floor")
    corners = [(ymin, xmin), (ymin, xmax), (ymax, xmin), (ymax, xmax)]
    midpoints = [(cy, xmin), (cy, xmax), (ymin, cx), (ymax, cx)]
    if num_points == 1:
        points = [(cy, cx)]
    elif num_points == 4:
        points = corners
    elif num_points == 5:
        points = [(cy, cx), *midpoints]
    else:
        points = [*corners, (cy, cx), *midpoints]
    rows = torch.stack([p[0] for p in points])
    cols = torch.stack([p[1] for p in points])
    return rows, cols


def point_cells(boxes: Tensor, map_shape: tuple[int, int], image_width: int, num_points: int) -> tuple[Tensor, Tensor]:
    """(rows (P, k), cols (P, k)): the map cells :func:`lesion_points` reads for k boxes (xyxy input pixels) on an
    (h, w) map of an image ``image_width`` pixels wide: the same scale, truncation and clamping."""
    height, width = map_shape
    scaled = _scaled_boxes(boxes.reshape(-1, 4), width / float(image_width))
    return _point_indices(scaled, height, width, num_points)


def lesion_points(
    features: Tensor,
    boxes: list[Tensor],
    image_size: tuple[int, int],
    num_points: int,
    *,
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Lesion-specific feature points (the paper's critical points), (B, C, P).

    Args:
        features: feature map (B, C, h, w).
        boxes: per image (k, 4) xyxy in input-image pixels (x = column); k may be 0.
        image_size: (height, width) of the input image; scale = w / width for both axes.
        num_points: P in {1, 4, 5, 9}. Order: P=1 centre; P=4 (ymin,xmin), (ymin,xmax), (ymax,xmin), (ymax,xmax);
            P=5 centre, (cy,xmin), (cy,xmax), (ymin,cx), (ymax,cx); P=9 the 4 corners, centre, then the 4
            midpoints as for P=5. cx = (xmin+xmax)//2 and cy = (ymin+ymax)//2 of the truncated, clamped box.
        return_mask: also return the (B,) bool mask of images with at least one box.

    Each point's feature is averaged over the image's boxes. Images without boxes get zeros (see module doc).
    Gradients flow into ``features``.
    """
    if num_points not in VALID_NUM_POINTS:
        raise ValueError(f"num_points must be one of {VALID_NUM_POINTS}, got {num_points}")
    if features.ndim != 4 or len(boxes) != features.shape[0]:
        raise ValueError(
            f"features must be (B, C, h, w) with one box tensor per image; got {tuple(features.shape)} "
            f"and {len(boxes)} box tensors"
        )
    _, channels, height, width = features.shape
    per_image = []
    for sample, sample_boxes in zip(features, boxes):
        if sample_boxes.numel() == 0:
            per_image.append(sample.new_zeros(channels, num_points))
            continue
        rows, cols = (index.to(sample.device)
                      for index in point_cells(sample_boxes, (height, width), image_size[-1], num_points))
        per_image.append(sample[:, rows, cols].mean(dim=-1))  # (C, P, k) -> mean over boxes
    points = torch.stack(per_image)
    if return_mask:
        return points, has_boxes(boxes).to(features.device)
    return points


def background_points(
    features: Tensor,
    boxes: list[Tensor],
    image_size: tuple[int, int],
    num_points: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """ImPA negatives: ``num_points`` random feature positions outside every box of each image, (B, C, P).

    A box covers the cells [ymin, ymax) x [xmin, xmax) of its truncated scaled coordinates, as in the reference
    (so a box thinner than one cell excludes nothing). Positions are drawn without replacement with a CPU
    ``generator`` (seeded determinism). Where fewer than P free positions exist the reference would return fewer
    points and fail to stack them; here the free positions are drawn again (with replacement) to fill P, and an
    image with no free position gets zero vectors (cosine similarity 0: no push, no pull).
    """
    if num_points < 1:
        raise ValueError("num_points must be >= 1")
    if features.ndim != 4 or len(boxes) != features.shape[0]:
        raise ValueError("features must be (B, C, h, w) with one box tensor per image")
    _, channels, height, width = features.shape
    scale = _scale(features, image_size)
    per_image = []
    for sample, sample_boxes in zip(features, boxes):
        free = torch.ones(height, width, dtype=torch.bool)
        if sample_boxes.numel():
            for xmin, ymin, xmax, ymax in (
                _scaled_boxes(sample_boxes.reshape(-1, 4).cpu(), scale).clamp(min=0).tolist()
            ):
                free[ymin:ymax, xmin:xmax] = False
        candidates = torch.nonzero(free)
        count = candidates.shape[0]
        if count == 0:
            per_image.append(sample.new_zeros(channels, num_points))
            continue
        order = torch.randperm(count, generator=generator)[:num_points]
        if order.numel() < num_points:
            extra = torch.randint(count, (num_points - order.numel(),), generator=generator)
            order = torch.cat([order, extra])
        chosen = candidates[order].to(sample.device)
        per_image.append(sample[:, chosen[:, 0], chosen[:, 1]])
    return torch.stack(per_image)


def masked_batch_mean(points: Tensor, mask: Tensor) -> Tensor | None:
    """Average (B, C, P) over the images where ``mask`` is true -> (C, P); None when no image qualifies."""
    mask = mask.to(points.device)
    if not bool(mask.any()):
        return None
    return points[mask].mean(dim=0)


def impa_loss(positive: Tensor, negative: Tensor, beta: float) -> Tensor:
    """Intra-modal point alignment (ImPA).

    ``positive`` (B1, C, P) lesion points and ``negative`` (B2, C, P) background points are flattened per image to
    (B, C*P). With cos the cosine similarity over all ordered pairs (i, j) (the diagonal i = j included):
    ``beta * (mean_ij relu(1 - cos(pos_i, pos_j)) + mean_ij relu(cos(pos_i, neg_j)))``.
    The first term aligns lesions across images, the second separates lesions from background.
    """
    if positive.shape[0] == 0:
        raise ValueError("impa_loss needs at least one positive (lesion) sample")
    pos = positive.reshape(positive.shape[0], -1)
    neg = negative.reshape(negative.shape[0], -1)
    if pos.shape[1] != neg.shape[1]:
        raise ValueError(
            f"positive and negative points differ in size: {tuple(positive.shape)} vs {tuple(negative.shape)}"
        )
    pos_similarity = F.cosine_similarity(pos.unsqueeze(1), pos.unsqueeze(0), dim=2)
    neg_similarity = F.cosine_similarity(pos.unsqueeze(1), neg.unsqueeze(0), dim=2)
    return beta * (torch.relu(1.0 - pos_similarity).mean() + torch.relu(neg_similarity).mean())


def _softened_kl(student: Tensor, teacher: Tensor, alpha: float, temperature: float) -> Tensor:
    # dim=1 (over points / positions, per channel); KLDivLoss(input=log q_student, target=p_teacher) with
    # "batchmean" = sum over all entries / size(0) = / C.
    log_student = F.log_softmax(student / temperature, dim=1)
    teacher_prob = F.softmax(teacher.detach() / temperature, dim=1)
    kl = F.kl_div(log_student, teacher_prob, reduction="batchmean")
    return alpha * temperature * temperature * kl


def lesion_kd_loss(student: Tensor, teacher: Tensor, alpha: float, temperature: float) -> Tensor:
    """Lesion-specific knowledge distillation (LsKD).

    ``student`` (C, P): the student's batch-averaged lesion points already passed through :class:`PointProjection`;
    ``teacher`` (C, P): the teacher's batch-averaged lesion points (no gradient: detached here).
    Loss = ``alpha * T^2 * KLDivLoss(reduction="batchmean")(log_softmax(student / T, dim=1),
    softmax(teacher / T, dim=1))`` = alpha T^2 / C * sum_c KL(p_teacher,c || q_student,c), each channel a
    distribution over the P points (the reference's ``KD_loss`` argument order and dims).
    """
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(
            f"student and teacher points must both be (C, P); got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    return _softened_kl(student, teacher, alpha, temperature)


def image_kd_loss(
    student_map: Tensor, teacher_map: Tensor, projection: nn.Linear, alpha: float, temperature: float
) -> Tensor:
    """Image-level KD baseline: maps (B, C, h, w) flattened to (B, C, h*w), averaged over each batch -> (C, h*w);
    the student's goes through ``projection`` = Linear(student h*w -> teacher h*w); then the LsKD KL (dim=1 over
    positions). Student and teacher need the same channel count C."""
    student = student_map.flatten(2).mean(dim=0)
    teacher = teacher_map.flatten(2).mean(dim=0)
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"image-level KD needs equal channel counts, student {student.shape[0]} vs teacher "
            f"{teacher.shape[0]}"
        )
    projected = projection(student)
    if projected.shape != teacher.shape:
        raise ValueError(
            f"projection maps {tuple(student.shape)} to {tuple(projected.shape)}, teacher map is "
            f"{tuple(teacher.shape)}"
        )
    return _softened_kl(projected, teacher, alpha, temperature)


def image_projection(
    student_map_shape: torch.Size | tuple[int, ...], teacher_map_shape: torch.Size | tuple[int, ...]
) -> nn.Linear:
    """The learnable Linear(student h*w -> teacher h*w) of image-level KD, from (…, h, w) shapes."""
    student_positions = int(student_map_shape[-1]) * int(student_map_shape[-2])
    teacher_positions = int(teacher_map_shape[-1]) * int(teacher_map_shape[-2])
    return nn.Linear(student_positions, teacher_positions)


class PointProjection(nn.Module):
    """LsKD's learnable Linear(P, P) applied to the student's (C, P) lesion points (mixes points, per channel)."""

    def __init__(self, num_points: int):
        super().__init__()
        if num_points not in VALID_NUM_POINTS:
            raise ValueError(f"num_points must be one of {VALID_NUM_POINTS}, got {num_points}")
        self.num_points = num_points
        self.linear = nn.Linear(num_points, num_points)

    def forward(self, points: Tensor) -> Tensor:
        return self.linear(points)


__all__ = [
    "VALID_NUM_POINTS",
    "PointProjection",
    "background_points",
    "has_boxes",
    "image_kd_loss",
    "image_projection",
    "impa_loss",
    "lesion_kd_loss",
    "lesion_points",
    "masked_batch_mean",
    "point_cells",
]
