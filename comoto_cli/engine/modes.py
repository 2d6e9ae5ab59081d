"""The distillation modes of ``comoto distill``, registered by name: the one place that says what a mode is.

A :class:`DistillMode` says how the student starts (``init``: fresh, or from the teacher's weights and
architecture), which teacher data it reads (the teacher checkpoint; unpaired batches from the teacher's mammography
cache) and how its extra loss and trainable modules are built (``build``). ``comoto distill``
(:mod:`comoto_cli.engine.distill`), ``comoto experiment``, the ``--mode`` help and the validation of
``DistillConfig.mode`` all read this registry, so adding a mode is one :func:`register_mode` call: here for a
built-in mode, or in a module of one's own that is imported before the config is read.

This module imports no torch: the CLI reads it for its help, and ``comoto --help`` must start without torch. A
built-in mode therefore names its factory as ``"module:function"``, imported when a run first builds the mode.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from comoto_cli.config import DistillConfig
from comoto_cli.utils.registry import Registry, is_code_name, resolve


@dataclass(frozen=True)
class ModeSetup:
    """What a mode's factory gets, once the student and the teacher data are ready."""

    config: DistillConfig
    model: Any  # the student detector, on the CPU, initialised as the mode's ``init`` says
    student_size: tuple[int, int]  # DBT cache image (height, width)
    device: Any  # torch.device the run trains on
    teacher: Any = None  # the frozen teacher (eval mode, on ``device``) when the mode needs one
    teacher_batches: Iterator[dict] | None = None  # endless unpaired batches of the teacher's cache
    teacher_size: tuple[int, int] | None = None  # teacher cache image (height, width)
    diagnostics: Any = None  # comoto_cli.engine.diagnostics.DistillDiagnostics: what a KD loss reports per step


# ``build(setup) -> (extra_loss, extra_modules)``: the trainer's hooks (comoto_cli.engine.trainer's docstring).
Build = Callable[[ModeSetup], tuple[Callable | None, dict[str, Any]]]


@dataclass(frozen=True)
class DistillMode:
    """One distillation mode.

    ``init``: "fresh" builds the student from ``model`` (and ``model.weights``); "teacher" gives it the teacher's
    architecture and weights. ``teacher_images``: which images of the teacher's training split the mode draws
    unpaired batches from ("all", or "lesions" only), None for no teacher cache. ``build``: the factory of the
    extra loss and modules, or ``"module:function"`` naming it; None for the detection loss alone.
    ``label``: its name in `comoto experiment`'s table; ``description``: one line for ``--mode`` help.
    """

    name: str
    label: str
    description: str
    init: Literal["fresh", "teacher"] = "fresh"
    teacher_images: Literal["all", "lesions"] | None = None
    build: Build | str | None = None

    @property
    def needs_teacher(self) -> bool:
        return self.init == "teacher" or self.teacher_images is not None

    @property
    def needs_teacher_cache(self) -> bool:
        return self.teacher_images is not None

    def factory(self) -> Build | None:
        """``build`` as a callable; a "module:function" name is imported now, as a run starts."""
        return None if self.build is None else resolve(self.build)


_MODES: Registry[DistillMode] = Registry("distillation mode", "mode", DistillConfig.mode_names)


def register_mode(mode: DistillMode) -> DistillMode:
    """Make ``mode`` known to ``comoto distill``, ``comoto experiment`` and the config's validation."""
    # "+" would clash with the experiment's MODE+impa methods.
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", mode.name):
        raise ValueError(f"mode name {mode.name!r}: lower-case letters, digits, '_' and '-' only")
    if mode.init not in ("fresh", "teacher") or mode.teacher_images not in (None, "all", "lesions"):
        raise ValueError(f"mode {mode.name!r}: init must be fresh|teacher, teacher_images all|lesions|None")
    if isinstance(mode.build, str) and not is_code_name(mode.build):
        raise ValueError(f"mode {mode.name!r}: build must be a callable or 'module:function'")
    if mode.teacher_images is not None and mode.build is None:
        raise ValueError(f"mode {mode.name!r}: teacher_images without build: nothing would read the teacher batches")
    return _MODES.add(mode.name, mode)


def get_mode(name: str) -> DistillMode:
    return _MODES.lookup(name)


def registered_modes() -> list[DistillMode]:
    """Every mode, in registration order."""
    return list(_MODES.values())


def modes_help() -> str:
    """The modes for ``--mode`` help: ``name = description`` each."""
    return "; ".join(f"{mode.name} = {mode.description}" for mode in _MODES.values())


# ---------------------------------------------------------------------------------------------- built-in modes
# The paper's method and its baselines (docs/design.md section 3). Every mode but `none` starts from the teacher, as the
# reference initialises the student from it.
register_mode(DistillMode(
    name="lesion", label="LsKD", init="teacher", teacher_images="lesions",  # LsKD samples lesion points only
    description="LsKD: KL between the teacher's and the student's lesion points (student from the teacher)",
    build="comoto_cli.engine.distill:build_lesion_kd"))
register_mode(DistillMode(
    name="image", label="Image-level KD", init="teacher", teacher_images="all",
    description="image-level KD baseline: KL between whole feature maps (student from the teacher)",
    build="comoto_cli.engine.distill:build_image_kd"))
register_mode(DistillMode(
    name="pretrain", label="Mammography pretraining", init="teacher",
    description="student from the teacher's weights, no distillation loss"))
register_mode(DistillMode(
    name="none", label="DBT only",
    description="DBT only: from scratch (or model.weights), no teacher"))
