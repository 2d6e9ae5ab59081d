"""The detector's backbones (feature extractors), registered by name: ``model.backbone`` picks one.

A backbone is a *builder*, ``builder(config: ModelConfig) -> extractor``, where the extractor is a torch
``nn.Module`` with the interface of :class:`FeatureExtractor` (the built-in
:class:`comoto_cli.networks.backbone.ResNetFPNBackbone` is one): the FPN maps the RetinaNet heads read, the
distillation feature map (ImPA, LsKD) of the same pass, their channels and strides. The detector
(:mod:`comoto_cli.networks.detector`), the validation of ``ModelConfig.backbone`` and the ``--backbone`` help all
read this registry, so adding a backbone is one module with its builder and one :func:`register_backbone` call;
that module must be imported before a config naming the backbone is read (the built-in names are known to
``ModelConfig`` from the start).

Checkpoints store the backbone's name in their model config: one made with a plug-in backbone loads wherever that
plug-in is registered.

This module imports no torch: the CLI reads it for its help, and ``comoto --help`` must start without torch. A
built-in backbone therefore names its builder as ``"module:function"``, imported when a model is first built.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from comoto_cli.config import ModelConfig
from comoto_cli.errors import UsageError
from comoto_cli.utils.registry import Registry, is_code_name, resolve

if TYPE_CHECKING:  # annotations only: importing torch here would slow `comoto --help`
    from collections import OrderedDict

    from torch import Tensor


class FeatureExtractor(Protocol):
    """What a builder returns: an ``nn.Module`` (its parameters are the detector's ``...feature_extractor.*``).

    ``forward_with_distill(images)``: ``images`` (B, 1, H, W) -> (the FPN maps by level name, finest first, each
    (B, out_channels, H / s, W / s) for the matching stride s of ``level_strides``; the distillation map
    (B, distill_channels, H / distill_stride, W / distill_stride)), from ONE pass, both in the autograd graph.
    ``forward(images)``: the FPN maps alone (MONAI's RetinaNet calls it). ``distill_only(images)``: the
    distillation map alone (the teacher's, in LsKD); may skip work the map does not need.
    ``out_channels``: channels of every FPN map, a multiple of 8 (the heads' GroupNorm).
    Image sides must be multiples of the largest stride; the detector checks them.
    Optional: ``load_weights(path) -> list[str]`` loads ``model.weights`` (returns the keys it ignored); a
    backbone without it refuses a ``model.weights`` file.
    """

    out_channels: int
    distill_channels: int
    level_strides: list[int]
    distill_stride: int

    def forward_with_distill(self, images: Tensor) -> tuple[OrderedDict[str, Tensor], Tensor]: ...

    def distill_only(self, images: Tensor) -> Tensor: ...


Builder = Callable[[ModelConfig], FeatureExtractor]

_INTERFACE = ("out_channels", "distill_channels", "level_strides", "distill_stride", "forward_with_distill",
              "distill_only", "parameters")


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone: its ``name`` (the value of ``model.backbone``) and ``builder`` (a callable, or
    ``"module:function"`` naming it)."""

    name: str
    builder: Builder | str

    def factory(self) -> Builder:
        """``builder`` as a callable; a "module:function" name is imported now, as a model is first built."""
        return resolve(self.builder)


_BACKBONES: Registry[BackboneSpec] = Registry("backbone", "model.backbone", ModelConfig.backbone_names)


def register_backbone(name: str, builder: Builder | str) -> BackboneSpec:
    """Make backbone ``name`` known to the detector, ``--backbone`` and the config's validation."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name):
        raise ValueError(f"backbone name {name!r}: lower-case letters, digits, '_', '.' and '-' only")
    if isinstance(builder, str) and not is_code_name(builder):
        raise ValueError(f"backbone {name!r}: builder must be a callable or 'module:function'")
    if not isinstance(builder, str) and not callable(builder):
        raise ValueError(f"backbone {name!r}: builder must be a callable or 'module:function'")
    return _BACKBONES.add(name, BackboneSpec(name=name, builder=builder))


def get_backbone(name: str) -> BackboneSpec:
    return _BACKBONES.lookup(name)


def registered_backbones() -> list[str]:
    """Every backbone's name, in registration order."""
    return list(_BACKBONES)


def backbones_help() -> str:
    """The backbones for ``--backbone`` help: ``resnet18 | resnet34 | ...``."""
    return " | ".join(_BACKBONES)


def build_backbone(config: ModelConfig) -> Any:
    """The feature extractor of ``config.backbone``, freshly initialised (``model.weights`` not loaded: see
    :func:`load_configured_weights`). A builder whose module lacks part of :class:`FeatureExtractor` is a bug of
    that plug-in, reported by name."""
    extractor = get_backbone(config.backbone).factory()(config)
    missing = [attribute for attribute in _INTERFACE if not hasattr(extractor, attribute)]
    if missing:
        raise TypeError(f"backbone {config.backbone!r}: its builder returned a {type(extractor).__name__} without "
                        f"{', '.join(missing)} (see comoto_cli.networks.backbones.FeatureExtractor)")
    return extractor


def load_configured_weights(extractor: Any, config: ModelConfig) -> list[str]:
    """Load ``config.weights`` (when set) into ``extractor``; the ignored keys of the file ([] without one)."""
    if config.weights is None:
        return []
    load = getattr(extractor, "load_weights", None)
    if load is None:
        raise UsageError(f"model.weights: backbone {config.backbone!r} does not load weights files")
    return load(Path(config.weights))


# ---------------------------------------------------------------------------------------------- built-in backbones
# MONAI ResNets + FPN (no torchvision), one builder for the family: it reads the block layout of config.backbone.
register_backbone("resnet18", "comoto_cli.networks.backbone:ResNetFPNBackbone")
register_backbone("resnet34", "comoto_cli.networks.backbone:ResNetFPNBackbone")
register_backbone("resnet50", "comoto_cli.networks.backbone:ResNetFPNBackbone")
register_backbone("resnet101", "comoto_cli.networks.backbone:ResNetFPNBackbone")
