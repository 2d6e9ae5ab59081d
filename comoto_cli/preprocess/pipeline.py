"""``comoto preprocess``: DICOM + CSV -> the HDF5 slice cache (``comoto_cli.cache.h5cache`` documents the layout).

Steps: discover the images and boxes with the config's dataset adapter (``comoto_cli.data.adapters``), validate
every box against its image header, split patients (``splits.assign_splits``), then decode + resize in worker
processes while the main process writes the HDF5 file (h5py is not safe for concurrent writers).

Real size: a worker decodes only the frames its volume contributes (a training volume: frame 0, which the
official flip rule reads, plus its kept slices; validation/test: every frame), one frame at a time, and writes
each resized slice straight into its work file as the cache's own compressed chunk; the main process copies
those chunks into the cache without decoding them. A worker's peak memory is bounded by
:func:`worker_memory_bytes` of the frame size, whatever the number of frames.

Crash safety and reuse:
- the cache is written to a temporary file next to OUT and renamed at the end, so OUT is either absent, the
  previous cache, or complete;
- each volume's decoded, resized slices are first saved (atomically: written under a temporary name, fsynced,
  renamed) as one HDF5 work file ``*.part.h5`` in the work folder ``OUT.parts/<config_hash>/``, named by a
  hash of the volume's key, file size and mtime and the slices asked for. A rerun after a crash or
  ``kill -9`` skips volumes already there; the folder is deleted after the final rename. The cache is always
  filled from these parts, so a resumed run stores the same bytes as an uninterrupted one
  (:func:`comoto_cli.preprocess.summary.cache_content_hash` checks that);
- OUT records its config hash and a fingerprint of its inputs (CSV contents, DICOM sizes and mtimes); a
  rerun with the same config and unchanged inputs reports "up to date" without touching anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from comoto_cli.cache import h5cache
from comoto_cli.cache.h5cache import FORMAT_VERSION, VOLUME_FLOAT_FIELDS, WORK_KEY, CacheWriter, StoredSlices, VolumeRecord
from comoto_cli.cache.shards import SHARD_ATTR, SHARD_GROUP, parse_shard
from comoto_cli.config import PreprocessConfig, config_json
from comoto_cli.data import sources
from comoto_cli.data.adapters import DatasetAdapter, adapter_for, default_dataset, get_adapter
from comoto_cli.data.splits import assign_splits, merge_dataset_split
from comoto_cli.errors import ComotoError, InputDataError, UsageError
from comoto_cli.transforms.framing import framing_for
from comoto_cli.transforms.geometry import clip_boxes, official_to_cache
from comoto_cli.utils.atomic import atomic_path, ensure_writable_dir, sha256_file
from comoto_cli.utils.system import available_memory_bytes, usable_cores

# Bump when the stored content changes for the same config and inputs (invalidates old parts and caches).
PIPELINE_VERSION = 1

FINGERPRINT_ATTR = "input_fingerprint"
MIN_KEPT_FRACTION = 0.25  # of a lesion box's area, for it to stay a training target after the crop cut it
MAPPING_ATTR = "mapping"  # a work file's framing: MAPPING_FIELDS, in that order
MAPPING_FIELDS = (*VOLUME_FLOAT_FIELDS, "content_height", "content_width")
PART_SUFFIX = ".part.h5"


# ---------------------------------------------------------------------------------------------- hashing
def preprocess_config_hash(config: PreprocessConfig) -> str:
    """Hash of the config fields that change the cache's content. ``workers`` and ``decoder`` only change the
    speed (every decoder returns the same pixels), so a rerun with others reuses the parts and the finished cache."""
    normalized = config.model_copy(update={"workers": 0, "decoder": "auto"})
    payload = f"{config_json(normalized)}|format={FORMAT_VERSION}|pipeline={PIPELINE_VERSION}"
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _file_stamp(path: Path) -> list:
    try:
        stat = path.stat()
    except OSError:
        return [str(path), None, None]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def input_fingerprint(root: Path, csv_files: set[Path], images: set[Path]) -> str:
    """CSV contents (small) + DICOM sizes and mtimes (large: never read here)."""
    entries: list = [str(root.resolve())]
    for path in sorted(csv_files, key=str):
        entries.append([str(path), sha256_file(path) if path.is_file() else None])
    entries.extend(_file_stamp(path) for path in sorted(images, key=str))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- tasks
@dataclass
class VolumeTask:
    """Work for one DICOM, small enough to pickle to a worker."""

    index: int
    modality: str
    path: Path
    view: str
    csv: Path
    row: int
    slices: list[int] | None  # None: every slice
    expected_shape: tuple[int, int, int]
    height: int
    width: int
    part: Path
    compression_level: int = 4
    decoder: str = "auto"
    accept_modality: tuple[str, ...] = ()  # mammograms: modalities the user vouches for (--accept-modality)
    dataset: str = ""  # the adapter that reads it; "" (tasks made by hand): the modality's default adapter
    geometry: str = "stretch"  # the framing (comoto_cli.transforms.framing) that puts its pixels in the cache frame


@dataclass
class _Planned:
    record: object  # ImageRecord
    split: str
    shape: tuple[int, int, int]  # (slices, rows, cols) from the header
    lesions: list[tuple[int, float, float, float, float]]
    classes: list[str]
    slices: list[int] | None
    source: str = ""
    task: VolumeTask | None = None
    context: frozenset[int] = frozenset()  # of slices: stored only as 2.5-D neighbours (preprocess.context_slices)


def _open_part(path: Path, task: VolumeTask, count: int):
    """The work file of one volume: an HDF5 file whose ``images`` dataset has the cache's own chunking and filters,
    so the main process copies its compressed chunks into the cache as they are (no second compression)."""
    return h5cache.create_image_dataset(h5py.File(path, "w", libver="latest"), "images", count, task.height,
                                        task.width, task.compression_level)


def _load_part(path: Path, task: VolumeTask) -> dict | None:
    """The finished work file of one volume (open, the caller closes ``handle``), or None when it is missing,
    unreadable or stored in another chunk layout than ``task``'s (then it is redone). Only complete files are ever
    renamed into place, so a readable one is whole."""
    try:
        handle = h5py.File(path, "r")
    except (OSError, ValueError):
        return None
    try:
        if h5cache.stored_layout(handle["images"]) != h5cache.level_layout(task.compression_level, task.height,
                                                                            task.width):
            handle.close()
            return None
        attrs = handle.attrs
        data = {"handle": handle, "images": handle["images"], "slice_indices": np.asarray(attrs["slice_indices"]),
                "flipped": bool(attrs["flipped"]), "shape": tuple(int(v) for v in attrs["shape"])}
        if MAPPING_ATTR in attrs:  # parts written before framings existed are stretched: mapping from the config
            data["mapping"] = _mapping(attrs[MAPPING_ATTR])
        return data
    except (OSError, KeyError, ValueError):
        handle.close()
        return None


def _mapping(values) -> dict:
    """MAPPING_FIELDS by name (the content size as ints) from the stored values."""
    mapping = dict(zip(MAPPING_FIELDS, (float(v) for v in values)))
    mapping["content_height"], mapping["content_width"] = int(mapping["content_height"]), int(mapping["content_width"])
    return mapping


def _task_adapter(task: VolumeTask) -> DatasetAdapter:
    """The adapter a worker reads the task with (looked up by name: adapters do not travel to workers)."""
    return get_adapter(task.dataset or default_dataset(PreprocessConfig(modality=task.modality)))


def _read_source(task: VolumeTask):
    """The task's :class:`~comoto_cli.data.adapters.base.PixelSource`, its shape checked against the header."""
    source = _task_adapter(task).open_pixels(task.path, view=task.view, csv=task.csv, row=task.row,
                                             slices=task.slices, decoder=task.decoder,
                                             accept_modality=task.accept_modality)
    if tuple(source.shape) != tuple(task.expected_shape):
        raise InputDataError(f"decoded pixels have shape {tuple(source.shape)} but the header says "
                             f"{tuple(task.expected_shape)}", path=task.path)
    return source


def _no_reference() -> np.ndarray:
    raise UsageError("this dataset adapter gives no reference frame, so it cannot be cropped (use geometry: stretch)")


def _fsync(path: Path) -> None:
    """Renaming makes a work file all-or-nothing against kill -9; the fsync keeps that after a power cut too."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def process_volume(task: VolumeTask) -> dict:
    """Worker: decode the wanted frames of one DICOM one at a time, resize each into the volume's work file.
    Returns ``{"part": path}`` or ``{"error": {"path", "row", "reason"}}`` for bad input (exceptions lose their
    fields when pickled). Memory: one raw frame, its float32 window and resize (see the README's bound)."""
    try:
        source = _read_source(task)
        shape = tuple(source.shape)
        framing = framing_for(task.geometry, shape[1:], task.height, task.width, source.reference or _no_reference)
        indices = list(range(shape[0])) if task.slices is None else sorted(set(task.slices))
        with atomic_path(task.part) as temporary:
            images = _open_part(temporary, task, len(indices))
            try:
                for position, (_, frame) in enumerate(source.frames):
                    images[position] = np.clip(framing.apply(frame), 0.0, 1.0).astype(np.float16)
                mapping = {**framing.mapping(), "content_height": framing.content_height,
                           "content_width": framing.content_width}
                images.file.attrs.update({"slice_indices": np.asarray(indices, np.int64), "flipped": source.flipped,
                                          "shape": np.asarray(shape, np.int64),
                                          MAPPING_ATTR: np.asarray([mapping[k] for k in MAPPING_FIELDS], np.float64)})
            finally:
                images.file.close()
            _fsync(temporary)
    except InputDataError as exc:
        return {"error": {"path": exc.path or str(task.path), "row": exc.row, "reason": exc.reason}}
    return {"part": str(task.part)}


# ---------------------------------------------------------------------------------------------- planning
def _resolve(root: Path, path: Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else root / path


def _relative(root: Path, path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _is_normal(record) -> bool:
    return not record.boxes and str(record.label or "").strip().lower() in ("normal", "")


def _training_slices(record, num_slices: int, lesions, offset: int, normal_slices: int, seed: int) -> list[int]:
    """Lesion centre slices +- ``offset`` (clipped), or seeded random slices of a normal volume."""
    if lesions:
        chosen = {min(max(int(les[0]) + d, 0), num_slices - 1) for les in lesions for d in range(-offset, offset + 1)}
        return sorted(chosen)
    if not _is_normal(record) or normal_slices <= 0 or num_slices <= 0:
        return []  # e.g. an actionable volume without boxes: no trustworthy negatives either
    key = f"{record.patient_id}|{record.study_uid}|{record.view}".encode()
    # Seeded per volume (not by position in a list): the choice does not depend on which other volumes exist.
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(key).digest()[:8], "little")])
    return sorted(int(i) for i in rng.choice(num_slices, size=min(normal_slices, num_slices), replace=False))


def with_context(training: list[int], num_slices: int, radius: int) -> tuple[list[int], frozenset[int]]:
    """The slices to store for ``training`` slices with ``radius`` neighbours each side (clamped to the volume), and
    those of them that are only neighbours (context, not training samples)."""
    if radius <= 0 or not training:
        return list(training), frozenset()
    stored = {min(max(i + d, 0), num_slices - 1) for i in training for d in range(-radius, radius + 1)}
    return sorted(stored), frozenset(stored - set(training))


def slice_boxes(lesions, stored: list[int], mapping: dict[str, float], offset: int, modality: str,
                content: tuple[float, float] | None = None):
    """Per stored slice its cache-frame xyxy boxes and lesion indices: every lesion whose central slice lies
    within ``offset`` of the slice (mammograms: every lesion). ``mapping``: the volume's scale and offset
    (``official_to_cache``'s keywords). ``content`` (height, width): where the framing put the image; boxes are
    cut to it, and a box with less than ``MIN_KEPT_FRACTION`` of its area left inside is left out. Also returns how
    many lesions were cut or left out."""
    if lesions:
        table = np.asarray(lesions, dtype=np.float64).reshape(-1, 5)
        cache = official_to_cache(table[:, 1:], **mapping)
        centres = table[:, 0].astype(np.int64)
    else:
        cache, centres = np.zeros((0, 4)), np.zeros((0,), np.int64)
    inside = np.ones(len(cache), dtype=bool)
    cut = 0
    if content is not None and len(cache):
        # Only boxes that leave the image by more than rounding are cut: a box on the image border stays as it
        # was computed (its far edge can be 1e-13 beyond the cache size).
        clipped = clip_boxes(cache, *content)
        changed = np.any(np.abs(clipped - cache) > 1e-6, axis=1)
        cut = int(np.count_nonzero(changed))
        # A lesion mostly outside the kept region is not a training target: a sliver of it would teach the edge.
        area = (cache[:, 2] - cache[:, 0]) * (cache[:, 3] - cache[:, 1])
        kept = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        inside = ~changed | (kept >= MIN_KEPT_FRACTION * area)
        cache = np.where(changed[:, None], clipped, cache)
    boxes, ids = [], []
    for index in stored:
        chosen = np.arange(len(centres)) if modality == "mammo" else np.flatnonzero(np.abs(centres - index) <= offset)
        chosen = chosen[inside[chosen]]
        boxes.append(cache[chosen].astype(np.float32))
        ids.append(chosen.astype(np.int64))
    return boxes, ids, cut


def _record_key(record) -> tuple:
    return (str(record.patient_id), str(record.study_uid), str(record.view), str(record.path))


def _part_name(planned: _Planned, root: Path, height: int, width: int) -> str:
    record = planned.record
    path = _resolve(root, record.path)
    payload = json.dumps([_record_key(record), _file_stamp(path)[1:], planned.slices, list(planned.shape),
                          height, width, PIPELINE_VERSION])
    return hashlib.sha256(payload.encode()).hexdigest()[:24] + PART_SUFFIX


# ---------------------------------------------------------------------------------------------- locking
@contextlib.contextmanager
def _exclusive(parts_root: Path) -> Iterator[None]:
    """One preprocess per OUT at a time; the kernel drops the lock when the process dies (even kill -9)."""
    ensure_writable_dir(parts_root)
    try:
        handle = open(parts_root / "lock", "w")
    except OSError as exc:
        raise ComotoError(f"cannot write: {exc.strerror or exc}", path=parts_root / "lock") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ComotoError("another `comoto preprocess` is writing this cache", path=parts_root) from None
        yield
    finally:
        handle.close()


def _remove_stale_temporaries(out: Path, parts_dir: Path) -> None:
    """Temporaries a killed run left behind (we hold the lock, so nobody else is writing them)."""
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    if parts_dir.is_dir():
        for stale in parts_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- main entry
def _with_headers(adapter: DatasetAdapter, root: Path, records: list, config: PreprocessConfig,
                  skipped: list[dict] | None) -> list[tuple[object, tuple[int, int, int]]]:
    """(record, header shape) of every record whose header reads and whose boxes all fit it. Done before any heavy
    work, so bad input fails in seconds."""
    kept = []
    for record in records:
        try:
            shape = adapter.read_header(_resolve(root, record.path), config)
        except InputDataError as exc:
            reason = exc.reason
            if exc.row is None:
                # The header readers only know the DICOM; the user edits the listing row that names it.
                reason = f"{reason} (listed in {record.csv}, row {record.row})"
            _fail_or_skip(skipped, exc.path or _resolve(root, record.path), exc.row, reason)
            continue
        problem = _box_problem(record, shape)
        if problem is not None:
            box, reason = problem
            if skipped is None:
                raise InputDataError(reason, path=box.csv, row=box.row)
            skipped.append({"path": str(box.csv), "row": box.row, "reason": f"{reason}; image {record.path} left out"})
            continue
        kept.append((record, shape))
    if not kept:
        raise InputDataError(f"no usable {adapter.unit} found", path=root)
    return kept


def _box_problem(record, shape: tuple[int, int, int]) -> tuple[object, str] | None:
    """(box, why) for the record's first box that does not fit its image, or None."""
    for box in record.boxes:
        reason = sources.check_box_in_image(box, shape[1], shape[2], shape[0])
        if reason is not None:
            return box, reason
    return None


def _fingerprint(adapter: DatasetAdapter, root: Path, config: PreprocessConfig, kept: list,
                 skipped: list[dict] | None) -> str:
    """:func:`input_fingerprint` of everything the kept records and the skip list came from."""
    listings = {Path(path) for path in adapter.input_files(config)}
    images: set[Path] = set()
    for record, _ in kept:
        listings.add(Path(record.csv))
        if record.labels_csv is not None:
            listings.add(Path(record.labels_csv))
        listings.update(Path(box.csv) for box in record.boxes)
        images.add(_resolve(root, record.path))
        images.update(Path(path) for path in record.extra_inputs)
    for entry in skipped or []:
        path = Path(entry["path"])
        # A skipped row names its listing (hashed: small) or, for an unreadable image, the image (stamped only).
        (listings if path.suffix.lower() == ".csv" or path in listings else images).add(path)
    return input_fingerprint(root, listings, images)


def _fail_or_skip(skipped: list[dict] | None, path, row, reason: str) -> None:
    if skipped is None:
        raise InputDataError(reason, path=path, row=row)
    skipped.append({"path": str(path), "row": row, "reason": reason})


def _cache_is_current(out: Path, config_digest: str, fingerprint: str) -> bool:
    try:
        with h5py.File(out, "r") as handle:
            attrs = handle.attrs
            return (int(attrs.get("format_version", -1)) == FORMAT_VERSION
                    and str(attrs.get("config_hash", "")) == config_digest
                    and str(attrs.get(FINGERPRINT_ATTR, "")) == fingerprint)
    except (OSError, ValueError):
        return False


# Peak resident memory of one worker: interpreter, numpy, pydicom, h5py and numba, then per source pixel of the
# largest frame the raw frame, its float32 window, the float64 passes of the resize and compression buffers.
# Measured (make bench-full) at BCS-DBT size (2457 x 1996): 290-350 MiB; these constants stay above that.
WORKER_BASE_BYTES = 192 * 2**20
WORKER_BYTES_PER_PIXEL = 48


def worker_memory_bytes(frame_pixels: int) -> int:
    """Upper bound on one preprocess worker's peak memory for frames of ``frame_pixels`` pixels."""
    return WORKER_BASE_BYTES + WORKER_BYTES_PER_PIXEL * int(frame_pixels)


def _worker_count(config: PreprocessConfig, tasks: list[VolumeTask]) -> int:
    """``--workers`` as given, or for 0 as many as the cores allow and 80 % of the free memory holds."""
    if config.workers:
        return max(1, min(config.workers, len(tasks)))
    wanted = usable_cores()
    free = available_memory_bytes()
    if free is not None and tasks:
        largest = max(task.expected_shape[1] * task.expected_shape[2] for task in tasks)
        wanted = min(wanted, int(0.8 * free) // worker_memory_bytes(largest))
    return max(1, min(wanted, len(tasks)))


def _pool(workers: int) -> ProcessPoolExecutor:
    # forkserver: forking a process that runs threads (rich's refresh thread, the executor's manager) can
    # deadlock; spawn elsewhere.
    method = "forkserver" if sys.platform.startswith("linux") else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["comoto_cli.preprocess.pipeline", "numpy", "pydicom"])
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_quiet_worker)


def _quiet_worker() -> None:
    """pydicom warns once per malformed tag; a bad file is already reported as one error naming its CSV row, so
    the warnings would only break that one line (kept with ``--debug``, which sets COMOTO_DEBUG)."""
    import warnings

    if os.environ.get("COMOTO_DEBUG", "") in ("", "0"):
        warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")


def _progress(enabled: bool, console):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled,
                    transient=False)


def preprocess(root: Path, out: Path, config: PreprocessConfig, *, shard: tuple[int, int] | None = None,
               progress: bool = True, console=None) -> dict:
    """Build the slice cache ``out`` from the dataset in ``root``. Returns a report dict:
    ``out``, ``up_to_date``, ``volumes``, ``slices``, ``computed``, ``reused``, ``boxes_cut`` (lesion boxes cut to
    the part of the image the framing kept), ``skipped``, ``seconds``, ``shard``.

    ``shard=(K, N)`` (1-based K) builds only part K of N: the plan (every volume, split over all patients) is made
    as in a full run, then the volumes at plan positions i with ``i % N == K - 1`` are kept. The file is a normal
    cache of those volumes plus the root attribute ``shard`` ("K/N") and ``/shard/plan_index`` (each volume's
    position in the full plan); it may hold no volumes. :func:`comoto_cli.preprocess.merge.merge_caches` joins the N
    shards into the cache a single run makes. The shard is not part of the config (nor of its hash)."""
    from rich.console import Console

    started = time.perf_counter()
    console = console or Console(stderr=True, highlight=False)
    root, out = Path(root), Path(out)
    shard, shard_label = _checked_shard(shard)  # validated before any work
    adapter = adapter_for(config)  # so is the dataset (known, of this modality)
    if not root.is_dir():
        raise InputDataError("data root is not a folder", path=root)
    if out.exists() and out.is_dir():
        raise InputDataError("output is a folder; give a file name such as dbt.h5", path=out)
    skipped: list[dict] | None = [] if config.on_error == "skip" else None
    records = sorted(adapter.discover(root, config, skipped), key=_record_key)
    kept = _with_headers(adapter, root, records, config, skipped)
    run = _Run(root, out, config, adapter, preprocess_config_hash(config),
               _fingerprint(adapter, root, config, kept, skipped), skipped, shard, shard_label, progress, console)
    # A shard keeps the plan positions i with i % N == K - 1; the plan has one entry per kept record, in order.
    positions = list(range(len(kept))) if shard is None else list(range(shard[0] - 1, len(kept), shard[1]))
    if out.is_file() and _cache_is_current(out, run.digest, run.fingerprint) and _stored_shard(out) == shard_label:
        return {"out": str(out), "up_to_date": True, "volumes": len(positions), "slices": None, "computed": 0,
                "reused": 0, "skipped": sorted(skipped or [], key=_skip_key), "seconds": time.perf_counter() - started,
                "shard": shard_label}
    plan = _plan(kept, adapter, root, config)
    report = _build(run, [plan[i] for i in positions], positions, len(plan))
    report["seconds"] = time.perf_counter() - started
    return report


@dataclass
class _Run:
    """What the steps that write the cache need to know of one :func:`preprocess` call."""

    root: Path
    out: Path
    config: PreprocessConfig
    adapter: DatasetAdapter
    digest: str  # preprocess_config_hash
    fingerprint: str  # input_fingerprint
    skipped: list[dict] | None  # None: fail at the first bad input
    shard: tuple[int, int] | None
    shard_label: str | None
    progress: bool
    console: object


def _plan(kept: list, adapter: DatasetAdapter, root: Path, config: PreprocessConfig) -> list[_Planned]:
    """Split the patients (dataset splits respected when configured) and choose what each image stores."""
    dataset_splits: dict[str, str | None] = {}
    has_lesion: dict[str, bool] = {}
    for record, _ in kept:
        dataset_splits[record.patient_id] = merge_dataset_split(dataset_splits.get(record.patient_id), record.split)
        has_lesion[record.patient_id] = has_lesion.get(record.patient_id, False) or bool(record.boxes)
    split_of = assign_splits(dataset_splits.keys(), config.split, dataset_splits, has_lesion)
    offset = config.lesion_slice_offset if adapter.volumes else 0
    plan: list[_Planned] = []
    for record, shape in kept:
        ordered = sorted(record.boxes, key=lambda b: (int(b.slice), float(b.x), float(b.y), float(b.width),
                                                      float(b.height), str(b.cls)))
        lesions = [(int(b.slice), float(b.x), float(b.y), float(b.width), float(b.height)) for b in ordered]
        split = split_of[record.patient_id]
        # Evaluation reads whole volumes; training only lesion (and a few normal) slices. A 2-D image is whole.
        if not adapter.volumes or split != "train":
            stored = None
        else:
            stored = _training_slices(record, shape[0], lesions, offset, config.normal_slices_per_volume,
                                      config.split.seed)
        stored, context = (with_context(stored, shape[0], config.context_slices) if stored is not None
                           else (None, frozenset()))
        plan.append(_Planned(record, split, shape, lesions, [str(b.cls) for b in ordered], stored,
                             source=str(getattr(record, "source", "") or _relative(root, _resolve(root, record.path))),
                             context=context))
    return plan


def _build(run: _Run, plan: list[_Planned], positions: list[int], plan_size: int) -> dict:
    """Write the cache of ``plan`` while holding OUT's lock. After a failure the finished work files stay for the
    rerun; a work folder (and output folders this run made) with nothing in it goes."""
    out = run.out
    parts_root = Path(f"{out}.parts")
    parts_dir = parts_root / run.digest
    created = [folder for folder in (out.parent, *out.parent.parents) if not folder.exists()]
    report = {"out": str(out), "up_to_date": False, "volumes": 0, "slices": 0, "computed": 0, "reused": 0,
              "boxes_cut": 0, "shard": run.shard_label}
    with _exclusive(parts_root):
        try:
            _remove_stale_temporaries(out, parts_dir)
            parts_dir.mkdir(parents=True, exist_ok=True)
            _make_tasks(run, plan, parts_dir)
            report["skipped"] = _write(run, plan, positions, plan_size, report)
            shutil.rmtree(parts_root, ignore_errors=True)
        except BaseException:
            if not any(parts_root.glob(f"*/*{PART_SUFFIX}")):
                shutil.rmtree(parts_root, ignore_errors=True)
                for folder in created:
                    with contextlib.suppress(OSError):
                        folder.rmdir()
            raise
    return report


def _make_tasks(run: _Run, plan: list[_Planned], parts_dir: Path) -> None:
    """Each planned image's work, small enough to pickle to a worker, with the name of its work file."""
    config = run.config
    for index, planned in enumerate(plan):
        record = planned.record
        planned.task = VolumeTask(index, config.modality, _resolve(run.root, record.path), record.view,
                                  Path(record.csv), int(record.row), planned.slices, planned.shape,
                                  config.image_height, config.image_width,
                                  parts_dir / _part_name(planned, run.root, config.image_height, config.image_width),
                                  config.compression_level, config.decoder, tuple(config.accept_modality),
                                  run.adapter.name, config.geometry)


def _write(run: _Run, plan: list[_Planned], positions: list[int], plan_size: int, report: dict) -> list[dict]:
    """Fill a temporary cache from the work files (or OUT's previous content) and rename it to OUT; returns the
    skip list it records."""
    config = run.config
    with atomic_path(run.out) as temporary:
        settings = {"modality": config.modality, "image_height": config.image_height,
                    "image_width": config.image_width, "config_json": config_json(config),
                    "config_hash": run.digest, "source_root": str(run.root.resolve()),
                    "compression_level": config.compression_level}
        writer = (CacheWriter(temporary, **settings) if run.shard is None
                  else _ShardWriter(temporary, plan=plan, positions=positions, **settings))
        try:
            with _previous_slices(run.out, run.digest, run.root, config) as previous:
                worker_skipped = _run_and_write(plan, writer, config, run.adapter, report, run.progress, run.console,
                                                run.skipped, previous)
            all_skipped = sorted((run.skipped or []) + worker_skipped, key=_skip_key)
            if report["volumes"] == 0 and run.shard is None:  # a shard may hold nothing: merge joins it
                raise InputDataError("every input was skipped; nothing to cache", path=run.root)
            writer.set_skipped(all_skipped)
            writer.file.attrs[FINGERPRINT_ATTR] = run.fingerprint
            if run.shard is not None:
                writer.write_shard(run.shard_label, plan_size)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    return all_skipped


def _checked_shard(shard: tuple[int, int] | None) -> tuple[tuple[int, int] | None, str | None]:
    """(K, N) and its label "K/N", after checking 1 <= K <= N (a one-line UsageError otherwise)."""

    if shard is None:
        return None, None
    try:
        label = "/".join(str(int(v)) for v in shard)
    except (TypeError, ValueError):
        label = str(shard)
    shard = parse_shard(label)
    return shard, f"{shard[0]}/{shard[1]}"


def _stored_shard(out: Path) -> str | None:
    """The ``shard`` attribute of an existing cache (None for a full cache or an unreadable file)."""

    try:
        with h5py.File(out, "r") as handle:
            value = handle.attrs.get(SHARD_ATTR)
    except (OSError, ValueError):
        return None
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class _ShardWriter(CacheWriter):
    """A CacheWriter that also notes each added volume's position in the full plan. Volumes arrive in the order of
    the shard's plan, some left out (skipped inputs), so each one is matched to the next plan entry with its key."""

    def __init__(self, path, *, plan: list[_Planned], positions: list[int], **settings):
        super().__init__(path, **settings)
        self._keys = [(str(p.record.patient_id), str(p.record.study_uid), str(p.record.view), str(p.source))
                      for p in plan]
        self._positions = positions
        self._next = 0
        self.plan_index: list[int] = []

    def add_volume(self, record: VolumeRecord, *args, **kwargs) -> int:
        key = (str(record.patient_id), str(record.study_uid), str(record.view), str(record.source))
        while self._next < len(self._keys) and self._keys[self._next] != key:
            self._next += 1
        if self._next == len(self._keys):
            raise RuntimeError(f"volume {key} is not in the shard's plan (or out of plan order)")
        row = super().add_volume(record, *args, **kwargs)
        self.plan_index.append(self._positions[self._next])
        self._next += 1
        return row

    def write_shard(self, label: str, plan_size: int) -> None:

        self.file.attrs[SHARD_ATTR] = label
        group = self.file.create_group(SHARD_GROUP)
        group.create_dataset("plan_index", data=np.asarray(self.plan_index, dtype=np.int64))
        group.attrs["plan_size"] = int(plan_size)


def _skip_key(entry: dict) -> tuple:
    return (str(entry.get("path")), entry.get("row") or 0, str(entry.get("reason")))


@contextlib.contextmanager
def _previous_slices(out: Path, digest: str, root: Path, config: PreprocessConfig) -> Iterator[dict[str, dict]]:
    """The volumes of the cache OUT already holds, by work key, when it was made with the same config from the same
    data root and stores its slices in the layout this config writes: a rebuild after some inputs changed copies
    their slices instead of decoding them again."""
    try:
        handle = h5py.File(out, "r") if out.is_file() else None
    except (OSError, ValueError):
        handle = None
    try:
        found: dict[str, dict] = {}
        layout = h5cache.level_layout(config.compression_level, config.image_height, config.image_width)
        if (handle is not None and _same_settings(handle, digest, root) and WORK_KEY in handle["volumes"]
                and h5cache.stored_layout(handle["slices/images"]) == layout):
            volumes, slice_index = handle["volumes"], handle["slices/slice_index"][()]
            starts, counts = volumes["slice_start"][()], volumes["slice_count"][()]
            for row, key in enumerate(volumes[WORK_KEY].asstr()[()]):
                start, count = int(starts[row]), int(counts[row])
                found[key] = {"images": StoredSlices(handle["slices/images"], slice(start, start + count)),
                              "slice_indices": slice_index[start:start + count],
                              "flipped": bool(volumes["flipped"][row])}
                if "content_height" in volumes:
                    found[key]["mapping"] = _mapping([volumes[name][row] for name in MAPPING_FIELDS])
        yield found
    finally:
        if handle is not None:
            handle.close()


def _same_settings(handle: h5py.File, digest: str, root: Path) -> bool:
    attrs = handle.attrs
    try:
        return (int(attrs.get("format_version", -1)) == FORMAT_VERSION and str(attrs.get("config_hash", "")) == digest
                and str(attrs.get("source_root", "")) == str(root.resolve()))
    except (TypeError, ValueError):
        return False


def work_key(task: VolumeTask) -> str:
    """What a volume's stored slices depend on (its part name: key, DICOM size and mtime, slices, sizes)."""
    return task.part.name.removesuffix(PART_SUFFIX)


def _run_and_write(plan: list[_Planned], writer: CacheWriter, config: PreprocessConfig, adapter: DatasetAdapter,
                   report: dict, progress: bool, console, skipped: list[dict] | None,
                   previous: dict[str, dict]) -> list[dict]:
    """Decode what is neither in the parts folder nor in the previous cache (in workers), then write every volume
    in plan order."""
    results: dict[int, dict] = {}
    pending: list[VolumeTask] = []
    for planned in plan:
        if planned.task.part.is_file():
            results[planned.task.index] = {"part": str(planned.task.part)}
        elif work_key(planned.task) in previous:
            results[planned.task.index] = {"previous": work_key(planned.task)}
        else:
            pending.append(planned.task)
    report["reused"] = len(plan) - len(pending)
    report["computed"] = len(pending)
    worker_skipped: list[dict] = []
    next_to_write = 0

    def write_ready() -> None:
        nonlocal next_to_write
        while next_to_write < len(plan) and next_to_write in results:
            planned = plan[next_to_write]
            outcome = results.pop(next_to_write)
            next_to_write += 1
            if "previous" in outcome:
                _write_volume(planned, previous[outcome["previous"]], writer, config, adapter, report)
                continue
            data = _load_part(Path(outcome["part"]), planned.task) if "part" in outcome else None
            if "part" in outcome and data is None:  # torn by a crash or a disk error, or another layout: redo it
                outcome = process_volume(planned.task)
                data = _load_part(Path(outcome["part"]), planned.task) if "part" in outcome else None
                if "part" in outcome and data is None:
                    raise InputDataError("cannot read back the work file just written", path=outcome["part"])
            if "error" in outcome:
                error = outcome["error"]
                if skipped is None:
                    raise InputDataError(error["reason"], path=error["path"], row=error["row"])
                worker_skipped.append(error)
                continue
            try:
                _write_volume(planned, data, writer, config, adapter, report)
            finally:
                data["handle"].close()

    with _progress(progress, console) as bar:
        task_id = bar.add_task(f"preprocess {adapter.unit}", total=len(plan), completed=report["reused"])
        workers = _worker_count(config, pending)
        if workers <= 1 or len(pending) <= 1:
            for task in pending:
                results[task.index] = process_volume(task)
                bar.advance(task_id)
                write_ready()
        else:
            executor = _pool(workers)
            try:
                futures: dict[Future, int] = {executor.submit(process_volume, task): task.index for task in pending}
                waiting = set(futures)
                while waiting:
                    done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
                    for future in done:
                        results[futures[future]] = future.result()
                        bar.advance(task_id)
                    write_ready()
            except BaseException:
                executor.shutdown(wait=True, cancel_futures=True)
                raise
            executor.shutdown(wait=True)
        write_ready()
    return worker_skipped


def _write_volume(planned: _Planned, data: dict, writer: CacheWriter, config: PreprocessConfig,
                  adapter: DatasetAdapter, report: dict) -> None:
    record = planned.record
    num_slices, rows, cols = planned.shape
    # Work files and caches from before framings hold stretched images: their mapping follows from the config.
    mapping = data.get("mapping") or {"scale_y": config.image_height / rows, "scale_x": config.image_width / cols,
                                      "offset_y": 0.0, "offset_x": 0.0, "content_height": config.image_height,
                                      "content_width": config.image_width}
    stored = [int(i) for i in data["slice_indices"]]
    offset = config.lesion_slice_offset if adapter.volumes else 0
    boxes, lesion_ids, cut = slice_boxes(planned.lesions, stored, {k: mapping[k] for k in VOLUME_FLOAT_FIELDS}, offset,
                                         adapter.modality, (mapping["content_height"], mapping["content_width"]))
    report["boxes_cut"] += cut
    context = [index in planned.context for index in stored]
    for position, is_context in enumerate(context):  # a neighbour channel, not a sample: it has no boxes
        if is_context:
            boxes[position], lesion_ids[position] = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    volume = VolumeRecord(
        patient_id=str(record.patient_id), study_uid=str(record.study_uid), view=str(record.view),
        split=planned.split, source=planned.source,
        num_slices=int(num_slices), original_height=int(rows), original_width=int(cols),
        **mapping, flipped=bool(data["flipped"]),
        volume_slices=int(record.volume_slices or num_slices), label=str(record.label or ""),
        lesions=list(planned.lesions), lesion_classes=list(planned.classes), work_key=work_key(planned.task),
    )
    writer.add_volume(volume, stored, data["images"], boxes, lesion_ids, context)
    report["volumes"] += 1
    report["slices"] += len(stored)

