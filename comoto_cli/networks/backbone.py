"""ResNet-FPN feature extractor built from MONAI parts only (no torchvision), one input channel: the built-in
backbones ``resnet18``, ``resnet34``, ``resnet50`` and ``resnet101`` (registered in
:mod:`comoto_cli.networks.backbones`, whose :class:`~comoto_cli.networks.backbones.FeatureExtractor` interface
:class:`ResNetFPNBackbone` has).

MONAI's own ``resnet_fpn_feature_extractor`` / ``BackboneWithFPN`` import torchvision (docs/design.md section 4), so
the extractor is assembled here from ``monai.networks.nets.resnet.ResNet`` stages and MONAI's
``FeaturePyramidNetwork`` + ``LastLevelMaxPool``.

Strides: the stem (7x7 conv, stride 2, then a 3x3 max-pool) gives stride 4 at ``layer1``, and each later stage halves
the map: ``layer1..layer4`` have strides 4, 8, 16, 32. The FPN levels are named ``fpn0, fpn1, ...`` (finest first,
one per returned stage) and ``pool`` (the extra max-pooled level on top).

The *distillation feature map* (the map that ImPA and LsKD act on) is, by default, the output of the last ResNet
stage (``layer4``, stride 32), as the reference does with torchvision's ResNet-50 last stage; or one FPN level by
name. It is produced by the same forward pass that feeds the detection heads (:meth:`forward_with_distill`).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck
from torch import Tensor, nn

from comoto_cli.config import ModelConfig
from comoto_cli.errors import CheckpointError, UsageError
from comoto_cli.utils.torch_files import safe_torch_load

# name -> (block, blocks per stage); the block counts of the torchvision / He et al. ResNets.
RESNET_ARCHITECTURES: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (ResNetBlock, [2, 2, 2, 2]),
    "resnet34": (ResNetBlock, [3, 4, 6, 3]),
    "resnet50": (ResNetBottleneck, [3, 4, 6, 3]),
    "resnet101": (ResNetBottleneck, [3, 4, 23, 3]),
}

BACKBONE_FEATURE = "backbone"
POOL_LEVEL = "pool"
IMAGENET = "imagenet"
# torchvision's ImageNet statistics in 0-255 units (its transform divides by 255 first: the same thing).
IMAGENET_MEAN = torch.tensor([123.675, 116.28, 103.53])
IMAGENET_STD = torch.tensor([58.395, 57.12, 57.375])


def stage_stride(layer: int) -> int:
    """Input pixels per feature cell at the output of ResNet stage ``layer`` (1..4)."""
    return 2 ** (layer + 1)


def fpn_level_names(config: ModelConfig) -> list[str]:
    """Names of the feature maps the detection heads see, finest first (without FPN: the stage's, e.g. ``c5``)."""
    if not config.fpn:
        return [f"c{config.returned_layers[0] + 1}"]
    return [f"fpn{i}" for i in range(len(config.returned_layers))] + [POOL_LEVEL]


def fpn_level_strides(config: ModelConfig) -> list[int]:
    strides = [stage_stride(layer) for layer in config.returned_layers]
    return strides + [2 * strides[-1]] if config.fpn else strides


def distill_feature_stride(config: ModelConfig) -> int:
    if config.distill_feature == BACKBONE_FEATURE:
        return stage_stride(4)
    names = fpn_level_names(config)
    return fpn_level_strides(config)[names.index(config.distill_feature)]


AUTO_FEATURE = "auto"


def distill_candidates(config: ModelConfig) -> list[tuple[str, int]]:
    """Every map ImPA and LsKD can read, (name, stride), coarsest first; at equal stride the last ResNet stage (the
    reference's map) before the FPN level."""
    maps = [(BACKBONE_FEATURE, stage_stride(4))]
    if config.fpn:
        maps += list(zip(fpn_level_names(config), fpn_level_strides(config)))
    return sorted(maps, key=lambda item: -item[1])


def map_shape(image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """(h, w) of a stride-``stride`` map of an (H, W) input: every stride-2 layer of the ResNet (and the FPN's pool)
    pads, so each halving rounds up."""
    return -(-int(image_size[0]) // stride), -(-int(image_size[1]) // stride)


def cells_per_axis(sides: np.ndarray, image_width: int, stride: int) -> np.ndarray:
    """Map cells that lesion sides of ``sides`` input pixels span on a stride-``stride`` map of an image
    ``image_width`` wide, with the lesion points' scale (map width / image width, one ratio for both axes)."""
    return np.asarray(sides, dtype=np.float64) * (map_shape((1, image_width), stride)[1] / float(image_width))


def choose_distill_feature(config: ModelConfig, lesion_sides: list[np.ndarray], image_widths: list[int],
                           min_cells: float) -> tuple[str, int, float]:
    """The coarsest map on which the median lesion spans at least ``min_cells`` cells per axis in every cache:
    ``lesion_sides[i]`` holds the shorter sides (pixels) of cache i's training lesions, its images
    ``image_widths[i]`` wide. Returns (name, stride, the smallest of the caches' median cells per axis there);
    the finest map when none reaches ``min_cells``. Raises ValueError when no cache holds a lesion."""
    caches = [(np.asarray(sides), width) for sides, width in zip(lesion_sides, image_widths) if len(sides)]
    if not caches:
        raise ValueError("no training lesion to size the distillation map by")
    candidates = distill_candidates(config)
    for name, stride in candidates:
        median = min(float(np.median(cells_per_axis(sides, width, stride))) for sides, width in caches)
        if median >= min_cells:
            return name, stride, median
    return name, stride, median


def validate_distill_feature(config: ModelConfig) -> None:
    allowed = [BACKBONE_FEATURE, *fpn_level_names(config)]
    if config.distill_feature not in allowed:
        raise UsageError(
            f"model.distill_feature: {config.distill_feature!r} is not a feature map of this model; "
            f"choose one of {', '.join(allowed)}"
        )


def input_channels(config: ModelConfig) -> int:
    """Channels of the first convolution: the 2.5-D slices, else 3 for ImageNet-normalised input, else 1."""
    return config.input_slices if config.input_slices > 1 else (3 if config.input_norm == IMAGENET else 1)


def fit_first_conv(weight: Tensor, channels: int) -> Tensor:
    """A first convolution's weight (O, I, k, k) for ``channels`` inputs with the same response to a grey image (the
    same value in every channel): summed over its I inputs and spread evenly over the ``channels``. Unchanged when I
    is already ``channels`` (ImageNet's RGB filters for three channels: the usual start of a 2.5-D model)."""
    if weight.ndim != 4 or weight.shape[1] == channels:
        return weight
    return weight.sum(dim=1, keepdim=True).repeat(1, channels, 1, 1) / channels


class ResNetFPNBackbone(nn.Module):
    """MONAI ResNet stages + FPN. ``forward`` returns the ordered FPN maps; ``out_channels`` is their width,
    ``level_strides`` their strides, ``distill_stride`` and ``distill_channels`` the distillation map's.

    ``body`` is a plain MONAI ``ResNet`` whose parameter names equal torchvision's (``conv1``, ``bn1``,
    ``layer1.0.conv1``, ``layer1.0.downsample.0`` ...), so ImageNet-style state dicts can be loaded into it.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        validate_distill_feature(config)
        if config.backbone not in RESNET_ARCHITECTURES:
            raise UsageError(f"model.backbone: {config.backbone!r} is not a ResNet of this builder; "
                             f"one of {', '.join(RESNET_ARCHITECTURES)}")
        block, layers = RESNET_ARCHITECTURES[config.backbone]
        # Shortcut "B" (1x1 conv downsample) as in torchvision: MONAI's type "A" shortcut concatenates
        # ``out.data``, which silently cuts the gradient through every downsampling shortcut.
        self.body = ResNet(
            block=block,
            layers=layers,
            block_inplanes=list(config.width),
            spatial_dims=2,
            n_input_channels=input_channels(config),
            conv1_t_size=7,
            conv1_t_stride=2,
            shortcut_type="B",
            bias_downsample=False,
            feed_forward=False,
        )
        expansion = block.expansion  # type: ignore[attr-defined]
        self.stage_channels = [width * expansion for width in config.width]
        self.returned_layers = list(config.returned_layers)
        self.level_names = fpn_level_names(config)
        self.distill_feature = config.distill_feature
        self.input_norm = config.input_norm
        self.input_channels = input_channels(config)
        if self.input_norm == IMAGENET:  # constants, not parameters: kept out of the state dict
            self.register_buffer("_mean", IMAGENET_MEAN.reshape(1, 3, 1, 1).clone(), persistent=False)
            self.register_buffer("_std", IMAGENET_STD.reshape(1, 3, 1, 1).clone(), persistent=False)
        if config.fpn:
            self.fpn = FeaturePyramidNetwork(
                spatial_dims=2,
                in_channels_list=[self.stage_channels[layer - 1] for layer in self.returned_layers],
                out_channels=config.fpn_channels,
                extra_blocks=LastLevelMaxPool(spatial_dims=2),
            )
            self.out_channels = config.fpn_channels
        else:
            self.fpn = None
            self.out_channels = self.stage_channels[self.returned_layers[0] - 1]
        self.level_strides = fpn_level_strides(config)
        self.distill_stride = distill_feature_stride(config)
        if self.distill_feature == BACKBONE_FEATURE:
            self.distill_channels = self.stage_channels[3]
        else:
            self.distill_channels = config.fpn_channels
        # Stages after the last one needed are skipped: layer4 only runs when it feeds the FPN or is the
        # distillation map.
        self._last_stage = max(self.returned_layers[-1], 4 if self.distill_feature == BACKBONE_FEATURE else 0)
        # Stages that never run hold no parameters: an unused parameter would break DistributedDataParallel and
        # be dead weight in every checkpoint.
        for layer in range(self._last_stage + 1, 5):
            setattr(self.body, f"layer{layer}", nn.Identity())

    def _stages(self, images: Tensor, last_stage: int) -> OrderedDict[str, Tensor]:
        body = self.body
        if images.shape[1] == 1 and self.input_channels > 1:  # a grey image (a mammogram) in every channel
            images = images.expand(-1, self.input_channels, -1, -1)
        if self.input_norm == IMAGENET:  # the grey image as torchvision's RGB input: 0-255, normalised per channel
            images = (images * 255.0 - self._mean) / self._std
        x = body.act(body.bn1(body.conv1(images)))
        x = body.maxpool(x)
        stage_outputs: OrderedDict[str, Tensor] = OrderedDict()
        for layer in range(1, last_stage + 1):
            x = getattr(body, f"layer{layer}")(x)
            stage_outputs[f"layer{layer}"] = x
        return stage_outputs

    def forward_with_distill(self, images: Tensor) -> tuple[OrderedDict[str, Tensor], Tensor]:
        """One pass: (FPN maps by level name, the distillation feature map (B, distill_channels, h, w))."""
        stage_outputs = self._stages(images, self._last_stage)
        fpn_inputs = OrderedDict(
            (name, stage_outputs[f"layer{layer}"])
            for name, layer in zip(self.level_names, self.returned_layers)
        )
        features = self.fpn(fpn_inputs) if self.fpn is not None else fpn_inputs
        if self.distill_feature == BACKBONE_FEATURE:
            distill = stage_outputs["layer4"]
        else:
            distill = features[self.distill_feature]
        return features, distill

    def feature_maps(self, images: Tensor) -> OrderedDict[str, Tensor]:
        """Every map the distillation can read (:func:`distill_candidates`), by name: the last ResNet stage and the
        FPN levels, from one pass."""
        stage_outputs = self._stages(images, 4)
        fpn_inputs = OrderedDict((name, stage_outputs[f"layer{layer}"])
                                 for name, layer in zip(self.level_names, self.returned_layers))
        maps = OrderedDict([(BACKBONE_FEATURE, stage_outputs["layer4"])])
        if self.fpn is not None:
            maps.update(self.fpn(fpn_inputs))
        return maps

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:  # type: ignore[override]
        return self.forward_with_distill(images)[0]

    def distill_only(self, images: Tensor) -> Tensor:
        """Only the distillation map; for the last ResNet stage the FPN is not run."""
        if self.distill_feature == BACKBONE_FEATURE:
            return self._stages(images, 4)["layer4"]
        return self.forward_with_distill(images)[1]

    def load_weights(self, path: str | Path) -> list[str]:
        """``model.weights``: a ResNet state dict into ``body`` (:func:`load_backbone_weights`)."""
        return load_backbone_weights(self.body, path)


# ---------------------------------------------------------------------------------------------- user weights
_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "resnet.")


def _normalise_key(key: str) -> str:
    # Our own detector state dicts nest the ResNet under "...feature_extractor.body."; torchvision-style files
    # have bare names or a wrapper prefix such as "module.".
    if "body." in key:
        key = key.rsplit("body.", 1)[1]
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def _unwrap_state_dict(loaded: object) -> dict[str, Tensor]:
    if isinstance(loaded, dict):
        for wrapper in ("model_state", "state_dict", "model"):
            if wrapper in loaded and isinstance(loaded[wrapper], dict):
                return _unwrap_state_dict(loaded[wrapper])
        if all(isinstance(value, Tensor) for value in loaded.values()):
            return {str(k): v for k, v in loaded.items()}
    raise CheckpointError("weights file does not hold a state dict (a mapping of parameter names to tensors)")


def load_backbone_weights(body: ResNet, path: str | Path) -> list[str]:
    """Load a ResNet state dict (torchvision or MONAI names, 1 or 3 input channels) into ``body``.

    A first convolution of another channel count is fitted by :func:`fit_first_conv` (an RGB one summed for one
    channel), which keeps the response to a grey image (the same value in every channel) unchanged. The fully
    connected head is ignored. Returns the ignored keys.
    Raises :class:`CheckpointError` naming the keys when the file does not fit this ResNet.
    """

    path = Path(path)
    try:
        source = _unwrap_state_dict(safe_torch_load(path, map_location="cpu"))
    except CheckpointError as exc:
        raise CheckpointError(f"model.weights: {exc.reason}", path=path) from None
    target = body.state_dict()
    matched: dict[str, Tensor] = {}
    ignored: list[str] = []
    for raw_key, value in source.items():
        key = _normalise_key(raw_key)
        if key not in target:
            ignored.append(raw_key)
            continue
        expected_shape = target[key].shape
        if key == "conv1.weight":
            value = fit_first_conv(value, expected_shape[1])
        if value.shape != expected_shape:
            raise CheckpointError(
                f"model.weights: {raw_key} has shape {tuple(value.shape)}, the configured ResNet expects "
                f"{tuple(expected_shape)} (check model.backbone and model.width)",
                path=path,
            )
        matched[key] = value.to(target[key].dtype)
    if not matched:
        raise CheckpointError(
            "model.weights: no key matches the ResNet backbone; file keys start "
            f"{sorted(source)[:4]}, expected keys such as {sorted(target)[:4]}",
            path=path,
        )
    # BatchNorm's step counter is absent from older files and carries no learned value.
    missing = [key for key in target if key not in matched and not key.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(
            f"model.weights: {len(missing)} backbone tensors missing from the file, e.g. {missing[:4]}",
            path=path,
        )
    body.load_state_dict(matched, strict=False)
    return ignored


__all__ = [
    "RESNET_ARCHITECTURES",
    "ResNetFPNBackbone",
    "AUTO_FEATURE",
    "cells_per_axis",
    "choose_distill_feature",
    "distill_candidates",
    "distill_feature_stride",
    "map_shape",
    "fpn_level_names",
    "fpn_level_strides",
    "load_backbone_weights",
    "stage_stride",
    "validate_distill_feature",
]
