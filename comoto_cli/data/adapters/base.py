"""The dataset adapter interface and its registry.

An adapter is everything ``comoto preprocess`` knows about one data source: where its images and boxes are
(:meth:`DatasetAdapter.discover`), which files the cache's input fingerprint hashes
(:meth:`DatasetAdapter.input_files`), the image size from the header (:meth:`DatasetAdapter.read_header`) and the
pixels (:meth:`DatasetAdapter.open_pixels`). Adapters register by name with :func:`register`; the pipeline looks
them up with :func:`adapter_for` and never asks which dataset it is reading.

Two kinds of images exist, and they do differ in the pipeline (training slices are chosen in a volume, a 2-D image
is stored whole): :class:`VolumeAdapter` (multi-frame DBT volumes, streamed frame by frame) and
:class:`ImageAdapter` (one 2-D mammogram per record). A new dataset subclasses one of them, writes ``discover``,
and registers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar, NamedTuple, TypeVar

import numpy as np

from comoto_cli.config import PreprocessConfig
from comoto_cli.data import dicom_io
from comoto_cli.data.sources import ImageRecord, Skipped, csv_paths
from comoto_cli.errors import UsageError
from comoto_cli.utils.registry import Registry


class PixelSource(NamedTuple):
    """An opened image: its (slices, rows, cols), whether the official flip rule rotated it, an iterator of
    ``(slice index, float32 frame in [0, 1])`` over the slices asked for, decoded as it is consumed, and
    ``reference``: a callable returning the frame a cropping framing finds the breast on (a volume's central
    slice, decoded when called; a mammogram itself), None where the source has none."""

    shape: tuple[int, int, int]
    flipped: bool
    frames: Iterator[tuple[int, np.ndarray]]
    reference: Callable[[], np.ndarray] | None = None


class DatasetAdapter(ABC):
    """One data source. Adapters hold no state: one instance per name serves every run (and every worker)."""

    name: ClassVar[str]  # registry key, the value of ``--dataset``
    modality: ClassVar[str]  # "dbt" or "mammo": the subcommand (and the cache's modality) it serves
    volumes: ClassVar[bool]  # multi-frame volumes whose training slices are chosen, or 2-D images stored whole
    unit: ClassVar[str]  # what one record is, in messages ("DBT volumes", "mammograms")
    # PreprocessConfig fields that name its input files, and the names it takes in ``config.inputs``.
    config_fields: ClassVar[tuple[str, ...]] = ()
    input_names: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def discover(self, root: Path, config: PreprocessConfig, skipped: Skipped | None) -> list[ImageRecord]:
        """Every image with its boxes. A bad row raises InputDataError naming file and row (``skipped`` None) or
        is listed in ``skipped`` with its image left out (see :mod:`comoto_cli.data.sources`)."""

    def input_files(self, config: PreprocessConfig) -> list[Path]:
        """The listing files the config names (hashed into the cache's input fingerprint even when no kept record
        comes from them). Files found in ROOT reach the fingerprint through the records' ``csv`` fields."""
        files = [path for name in self.config_fields for path in csv_paths(getattr(config, name))]
        return files + [Path(config.inputs[name]) for name in self.input_names if name in config.inputs]

    @abstractmethod
    def read_header(self, path: Path, config: PreprocessConfig) -> tuple[int, int, int]:
        """(slices, rows, cols) from the header alone: boxes are checked against it before any decoding."""

    @abstractmethod
    def open_pixels(self, path: Path, *, view: str, csv: Path, row: int, slices: list[int] | None,
                    decoder: str, accept_modality: tuple[str, ...]) -> PixelSource:
        """The image's pixels in the frame its boxes are in; ``slices`` None: every slice. Runs in a worker
        process, so it takes plain values (``csv``/``row`` name the listing row in decoding errors)."""


class VolumeAdapter(DatasetAdapter):
    """DBT volumes as multi-frame DICOMs, read in the official reader's frame (flip rule, VOI window)."""

    modality: ClassVar[str] = "dbt"
    volumes: ClassVar[bool] = True
    unit: ClassVar[str] = "DBT volumes"

    def read_header(self, path: Path, config: PreprocessConfig) -> tuple[int, int, int]:
        return tuple(int(v) for v in dicom_io.read_dbt_header(path))

    def open_pixels(self, path: Path, *, view: str, csv: Path, row: int, slices: list[int] | None,
                    decoder: str, accept_modality: tuple[str, ...]) -> PixelSource:
        # Streamed: frames() decodes one frame at a time, only those asked for (a worker's memory stays bounded).
        source = dicom_io.open_dbt(path, view, row=row, csv=csv, decoder=decoder)
        shape = tuple(int(v) for v in source.shape)
        return PixelSource(shape, bool(source.flipped), source.frames(slices),
                           lambda: dicom_io.central_frame(source))


class ImageAdapter(DatasetAdapter):
    """2-D mammograms as single-frame DICOMs, in their stored frame (no flip)."""

    modality: ClassVar[str] = "mammo"
    volumes: ClassVar[bool] = False
    unit: ClassVar[str] = "mammograms"

    def read_header(self, path: Path, config: PreprocessConfig) -> tuple[int, int, int]:
        return dicom_io.read_mammo_header(path, accept_modality=config.accept_modality)

    def open_pixels(self, path: Path, *, view: str, csv: Path, row: int, slices: list[int] | None,
                    decoder: str, accept_modality: tuple[str, ...]) -> PixelSource:
        image = dicom_io.read_mammogram(path, row=row, csv=csv, accept_modality=accept_modality)
        return PixelSource((1, *image.shape), False, iter([(0, image)]), lambda: image)


# ---------------------------------------------------------------------------------------------- registry
_REGISTRY: Registry[DatasetAdapter] = Registry("dataset", "dataset")
A = TypeVar("A", bound=type[DatasetAdapter])


def register(cls: A) -> A:
    """Class decorator: make the adapter available as ``--dataset NAME`` (``cls.name``)."""
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"two dataset adapters are named {cls.name!r}")
    _REGISTRY[cls.name] = cls()
    return cls


def registered() -> dict[str, DatasetAdapter]:
    """Name -> adapter, in registration order."""
    return dict(_REGISTRY)


def get_adapter(name: str) -> DatasetAdapter:
    """The adapter registered as ``name`` (a one-line usage error listing the names otherwise)."""
    return _REGISTRY.lookup(name)


def default_dataset(config: PreprocessConfig) -> str:
    """The adapter a config without ``dataset`` gets, as before adapters existed: BCS-DBT for DBT; for
    mammograms the generic manifest when one is given, else the VinDr-Mammo layout."""
    if config.modality == "dbt":
        return "bcs-dbt"
    return "manifest" if config.manifest_csv is not None else "vindr"


def adapter_for(config: PreprocessConfig) -> DatasetAdapter:
    """The config's adapter, after checking that it serves the config's modality and takes its ``inputs``."""
    adapter = get_adapter(config.dataset or default_dataset(config))
    if adapter.modality != config.modality:
        raise UsageError(f"dataset {adapter.name!r} holds {adapter.unit}; preprocess it with "
                         f"`comoto preprocess {adapter.modality}`")
    unknown = sorted(set(config.inputs) - set(adapter.input_names))
    if unknown:
        takes = ", ".join(adapter.input_names) or "none"
        raise UsageError(f"dataset {adapter.name!r} takes no input named {', '.join(unknown)} (it takes: {takes})")
    return adapter
