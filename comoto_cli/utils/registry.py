"""Plug-ins by name: the one mechanism behind dataset adapters, distillation modes, backbones, validation metrics
and predict's output formats.

A :class:`Registry` is a dict (name -> entry, in registration order, so a test can save and restore it) that refuses
a second entry under one name and answers an unknown name with a one-line usage error listing the known ones. Where a
config model validates the name (``ModelConfig.backbone``, ``DistillConfig.mode``, ``PredictConfig.format``), it
holds the list of valid names itself, built-in names included from the start: the config sits in the bottom layer
and cannot import the plug-ins' modules. ``known`` is that list; registering a name extends it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from comoto_cli.errors import UsageError

T = TypeVar("T")

# A plug-in's code named by string, so that a registry module imports nothing heavy (no torch for `comoto --help`).
_BY_NAME = re.compile(r"[\w.]+:\w+")


def is_code_name(target: object) -> bool:
    """``target`` is a ``"module:function"`` string naming a callable."""
    return isinstance(target, str) and _BY_NAME.fullmatch(target) is not None


def resolve(target: Callable | str) -> Callable:
    """``target`` itself, or the callable a ``"module:function"`` string names (its module imported now)."""
    if not isinstance(target, str):
        return target
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


class Registry(dict[str, T], Generic[T]):
    """``kind``: what an entry is, for messages ("backbone"); ``field``: the config field or flag that names one
    ("model.backbone"); ``known``: the config model's list of valid names, extended by :meth:`add`."""

    def __init__(self, kind: str, field: str = "", known: list[str] | None = None):
        super().__init__()
        self.kind, self.field, self.known = kind, field, known

    def add(self, name: str, entry: T) -> T:
        if name in self:
            raise ValueError(f"a {self.kind} {name!r} is already registered")
        self[name] = entry
        if self.known is not None and name not in self.known:
            self.known.append(name)
        return entry

    def lookup(self, name: str) -> T:
        """The entry named ``name``, or a :class:`UsageError` listing the registered names."""
        try:
            return self[name]
        except KeyError:
            prefix = f"{self.field}: " if self.field else ""
            raise UsageError(f"{prefix}unknown {self.kind} {name!r}; registered: {', '.join(self)}") from None

    @contextmanager
    def restored(self) -> Iterator[Registry[T]]:
        """Entries and known names as they were on entry, again on exit: a registration scoped to a block (tests)."""
        entries, known = dict(self), None if self.known is None else list(self.known)
        try:
            yield self
        finally:
            self.clear()
            self.update(entries)
            if known is not None:
                self.known[:] = known
