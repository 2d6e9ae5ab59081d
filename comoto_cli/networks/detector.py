"""The CoMoTo detector: a 2-D MONAI RetinaNet (one foreground class, "lesion") on a registered backbone (by default
a ResNet-FPN, :mod:`comoto_cli.networks.backbones`), no torchvision.

The paper's "2 classes" are background + lesion; RetinaNet's sigmoid classifier models only the foreground, so the
MONAI network has ``num_classes = 1`` and every target label is 0.

Box convention at this module's boundary: ``(x_min, y_min, x_max, y_max)`` in image pixels, x = column. MONAI's
detection code orders box coordinates by tensor axis (axis 0 = rows first), so boxes are swapped on the way in and
out; nothing else in the project sees MONAI's order.

Training returns the detection losses *and* the distillation feature map of the same forward pass (the map that
ImPA and LsKD act on, see :mod:`comoto_cli.networks.backbones`); MONAI's own ``forward`` returns only losses in
training mode, so the heads, anchors and ``compute_loss`` are driven here directly. Prediction
(:meth:`ComotoDetector.predict`, the project's only one) likewise drives the heads and post-processes the whole
batch at once: MONAI's per-image post-processing gives the same numbers at several times the cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher, Matcher
from monai.data.box_utils import box_iou, clip_boxes_to_image
from monai.losses import FocalLoss
from torch import Tensor, nn

from comoto_cli.config import ModelConfig
from comoto_cli.errors import UsageError
from comoto_cli.networks.backbones import FeatureExtractor, build_backbone, load_configured_weights
from comoto_cli.networks.box_nms import greedy_nms

# Anchor sampling for the classification loss, as in MONAI's detection tutorials (LUNA16 RetinaNet).
HARD_NEGATIVE_BATCH_PER_IMAGE = 64
HARD_NEGATIVE_POSITIVE_FRACTION = 0.3
HARD_NEGATIVE_MIN = 16
HARD_NEGATIVE_POOL_SIZE = 20
ATSS_CANDIDATES = 4

# MONAI box order (axis 0 first) <-> (x, y) image order: the same permutation both ways.
_SWAP_XY = [1, 0, 3, 2]

# MONAI's matched-index codes: background and ignored anchors.
BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS = Matcher.BELOW_LOW_THRESHOLD, Matcher.BETWEEN_THRESHOLDS

# RetinaNet's heads use GroupNorm(8 groups): the FPN width must be a multiple of 8.
_HEAD_GROUPS = 8


class AtssRetinaNetDetector(RetinaNetDetector):
    """MONAI's RetinaNetDetector with an anchor matcher step that works without torchvision.

    The parent's ``compute_anchor_matched_idxs`` tests ``isinstance(matcher, torchvision Matcher)`` before the ATSS
    branch, which raises when torchvision is absent; MONAI documents overriding this method as the extension point.
    The hard-negative sampler branch of ``get_cls_train_sample_per_image`` comes before its torchvision branch, so
    that method is used unchanged.
    """

    def compute_anchor_matched_idxs(
        self,
        anchors: list[Tensor],
        targets: list[dict[str, Tensor]],
        num_anchor_locs_per_level: Sequence[int],
    ) -> list[Tensor]:
        if isinstance(self.proposal_matcher, IouMatcher):
            return [self.proposal_matcher(t[self.target_box_key].to(a.device), a) for a, t in zip(anchors, targets)]
        if not isinstance(self.proposal_matcher, ATSSMatcher):
            raise NotImplementedError("only MONAI's ATSS matcher and IouMatcher are supported")
        matched_idxs = []
        for anchors_per_image, targets_per_image in zip(anchors, targets):
            boxes = targets_per_image[self.target_box_key]
            if boxes.numel() == 0:
                # A lesion-free image: every anchor is background (BELOW_LOW_THRESHOLD).
                matched_idxs.append(
                    torch.full(
                        (anchors_per_image.shape[0],), -1, dtype=torch.int64, device=anchors_per_image.device
                    )
                )
                continue
            _, matched = self.proposal_matcher(
                boxes.to(anchors_per_image.device),
                anchors_per_image,
                num_anchor_locs_per_level,
                self.num_anchors_per_loc,
            )
            matched_idxs.append(matched)
        return matched_idxs


class IouMatcher:
    """The IoU anchor matcher of torchvision's RetinaNet (the reference's), without torchvision: an anchor takes the
    box it overlaps most when that IoU is >= ``high`` (0.5), is background below ``low`` (0.4) and ignored between;
    each box also keeps every anchor of its own highest IoU (low-quality matches, as torchvision allows), so a small
    lesion is never left without a positive anchor. Returns (A,) int64: box index, -1 background, -2 ignored
    (MONAI's codes)."""

    def __init__(self, high: float = 0.5, low: float = 0.4):
        self.high, self.low = high, low

    def __call__(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        matched = torch.full((anchors.shape[0],), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=anchors.device)
        if boxes.numel() == 0:
            return matched
        iou = box_iou(boxes, anchors)  # (G, A)
        best_iou, best_box = iou.max(dim=0)
        matched = torch.where(best_iou >= self.high, best_box, matched)
        matched = torch.where((best_iou >= self.low) & (best_iou < self.high), BETWEEN_THRESHOLDS, matched)
        # Low-quality matches: each box's best anchors (ties included) are positives for the box they overlap most.
        best_per_box = iou.max(dim=1, keepdim=True).values
        _, anchor_index = torch.nonzero((iou == best_per_box) & (best_per_box > 0), as_tuple=True)
        matched[anchor_index] = best_box[anchor_index]
        return matched


def base_anchor_shapes(config: ModelConfig) -> list[list[float]]:
    """Anchor (height, width) at the finest level for each scale s and aspect ratio r = height / width (area
    kept): the base size times s, scales first."""
    height, width = config.anchor_base_sizes
    return [[height * s * math.sqrt(r), width * s / math.sqrt(r)]
            for s in config.anchor_scales for r in config.anchor_aspect_ratios]


def size_divisible(backbone: FeatureExtractor) -> int:
    """Image sides must be multiples of the coarsest stride used, so every level's map tiles the image exactly."""
    return max(max(backbone.level_strides), backbone.distill_stride)


def validate_model_config(config: ModelConfig, image_size: tuple[int, int], backbone: FeatureExtractor) -> None:
    """The checks of the detector around ``backbone`` (built from ``config``; it checks its own fields)."""
    if config.fpn_channels % _HEAD_GROUPS:
        raise UsageError(f"model.fpn_channels: {config.fpn_channels} is not a multiple of {_HEAD_GROUPS}")
    if backbone.out_channels % _HEAD_GROUPS:
        raise UsageError(f"model.backbone: {config.backbone!r} gives {backbone.out_channels} channels, not a multiple "
                         f"of {_HEAD_GROUPS}")
    if len(image_size) != 2 or any(int(side) < 1 for side in image_size):
        raise UsageError(f"image size must be (height, width) in pixels, got {tuple(image_size)}")
    divisor = size_divisible(backbone)
    height, width = (int(side) for side in image_size)
    if height % divisor or width % divisor:
        raise UsageError(
            f"image size {height}x{width} (height x width) is not divisible by {divisor}, the coarsest stride of "
            f"this model (returned_layers {config.returned_layers}, distill_feature {config.distill_feature!r}); "
            f"use for example {max(divisor, round(height / divisor) * divisor)}x"
            f"{max(divisor, round(width / divisor) * divisor)}"
        )


class ComotoDetector(nn.Module):
    """RetinaNet lesion detector whose training step also yields the distillation feature map."""

    def __init__(self, config: ModelConfig, image_size: tuple[int, int], *, load_weights: bool = True):
        super().__init__()
        # The backbone is built first: it checks its own fields (distill_feature ...) before making parameters,
        # and its strides decide the image sizes allowed. Nothing here draws random numbers before the backbone's
        # initialisation, nor between it and the heads'.
        backbone = build_backbone(config)
        validate_model_config(config, image_size, backbone)
        if load_weights:
            load_configured_weights(backbone, config)
        self.config = config
        self.image_size = (int(image_size[0]), int(image_size[1]))
        # How images were framed into image_size for training (preprocess.geometry of its cache): predict must
        # frame a raw DICOM the same way. Set by training and by load_detector; saved in the checkpoint.
        self.geometry = "stretch"
        self.size_divisible = size_divisible(backbone)
        self.feature_channels = backbone.distill_channels

        strides = list(backbone.level_strides)
        shapes = base_anchor_shapes(config)
        anchor_generator = AnchorGeneratorWithAnchorShape(
            feature_map_scales=[stride / strides[0] for stride in strides], base_anchor_shapes=shapes
        )
        network = RetinaNet(
            spatial_dims=2,
            num_classes=1,
            num_anchors=len(shapes),
            feature_extractor=backbone,
            size_divisible=self.size_divisible,
        )
        detector = AtssRetinaNetDetector(network=network, anchor_generator=anchor_generator)
        if config.matcher == "iou":
            detector.proposal_matcher = IouMatcher()
        else:
            detector.set_atss_matcher(num_candidates=ATSS_CANDIDATES, center_in_gt=False)
        detector.set_hard_negative_sampler(
            batch_size_per_image=HARD_NEGATIVE_BATCH_PER_IMAGE,
            positive_fraction=HARD_NEGATIVE_POSITIVE_FRACTION,
            min_neg=HARD_NEGATIVE_MIN,
            pool_size=HARD_NEGATIVE_POOL_SIZE,
        )
        detector.set_cls_loss(FocalLoss(gamma=2.0, reduction="mean") if config.focal_alpha is None
                              else FocalLoss(gamma=2.0, alpha=config.focal_alpha, reduction="mean"))
        if config.box_loss == "l1":
            detector.set_box_regression_loss(nn.L1Loss(reduction="mean"), encode_gt=True, decode_pred=False)
        detector.set_target_keys(box_key="boxes", label_key="labels")
        detector.set_box_selector_parameters(
            score_thresh=config.score_threshold,
            topk_candidates_per_level=config.topk_candidates_per_level,
            nms_thresh=config.nms_threshold,
            detections_per_img=config.detections_per_image,
        )
        self.detector = detector

    # ------------------------------------------------------------------------------------------ parts
    @property
    def backbone(self) -> FeatureExtractor:
        return self.detector.network.feature_extractor  # type: ignore[return-value]

    def _check_images(self, images: Tensor) -> None:
        channels = self.config.input_slices
        if images.ndim != 4 or images.shape[1] not in (1, channels):  # one grey channel is given to every channel
            expected = "1" if channels == 1 else f"1 or {channels}"
            raise UsageError(f"expected images of shape (batch, {expected}, height, width), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.size_divisible or width % self.size_divisible:
            raise UsageError(
                f"image size {height}x{width} is not divisible by {self.size_divisible} (the model's coarsest stride)"
            )

    def _heads(self, images: Tensor) -> tuple[dict[str, Tensor], list[Tensor], list[int], Tensor]:
        """One network pass -> (reshaped head outputs, anchors per image, locations per level, distill map)."""
        self._check_images(images)
        detector = self.detector
        network = detector.network
        features, distill = self.backbone.forward_with_distill(images)
        maps = list(features.values())
        head_maps = {
            detector.cls_key: network.classification_head(maps),
            detector.box_reg_key: network.regression_head(maps),
        }
        # MONAI caches anchors by image shape only; a model moved to another device needs them rebuilt.
        if detector.anchors is not None and detector.anchors[0].device != images.device:
            detector.anchors = None
        detector.generate_anchors(images, head_maps)
        locations = [int(m.shape[2:].numel()) for m in head_maps[detector.cls_key]]
        reshaped = {key: detector._reshape_maps(value) for key, value in head_maps.items()}
        anchors = list(detector.anchors)  # type: ignore[arg-type]
        return reshaped, anchors, locations, distill

    def _monai_targets(
        self, targets: list[dict[str, Tensor]], device: torch.device
    ) -> list[dict[str, Tensor]]:
        converted = []
        for index, target in enumerate(targets):
            boxes = torch.as_tensor(target["boxes"], device=device)
            if boxes.numel() == 0:
                boxes = boxes.reshape(0, 4)
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise ValueError(
                    f"targets[{index}]['boxes'] must have shape (k, 4), got {tuple(boxes.shape)}"
                )
            boxes = boxes.float()[:, _SWAP_XY]
            labels = (
                torch.as_tensor(target.get("labels", torch.zeros(len(boxes))), device=device)
                .long()
                .reshape(-1)
            )
            if labels.numel() != boxes.shape[0]:
                raise ValueError(f"targets[{index}]: {boxes.shape[0]} boxes but {labels.numel()} labels")
            converted.append({"boxes": boxes, "labels": labels})
        return converted

    # ------------------------------------------------------------------------------------------ API
    def forward_train(
        self, images: Tensor, targets: list[dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Detection losses and the distillation feature map (B, feature_channels, h, w) of ONE forward pass.

        ``targets[i]``: ``boxes`` (k, 4) float xyxy image pixels, ``labels`` (k,) int64 zeros; k may be 0.
        The returned map is part of the autograd graph, so a KD / ImPA loss on it trains the backbone.
        """
        if len(targets) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(targets)} targets")
        reshaped, anchors, locations, distill = self._heads(images)
        losses = self.detector.compute_loss(
            reshaped, self._monai_targets(targets, images.device), anchors, locations
        )
        # MONAI returns a constant CPU zero for the box loss when no anchor is positive (lesion-free batch).
        losses = {key: value.to(images.device) for key, value in losses.items()}
        return losses, distill

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], Tensor]:
        return self.forward_train(images, targets)

    @torch.no_grad()
    def predict(self, images: Tensor, *, flip: bool = False) -> list[dict[str, Tensor]]:
        """Detections of ``images`` (B, C, H, W) (C: 1 or ``input_slices``): per image ``boxes`` (n, 4) float32
        xyxy image pixels and ``scores`` (n,) float32, best first, as CPU tensors (n <= ``detections_per_image``).

        ``flip``: horizontal-flip test-time augmentation. The mirrored images go through the network too; their
        candidates, mirrored back, join the originals' before the per-image NMS, so a lesion seen in either
        orientation is kept once with its best score. Twice the network's cost.

        The numbers of MONAI's ``postprocess_detections`` (:func:`monai_detections`, tested equal; exactly tied
        scores at a level's top-k cut could pick different anchors) at a fraction of its cost: MONAI decodes
        every anchor of every image, selects per image and level and runs a Python-loop NMS, which on small
        models or a GPU costs as much as the network itself. Here the score threshold and top-k run on the whole
        batch at once, only the selected anchors are decoded (MONAI's own box coder and clipping), and the NMS
        (:func:`greedy_nms`, MONAI's arithmetic) runs on the few hundred candidates on the CPU.
        Runs in eval mode (BatchNorm running statistics) and restores the previous mode afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            boxes, scores, valid = self._image_candidates(images)
            if flip:
                mirrored, mirrored_scores, mirrored_valid = self._image_candidates(images.flip(-1))
                width = float(images.shape[-1])
                # MONAI's box order puts the width axis at columns 1 and 3 (see _SWAP_XY).
                mirrored[..., [1, 3]] = width - mirrored[..., [3, 1]]
                boxes = np.concatenate([boxes, mirrored], axis=1)
                scores = np.concatenate([scores, mirrored_scores], axis=1)
                valid = np.concatenate([valid, mirrored_valid], axis=1)
        finally:
            self.train(was_training)
        selector = self.detector.box_selector
        threshold, limit = float(selector.nms_thresh), int(selector.detections_per_img)
        return [_image_detections(boxes[i], scores[i], valid[i], threshold, limit) for i in range(len(boxes))]

    def _image_candidates(self, images: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        reshaped, anchors, locations, _ = self._heads(images)
        # MONAI builds anchors from the image shape alone: every image of the batch has the same ones.
        return self._candidates(reshaped, anchors[0], locations, list(images.shape[-2:]))

    def _candidates(
        self, reshaped: dict[str, Tensor], anchors: Tensor, locations: list[int], spatial: list[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every level's top-k anchors of each image, decoded and on the CPU: ``boxes`` (B, K, 4) float32 in
        MONAI's order, ``scores`` (B, K) float32, ``valid`` (B, K) bool; K = sum over levels of
        min(topk_candidates_per_level, anchors of the level). ``anchors`` (A, 4) are one image's."""
        detector = self.detector
        per_level = [count * detector.num_anchors_per_loc for count in locations]
        levels = zip(
            reshaped[detector.cls_key].split(per_level, dim=1),
            reshaped[detector.box_reg_key].split(per_level, dim=1),
            anchors.split(per_level),
        )
        parts = [self._level_candidates(logits, codes, level_anchors, spatial) for logits, codes, level_anchors in levels]
        boxes, scores, valid = (torch.cat(part, dim=1) for part in zip(*parts))
        return boxes.to("cpu", torch.float32).numpy(), scores.to("cpu", torch.float32).numpy(), valid.cpu().numpy()

    def _level_candidates(
        self, logits: Tensor, codes: Tensor, anchors: Tensor, spatial: list[int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One level: ``logits`` (B, N, 1), box ``codes`` (B, N, 4), ``anchors`` (N, 4) -> the top k = min(topk, N)
        anchors of each image: clipped boxes (B, k, 4), scores (B, k), valid (B, k)."""
        detector = self.detector
        selector = detector.box_selector
        batch = logits.shape[0]
        scores = torch.sigmoid(logits.to(torch.float32)).reshape(batch, -1)
        # Masked instead of removed (as MONAI does per image) so that one top-k serves the whole batch; a masked
        # anchor that still makes the top k is marked invalid below.
        masked = torch.where(scores > selector.score_thresh, scores, torch.full_like(scores, -1.0))
        k = min(int(selector.topk_candidates_per_level), masked.shape[1])
        top_scores, top_index = masked.topk(k, dim=1)
        picked = torch.gather(codes.to(torch.float32), 1, top_index[..., None].expand(-1, -1, codes.shape[-1]))
        decoded = detector.box_coder.decode_single(picked.reshape(-1, codes.shape[-1]), anchors[top_index.reshape(-1)])
        clipped, _ = clip_boxes_to_image(decoded, spatial, remove_empty=False)
        # MONAI's remove_empty, as a mask: a clipped box must keep at least one pixel along each axis.
        nonempty = (clipped[:, 2] >= clipped[:, 0] + 1) & (clipped[:, 3] >= clipped[:, 1] + 1)
        valid = (top_scores > selector.score_thresh) & nonempty.reshape(batch, k)
        return clipped.reshape(batch, k, -1), top_scores, valid

    def distill_features(self, images: Tensor) -> Tensor:
        """Only the distillation feature map (e.g. the teacher's in LsKD); stops after layer4 for 'backbone'.

        Uses the module's current mode; the reference runs the teacher in eval mode under ``torch.no_grad``.
        """
        self._check_images(images)
        return self.backbone.distill_only(images)


def _image_detections(
    boxes: np.ndarray, scores: np.ndarray, valid: np.ndarray, threshold: float, limit: int
) -> dict[str, Tensor]:
    """One image's candidates (K, 4) MONAI order, (K,), (K,) -> its NMS survivors, best first: ``boxes`` (n, 4)
    xyxy, ``scores`` (n,), float32 CPU tensors."""
    keep = np.flatnonzero(valid)
    boxes, scores = boxes[keep], scores[keep]
    chosen = greedy_nms(boxes, scores, threshold, limit) if len(keep) else np.zeros(0, np.int64)
    return {
        "boxes": torch.from_numpy(np.ascontiguousarray(boxes[chosen][:, _SWAP_XY])),
        "scores": torch.from_numpy(scores[chosen]),
    }


def detections_as_numpy(detections: list[dict[str, Tensor]]) -> list[dict[str, np.ndarray]]:
    """``predict``'s output as numpy, per image ``boxes`` (n, 4) and ``scores`` (n,) float32."""
    return [
        {
            "boxes": detection["boxes"].detach().to("cpu", torch.float32).numpy().reshape(-1, 4),
            "scores": detection["scores"].detach().to("cpu", torch.float32).numpy().reshape(-1),
        }
        for detection in detections
    ]


@torch.no_grad()
def monai_detections(model: ComotoDetector, images: Tensor) -> list[dict[str, Tensor]]:
    """MONAI's own post-processing (``postprocess_detections``) of ``model``'s forward pass on ``images``
    (B, 1, H, W), in :meth:`ComotoDetector.predict`'s format: the reference that tests and the inference benchmark
    hold ``predict`` against. Slow; not used for inference."""
    was_training = model.training
    model.eval()
    try:
        reshaped, anchors, locations, _ = model._heads(images)
        sizes = [list(images.shape[-2:])] * images.shape[0]
        detections = model.detector.postprocess_detections(reshaped, anchors, sizes, locations)
    finally:
        model.train(was_training)
    box_key, score_key = model.detector.target_box_key, model.detector.pred_score_key
    return [
        {"boxes": d[box_key][:, _SWAP_XY].to("cpu", torch.float32), "scores": d[score_key].to("cpu", torch.float32)}
        for d in detections
    ]


def build_detector(
    config: ModelConfig, image_size: tuple[int, int], *, load_weights: bool = True
) -> ComotoDetector:
    """A fresh detector for ``image_size`` (height, width); ``config.weights`` is loaded unless ``load_weights``
    is False (rebuilding from a checkpoint, whose state dict replaces all weights anyway)."""
    return ComotoDetector(config, image_size, load_weights=load_weights)


__all__ = [
    "AtssRetinaNetDetector",
    "ComotoDetector",
    "base_anchor_shapes",
    "build_detector",
    "detections_as_numpy",
    "monai_detections",
    "size_divisible",
]
