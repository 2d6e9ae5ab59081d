"""The HDF5 slice cache: written once by ``comoto preprocess``, read by every later step.

Layout (format version 1; the README's "Cache layout" section and docs/design.md section 5 say the same):

``/`` attributes
    ``format_version`` (int), ``modality`` ("dbt" | "mammo"), ``config_json`` and ``config_hash`` (the
    preprocess config), ``image_height``, ``image_width`` (cache frame), ``source_root``, ``skipped_json``
    (JSON list of ``{"path", "row", "reason"}`` for inputs skipped with ``--on-error skip``).
``/volumes/*``: one row per DBT volume or mammogram (V rows), 1-D datasets
    ``patient_id``, ``study_uid``, ``view``, ``split`` ("train" | "val" | "test"), ``source`` (path relative
    to the data root), ``label`` (str); ``num_slices``, ``original_height``, ``original_width``,
    ``volume_slices`` (DBTex VolumeSlices), ``slice_start``, ``slice_count`` (int); ``flipped`` (bool: the
    official flip rule rotated this volume); ``scale_y``, ``scale_x`` (float: cache pixels per official pixel);
    ``offset_y``, ``offset_x`` (float: the official pixel at the cache frame's origin, 0 unless the framing crops;
    absent in caches written before framings, read as 0): cache = (official - offset) * scale;
    ``content_height``, ``content_width`` (int: the image fills rows and columns from 0 to these, the rest is zero
    padding; absent before framings, read as the cache size);
    ``work_key`` (str: what the stored slices were made from, so a rebuild can reuse them; absent in caches
    written before it existed, and left out of content hashes because it holds a file mtime).
``/lesions/*``: one row per ground-truth lesion (L rows), in the official frame at full resolution
    ``volume`` (row in /volumes), ``slice`` (central slice; 0 for mammograms), ``x``, ``y``, ``width``,
    ``height`` (float64), ``class`` (str).
``/slices/*``: one row per stored 2-D image (N rows)
    ``images`` (N, H, W) float16 in [0, 1], one chunk per slice (gzip after a byte shuffle; raw at
    compression level 0); ``volume``, ``slice_index`` (int);
    ``box_start``, ``box_count`` (int) index ``boxes`` (M, 4) float32 xyxy in the cache frame and
    ``box_lesion`` (M,) int (row in /lesions); ``context`` (N,) bool, only in caches that store context slices
    (``preprocess.context_slices``): a slice stored as the neighbour of a training slice for 2.5-D input, not a
    training sample itself (it has no boxes).
    Training volumes store their training samples (lesion centre slices, optional neighbours, a few normal
    slices); val/test volumes store **all** their slices, contiguous and in order (volume inference).
"""

from __future__ import annotations

import copy
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from comoto_cli.errors import InputDataError

FORMAT_VERSION = 1

VOLUME_TEXT_FIELDS = ("patient_id", "study_uid", "view", "split", "source", "label")
VOLUME_INT_FIELDS = ("num_slices", "original_height", "original_width", "volume_slices", "slice_start", "slice_count",
                     "content_height", "content_width")
VOLUME_FLOAT_FIELDS = ("scale_y", "scale_x", "offset_y", "offset_x")
WORK_KEY = "work_key"  # /volumes/work_key: holds file mtimes, so content hashes leave it out
LESION_FLOAT_FIELDS = ("x", "y", "width", "height")

_STR = h5py.string_dtype("utf-8")


@dataclass
class VolumeRecord:
    """What the cache keeps about one DBT volume or mammogram (besides its slices)."""

    patient_id: str
    study_uid: str
    view: str
    split: str
    source: str
    num_slices: int
    original_height: int
    original_width: int
    scale_y: float
    scale_x: float
    flipped: bool = False
    offset_y: float = 0.0
    offset_x: float = 0.0
    content_height: int = 0  # where the framing put the image (0: the whole cache frame)
    content_width: int = 0
    volume_slices: int = 0
    label: str = ""
    # Lesions in the official frame at full resolution: rows of (slice, x, y, width, height) and their class.
    lesions: list[tuple[int, float, float, float, float]] = field(default_factory=list)
    lesion_classes: list[str] = field(default_factory=list)
    # What its stored slices were made from (see preprocess.pipeline: key, DICOM size and mtime, slices, size):
    # a rebuild reuses the slices of a volume whose key is unchanged instead of decoding it again.
    work_key: str = ""


def create_image_dataset(group: h5py.Group, name: str, count: int, height: int, width: int,
                         compression_level: int) -> h5py.Dataset:
    """``count`` float16 slices of (height, width), one chunk per slice: the cache's image layout. Levels 1-9:
    gzip at that level after HDF5's byte shuffle; 0: stored raw (no filter), the fastest to read and about twice
    the bytes of level 4. Preprocess workers write their per-volume work files with it too, so chunks move between
    files unchanged."""
    filters = {"compression": "gzip", "compression_opts": compression_level, "shuffle": True} if compression_level else {}
    return group.create_dataset(name, shape=(count, height, width), maxshape=(None, height, width), dtype=np.float16,
                                chunks=(1, height, width), **filters)


def stored_layout(dataset: h5py.Dataset) -> tuple:
    """(chunks, compression, compression options, shuffle) of an image dataset: chunks copy between equal ones."""
    return dataset.chunks, dataset.compression, dataset.compression_opts, bool(dataset.shuffle)


def level_layout(compression_level: int, height: int, width: int) -> tuple:
    """:func:`stored_layout` of what :func:`create_image_dataset` makes at ``compression_level``. (Files from before
    level 0 meant "raw" hold gzip at level 0: a different layout, so their chunks are not reused at level 0.)"""
    if compression_level:
        return (1, height, width), "gzip", int(compression_level), True
    return (1, height, width), None, None, False


def copy_chunks(source: h5py.Dataset, target: h5py.Dataset, start: int, rows: slice | None = None) -> None:
    """Append ``source``'s slices (all, or the contiguous range ``rows``) to ``target`` from row ``start`` on, as
    their stored (compressed) chunks: no decoding. ``target`` must already have room for them. Both must come from
    :func:`create_image_dataset` with the same size and compression level."""
    if stored_layout(source) != stored_layout(target):
        raise ValueError(f"chunk layouts differ: {stored_layout(source)} vs {stored_layout(target)}")
    first, stop, step = (0, source.shape[0], 1) if rows is None else rows.indices(source.shape[0])
    if step != 1:
        raise ValueError(f"rows must be a contiguous range, got step {step}")
    for offset, index in enumerate(range(first, stop)):
        filter_mask, chunk = source.id.read_direct_chunk((index, 0, 0))
        target.id.write_direct_chunk((start + offset, 0, 0), chunk, filter_mask)


@dataclass(frozen=True)
class StoredSlices:
    """The contiguous slices ``rows`` of a dataset made by :func:`create_image_dataset`: what
    :meth:`CacheWriter.add_volume` copies as stored chunks (a work file, a shard, the previous cache)."""

    dataset: h5py.Dataset
    rows: slice = field(default_factory=lambda: slice(None))

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(range(*self.rows.indices(self.dataset.shape[0]))), *self.dataset.shape[1:])

    @property
    def ndim(self) -> int:
        return self.dataset.ndim

    def __len__(self) -> int:
        return self.shape[0]


class CacheWriter:
    """Append volumes and their slices, then :meth:`close`. Write to a temporary path and rename it yourself
    (``comoto_cli.utils.atomic.atomic_path``): this class never renames."""

    def __init__(self, path: str | Path, *, modality: str, image_height: int, image_width: int,
                 config_json: str, config_hash: str, source_root: str = "", compression_level: int = 4):
        self.path = Path(path)
        self.height, self.width = int(image_height), int(image_width)
        self.file = h5py.File(self.path, "w", libver="latest")
        self.file.attrs.update({
            "format_version": FORMAT_VERSION, "modality": modality, "config_json": config_json,
            "config_hash": config_hash, "image_height": self.height, "image_width": self.width,
            "source_root": source_root, "skipped_json": "[]",
        })
        self._images = create_image_dataset(self.file.create_group("slices"), "images", 0, self.height, self.width,
                                            compression_level)
        self._volumes: list[VolumeRecord] = []
        self._slice_volume: list[int] = []
        self._slice_index: list[int] = []
        self._box_start: list[int] = []
        self._box_count: list[int] = []
        self._boxes: list[np.ndarray] = []
        self._box_lesion: list[np.ndarray] = []
        self._num_boxes = 0
        self._num_lesions = 0
        self._slice_ranges: list[tuple[int, int]] = []
        self._context: list[bool] = []

    def add_volume(self, record: VolumeRecord, slice_indices: list[int],
                   images: np.ndarray | h5py.Dataset | StoredSlices, slice_boxes: list[np.ndarray],
                   slice_box_lesions: list[np.ndarray], context: list[bool] | None = None) -> int:
        """Add one volume: ``images`` (k, H, W) in [0, 1] for ``slice_indices`` (an array, or stored slices of a
        dataset made by :func:`create_image_dataset`, whose chunks are copied as they are); per slice its
        cache-frame xyxy boxes and, for each box, the index of the lesion in ``record.lesions`` it comes from;
        ``context`` flags the slices stored only as 2.5-D neighbours. Returns its row."""
        if isinstance(images, h5py.Dataset):
            images = StoredSlices(images)
        if images.ndim != 3 or images.shape[1:] != (self.height, self.width) or len(images) != len(slice_indices):
            raise ValueError(f"images shape {images.shape} does not match {len(slice_indices)} slices of "
                             f"{self.height}x{self.width}")
        volume_row = len(self._volumes)
        start = self._images.shape[0]
        record.volume_slices = int(record.volume_slices or record.num_slices)
        self._images.resize(start + len(images), axis=0)
        if isinstance(images, StoredSlices):
            copy_chunks(images.dataset, self._images, start, images.rows)
        elif len(images):
            self._images[start:start + len(images)] = np.clip(np.asarray(images), 0.0, 1.0).astype(np.float16)
        for index, boxes, lesion_ids in zip(slice_indices, slice_boxes, slice_box_lesions):
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            self._slice_volume.append(volume_row)
            self._slice_index.append(int(index))
            self._box_start.append(self._num_boxes)
            self._box_count.append(len(boxes))
            self._boxes.append(boxes)
            self._box_lesion.append(np.asarray(lesion_ids, dtype=np.int64).reshape(-1) + self._num_lesions)
            self._num_boxes += len(boxes)
        flags = [False] * len(slice_indices) if context is None else [bool(c) for c in context]
        if len(flags) != len(slice_indices):
            raise ValueError(f"{len(flags)} context flags for {len(slice_indices)} slices")
        self._context.extend(flags)
        self._num_lesions += len(record.lesions)
        self._volumes.append(record)
        self._slice_ranges.append((start, len(slice_indices)))
        return volume_row

    def set_skipped(self, skipped: list[dict]) -> None:
        self.file.attrs["skipped_json"] = json.dumps(skipped)

    def close(self) -> None:
        if self.file is None:
            return
        volumes = self.file.create_group("volumes")
        ranges = self._slice_ranges
        for name in VOLUME_TEXT_FIELDS:
            volumes.create_dataset(name, data=np.array([getattr(v, name) for v in self._volumes], dtype=object),
                                   dtype=_STR)
        int_values = {
            "num_slices": [v.num_slices for v in self._volumes],
            "original_height": [v.original_height for v in self._volumes],
            "original_width": [v.original_width for v in self._volumes],
            "volume_slices": [v.volume_slices for v in self._volumes],
            "slice_start": [r[0] for r in ranges],
            "slice_count": [r[1] for r in ranges],
            "content_height": [v.content_height or self.height for v in self._volumes],
            "content_width": [v.content_width or self.width for v in self._volumes],
        }
        for name in VOLUME_INT_FIELDS:
            volumes.create_dataset(name, data=np.asarray(int_values[name], dtype=np.int64))
        for name in VOLUME_FLOAT_FIELDS:
            volumes.create_dataset(name, data=np.asarray([getattr(v, name) for v in self._volumes], dtype=np.float64))
        volumes.create_dataset("flipped", data=np.asarray([v.flipped for v in self._volumes], dtype=bool))
        volumes.create_dataset(WORK_KEY, data=np.array([v.work_key for v in self._volumes], dtype=object), dtype=_STR)

        lesions = self.file.create_group("lesions")
        lesion_volume = [row for row, v in enumerate(self._volumes) for _ in v.lesions]
        lesion_table = np.asarray([les for v in self._volumes for les in v.lesions], dtype=np.float64).reshape(-1, 5)
        lesions.create_dataset("volume", data=np.asarray(lesion_volume, dtype=np.int64))
        lesions.create_dataset("slice", data=lesion_table[:, 0].astype(np.int64))
        for column, name in enumerate(LESION_FLOAT_FIELDS, start=1):
            lesions.create_dataset(name, data=lesion_table[:, column])
        classes = [c for v in self._volumes for c in (v.lesion_classes or [""] * len(v.lesions))]
        lesions.create_dataset("class", data=np.array(classes, dtype=object), dtype=_STR)

        slices = self.file["slices"]
        slices.create_dataset("volume", data=np.asarray(self._slice_volume, dtype=np.int64))
        slices.create_dataset("slice_index", data=np.asarray(self._slice_index, dtype=np.int64))
        slices.create_dataset("box_start", data=np.asarray(self._box_start, dtype=np.int64))
        slices.create_dataset("box_count", data=np.asarray(self._box_count, dtype=np.int64))
        boxes = np.concatenate(self._boxes) if self._boxes else np.zeros((0, 4), np.float32)
        slices.create_dataset("boxes", data=boxes.reshape(-1, 4).astype(np.float32))
        box_lesion = np.concatenate(self._box_lesion) if self._box_lesion else np.zeros((0,), np.int64)
        slices.create_dataset("box_lesion", data=box_lesion.astype(np.int64))
        if any(self._context):  # absent otherwise: caches without context read (and hash) as before
            slices.create_dataset("context", data=np.asarray(self._context, dtype=bool))
        self.file.close()
        self.file = None

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class SliceReader:
    """Reads one stored slice of ``/slices/images``, its pixels exactly as h5py would return them.

    For the layouts :func:`create_image_dataset` writes (one float16 chunk per slice; byte shuffle then deflate, or
    no filter) it takes the stored chunk as it is: a raw chunk is the slice; a deflated one is inflated into a
    buffer of the known size and its shuffle undone in numpy, about 1.5x faster than h5py's filter pipeline at
    2048 x 1024 (the training loader's largest cost). Any other layout, and any chunk whose filters HDF5 skipped,
    goes through h5py (``direct=False``: always).
    """

    _DEFLATED = [h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE]

    def __init__(self, dataset: h5py.Dataset, *, direct: bool = True):
        self.dataset = dataset
        plist = dataset.id.get_create_plist()
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        self.shape = tuple(dataset.shape[1:])
        self.size = 2 * int(np.prod(self.shape))
        known = dataset.dtype == np.float16 and dataset.chunks == (1, *self.shape)
        self.direct = direct and known and filters in ([], self._DEFLATED)
        self.deflated = filters == self._DEFLATED

    def __call__(self, row: int) -> np.ndarray:
        if not self.direct:
            return self.dataset[row]
        mask, chunk = self.dataset.id.read_direct_chunk((row, *(0,) * len(self.shape)))
        if not self.deflated:
            if len(chunk) != self.size:
                raise OSError(f"slice {row}: stored chunk of {len(chunk)} bytes, expected {self.size}")
            return np.frombuffer(chunk, dtype=np.float16).reshape(self.shape).copy()  # writable, like h5py's
        if mask != 0:  # a set bit means HDF5 stored this chunk without one of the filters
            return self.dataset[row]
        try:  # the output's size is known: one allocation instead of a growing buffer
            raw = zlib.decompress(chunk, bufsize=self.size)
        except zlib.error as exc:  # the same kind of error h5py raises for a damaged chunk
            raise OSError(f"slice {row}: damaged chunk ({exc})") from None
        return _unshuffle(raw, self.shape)


def _unshuffle(raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Undo HDF5's shuffle filter for 2-byte elements: all low bytes are stored first, then all high bytes."""
    stored = np.frombuffer(raw, dtype=np.uint8)
    count = int(np.prod(shape))
    if stored.size != 2 * count:
        raise OSError(f"a stored slice inflated to {stored.size} bytes, expected {2 * count}")
    out = np.left_shift(stored[count:], 8, dtype=np.uint16)  # whole-array integer ops: faster than byte strides
    out |= stored[:count]
    return out.view(np.float16).reshape(shape)


def _decode(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


class SliceCache:
    """Read side of the cache. Tables are loaded eagerly (small); images lazily, one slice at a time.

    Safe to pass to DataLoader workers: the HDF5 handle is opened on first use in each process.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._reader: SliceReader | None = None
        try:
            with h5py.File(self.path, "r") as handle:
                self.attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in handle.attrs.items()}
                version = int(self.attrs.get("format_version", -1))
                if version != FORMAT_VERSION:
                    raise InputDataError(f"cache format version {version}, this comoto reads {FORMAT_VERSION}; "
                                         "rerun `comoto preprocess`", path=self.path)
                self.volumes = {name: handle["volumes"][name][()] for name in handle["volumes"]}
                count = len(self.volumes["scale_y"])
                for name in ("offset_y", "offset_x"):  # caches written before framings: the whole image, no offset
                    self.volumes.setdefault(name, np.zeros(count, dtype=np.float64))
                for name, key in (("content_height", "image_height"), ("content_width", "image_width")):
                    self.volumes.setdefault(name, np.full(count, int(self.attrs[key]), dtype=np.int64))
                for name in (*VOLUME_TEXT_FIELDS, WORK_KEY):
                    if name in self.volumes or name != WORK_KEY:  # caches written before work keys have none
                        self.volumes[name] = _decode(self.volumes[name])
                self.lesions = {name: handle["lesions"][name][()] for name in handle["lesions"]}
                self.lesions["class"] = _decode(self.lesions["class"])
                self.slice_volume = handle["slices/volume"][()]
                self.slice_index = handle["slices/slice_index"][()]
                self.box_start = handle["slices/box_start"][()]
                self.box_count = handle["slices/box_count"][()]
                self.all_boxes = handle["slices/boxes"][()]
                self.box_lesion = handle["slices/box_lesion"][()]
                context = handle["slices"].get("context")
                self.slice_context = (context[()].astype(bool) if context is not None
                                      else np.zeros(len(self.slice_volume), dtype=bool))
        except FileNotFoundError:
            raise InputDataError("cache file not found", path=self.path) from None
        except (OSError, KeyError) as exc:
            raise InputDataError(f"not a readable comoto cache ({exc})", path=self.path) from None
        self.modality = str(self.attrs["modality"])
        self.image_height = int(self.attrs["image_height"])
        self.image_width = int(self.attrs["image_width"])
        self.skipped = json.loads(self.attrs.get("skipped_json", "[]"))

    # -- pickling for DataLoader workers: never ship an open HDF5 handle
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        state["_reader"] = None
        return state

    def detached(self) -> SliceCache:
        """A copy that opens its own HDF5 handle: for a process that inherited this one's through ``fork``. The
        inherited handle is not closed, which could disturb the parent's."""
        clone = copy.copy(self)
        clone._file, clone._reader = None, None
        return clone

    def _handle(self) -> h5py.File:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
            self._reader = None
        return self._file

    def _read(self, row: int) -> np.ndarray:
        handle = self._handle()
        if self._reader is None:
            self._reader = SliceReader(handle["slices/images"])
        return self._reader(int(row))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._reader = None

    @property
    def num_volumes(self) -> int:
        return len(self.volumes["patient_id"])

    @property
    def num_slices(self) -> int:
        return len(self.slice_volume)

    def volumes_in_split(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.volumes["split"] == split)

    def slices_in_split(self, split: str) -> np.ndarray:
        """Rows of /slices whose volume belongs to ``split``, without the context slices (not samples)."""
        return np.flatnonzero((self.volumes["split"][self.slice_volume] == split) & ~self.slice_context)

    @property
    def context_slices(self) -> int:
        """``preprocess.context_slices`` of this cache (0 before it existed)."""
        return int(self.preprocess_config().get("context_slices", 0))

    def window_rows(self, rows: np.ndarray, radius: int) -> np.ndarray:
        """(n, 2 * radius + 1) rows of /slices: each row's slice and its neighbours at offsets -radius..radius
        in its volume, clamped at the volume's first and last slice (as volume inference pads). Raises
        :class:`InputDataError` naming the first slice whose neighbour the cache does not store."""
        rows = np.asarray(rows, dtype=np.int64)
        key = self.slice_volume * (2**32) + self.slice_index
        order = np.argsort(key, kind="stable")
        sorted_keys = key[order]
        offsets = np.arange(-radius, radius + 1)
        wanted = self.slice_index[rows][:, None] + offsets[None, :]
        last = self.volumes["num_slices"][self.slice_volume[rows]][:, None] - 1
        wanted = np.clip(wanted, 0, np.maximum(last, 0))
        wanted_keys = self.slice_volume[rows][:, None] * (2**32) + wanted
        found = np.clip(np.searchsorted(sorted_keys, wanted_keys), 0, len(sorted_keys) - 1)
        present = sorted_keys[found] == wanted_keys
        if not present.all():
            bad_row, bad_offset = np.argwhere(~present)[0]
            volume = int(self.slice_volume[rows[bad_row]])
            raise InputDataError(
                f"slice {int(self.slice_index[rows[bad_row]])} of volume {self.volumes['patient_id'][volume]}/"
                f"{self.volumes['view'][volume]} has no stored neighbour {int(wanted[bad_row, bad_offset])}: "
                f"{2 * radius + 1} input slices need preprocess.context_slices >= {radius} (this cache: "
                f"{self.context_slices})", path=self.path)
        return order[found]

    def image(self, row: int) -> np.ndarray:
        return self._read(row).astype(np.float32)

    def images_f16(self, row: int) -> np.ndarray:
        """One slice as stored (float16): half the bytes to pass between processes."""
        return self._read(row)

    def images(self, rows: slice) -> np.ndarray:
        """A contiguous range of slices as (n, H, W) float32 (volume inference reads one volume at a time)."""
        start, stop, _ = rows.indices(self.num_slices)
        out = np.empty((max(stop - start, 0), self.image_height, self.image_width), dtype=np.float32)
        for offset, row in enumerate(range(start, stop)):
            out[offset] = self._read(row)
        return out

    def boxes(self, row: int) -> np.ndarray:
        start, count = int(self.box_start[row]), int(self.box_count[row])
        return self.all_boxes[start:start + count]

    def mapping(self, volume: int) -> dict[str, float]:
        """``scale_y``, ``scale_x``, ``offset_y``, ``offset_x`` of one volume: the keyword arguments of
        :func:`comoto_cli.transforms.geometry.cache_to_official` and ``official_to_cache``."""
        return {name: float(self.volumes[name][int(volume)]) for name in VOLUME_FLOAT_FIELDS}

    def volume_slice_rows(self, volume: int) -> slice:
        start = int(self.volumes["slice_start"][volume])
        return slice(start, start + int(self.volumes["slice_count"][volume]))

    @property
    def geometry(self) -> str:
        """The framing its images were made with (``preprocess.geometry``; caches from before framings: stretch)."""
        return str(self.preprocess_config().get("geometry", "stretch"))

    def preprocess_config(self) -> dict:
        return json.loads(self.attrs["config_json"])
