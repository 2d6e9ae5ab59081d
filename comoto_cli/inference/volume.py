"""DBT volume inference: a 2-D detector on every slice, then volume NMS, boxes in the official frame.

The reference (docs/design.md section 3, "Volume inference") runs its 2-D RetinaNet on each slice of a volume,
maps the boxes back to the official reader's frame at full resolution and keeps, for every slice ``i``, the
boxes that are not beaten by an overlapping, higher-scoring box within ``[i - L/4, i + L/4)`` slices. Each
surviving box becomes one row of a DBTex submission: ``Z`` = its slice, ``Depth`` = 0.

Slices go through the network in batches straight from memory (or from the HDF5 cache, or decoded from the
DICOM file, one batch at a time): no temporary files, and a whole 2048 x 1024 volume never needs to be resident
at once. On the CPU a batch is also capped in pixels (:func:`forward_batch_size`): a ResNet-50 forward pass at
2048 x 1024 holds several hundred MB of activations per slice, and batching buys a CPU nothing.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from comoto_cli.config import InferenceConfig
from comoto_cli.data.tables import DBTEX_COLUMNS
from comoto_cli.data.tables import DBTEX_NUMERIC_COLUMNS as _NUMERIC_COLUMNS
from comoto_cli.errors import InputDataError, UsageError
from comoto_cli.inference.volume_nms import volume_nms
from comoto_cli.networks.detector import detections_as_numpy
from comoto_cli.transforms.geometry import cache_to_official
from comoto_cli.utils.system import loader_workers


class SliceSource(Protocol):
    """Anything with a ``shape`` (S, H, W) that returns float slices for ``source[start:stop]``."""

    shape: tuple[int, ...]

    def __getitem__(self, index: slice) -> Any: ...


class CacheVolume:
    """One volume of a :class:`SliceCache` seen as an (S, H, W) array that reads its slices lazily."""

    def __init__(self, cache, volume: int):
        self.cache = cache
        self.rows = cache.volume_slice_rows(volume)
        self.shape = (self.rows.stop - self.rows.start, cache.image_height, cache.image_width)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(self.shape[0])
        return self.cache.images(slice(self.rows.start + start, self.rows.start + stop))


# Most pixels one forward pass takes on the CPU: one slice at the default 2048 x 1024. The activations of a
# ResNet-50 RetinaNet pass grow with the pixels (a 2048 x 1024 slice without gradients holds several hundred MB;
# `comoto predict` on a BCS-DBT volume peaked at 1.14 GiB RSS in all with one slice per pass), while a CPU runs
# a batch no faster per slice than single slices, so larger batches would only cost memory.
CPU_PIXELS_PER_PASS = 2048 * 1024


def forward_batch_size(batch_size: int, image_size: tuple[int, int], device: torch.device | str) -> int:
    """Slices per forward pass (and per read of the slice source): ``batch_size``, on the CPU at most
    ``CPU_PIXELS_PER_PASS`` pixels (at least one slice). Results do not depend on it (see :func:`detect_volume`)."""
    batch_size = max(1, int(batch_size))
    if torch.device(device).type != "cpu":
        return batch_size
    pixels = max(1, int(image_size[0]) * int(image_size[1]))
    return max(1, min(batch_size, CPU_PIXELS_PER_PASS // pixels))


def slice_range(num_slices: int, skip_edge_slices: int) -> range:
    """Slices that go through the detector: ``skip_edge_slices`` dropped at each end (the reference drops 4,
    where the acquisition's edge slices are noisy). A volume too short for that keeps at least its central
    slice, so a short volume (or a mammogram, one slice) is never silently left without predictions."""
    skip = min(int(skip_edge_slices), max(0, (int(num_slices) - 1) // 2))
    return range(skip, int(num_slices) - skip)


def input_radius(model) -> int:
    """Neighbours on each side that ``model`` takes with a slice (``model.input_slices``; 0 for a 2-D model)."""
    config = getattr(model, "config", None)
    return (int(getattr(config, "input_slices", 1)) - 1) // 2


def read_range(num_slices: int, skip_edge_slices: int, radius: int) -> range:
    """The slices :func:`detect_volume` reads: those it detects on and their ``radius`` neighbours (an edge slice
    skipped for detection can still be a neighbour)."""
    wanted = slice_range(num_slices, skip_edge_slices)
    return range(max(wanted.start - radius, 0), min(wanted.stop + radius, int(num_slices)))


class _Windows:
    """Reads a slice source once, in ascending ranges, and hands out each wanted slice with its ``radius``
    neighbours as channels, clamped at the volume's ends: (n, 2 * radius + 1, H, W). Holds one batch and
    2 * radius slices."""

    def __init__(self, source, num_slices: int, reads: range, radius: int):
        self.source, self.num_slices, self.radius = source, num_slices, radius
        self.start = self.end = reads.start  # the buffer holds slices [start, end)
        self.buffer: np.ndarray | None = None

    def take(self, first: int, stop: int) -> np.ndarray:
        end = min(stop + self.radius, self.num_slices)
        if end > self.end:
            new = self.source[self.end:end]
            new = new.detach().cpu().numpy() if isinstance(new, torch.Tensor) else np.asarray(new)
            self.buffer = new if self.buffer is None else np.concatenate([self.buffer, new])
            self.end = end
        keep = max(first - self.radius, 0)
        if keep > self.start:
            self.buffer, self.start = self.buffer[keep - self.start:], keep
        index = np.clip(np.arange(first, stop)[:, None] + np.arange(-self.radius, self.radius + 1)[None, :], 0,
                        self.num_slices - 1)
        return self.buffer[index - self.start]


def _empty_detections() -> dict[str, np.ndarray]:
    return {"slice_index": np.zeros(0, np.int64), "boxes": np.zeros((0, 4), np.float32),
            "scores": np.zeros(0, np.float32)}


def detect_volume(model, slices: np.ndarray | torch.Tensor | SliceSource, *, config: InferenceConfig,
                  device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Per-slice 2-D detections of one volume, in the cache frame.

    ``slices``: (S, H, W) in [0, 1] at the model's image size (numpy, tensor or a lazy source such as
    :class:`CacheVolume` or predict's ``ResizedVolume``). It is read only by ranges ``slices[start:stop]`` of at
    most ``config.batch_size`` slices (fewer on the CPU, see :func:`forward_batch_size`), in ascending order, and
    no batch is kept after its pass, so a lazy source never has the whole volume in memory. Slices go through
    ``model.predict`` a batch at a time, skipping ``config.skip_edge_slices`` at each end (see
    :func:`slice_range`). A 2.5-D model (``model.config.input_slices`` > 1) gets each slice with its neighbours as
    channels, clamped at the volume's ends; the source is then read once over :func:`read_range`. Returns
    ``slice_index`` (n,) int64, ``boxes`` (n, 4) float32 xyxy in the cache frame (pixels of ``slices``) and
    ``scores`` (n,) float32; the same for any batch size.
    """
    shape = tuple(slices.shape)
    if len(shape) != 3:
        raise ValueError(f"slices must be (S, H, W), got shape {shape}")
    expected = tuple(int(v) for v in model.image_size)
    if shape[1:] != expected:
        raise InputDataError(f"slices are {shape[1]}x{shape[2]} but the model expects {expected[0]}x{expected[1]} "
                             "(height x width); resize them first")
    device = torch.device(device)
    model.eval()
    wanted = slice_range(shape[0], config.skip_edge_slices)
    step = forward_batch_size(config.batch_size, expected, device)
    radius = input_radius(model)
    windows = _Windows(slices, shape[0], read_range(shape[0], config.skip_edge_slices, radius), radius) if radius else None
    indices, boxes, scores = [], [], []
    for start in range(wanted.start, wanted.stop, step):
        stop = min(start + step, wanted.stop)
        batch = slices[start:stop] if windows is None else windows.take(start, stop)
        batch = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
        batch = batch.to(device=device, dtype=torch.float32, non_blocking=True)
        batch = batch.unsqueeze(1) if batch.ndim == 3 else batch
        outputs = detections_as_numpy(model.predict(batch, flip=config.flip_tta))
        del batch  # the next batch is read before this name is rebound: do not hold two at once
        for offset, output in enumerate(outputs):
            count = len(output["scores"])
            if count == 0:
                continue
            indices.append(np.full(count, start + offset, dtype=np.int64))
            boxes.append(output["boxes"].reshape(-1, 4))
            scores.append(output["scores"].reshape(-1))
    if not indices:
        return _empty_detections()
    return {"slice_index": np.concatenate(indices), "boxes": np.concatenate(boxes),
            "scores": np.concatenate(scores)}


def window_slices(num_slices: int, config: InferenceConfig) -> int:
    """L, the slice count the volume-NMS window is a fraction of: the volume's, or (``nms_window_slices``
    "detected") the number that went through the detector, as the reference computes it: with its 4 edge slices
    skipped at each end, ``depth = int((n - 8) / 4)``. Window positions are slice numbers either way."""
    if config.nms_window_slices == "detected":
        return len(slice_range(int(num_slices), config.skip_edge_slices))
    return int(num_slices)


def top_volume_nms(slice_index: np.ndarray, boxes: np.ndarray, scores: np.ndarray, num_slices: int,
                   config: InferenceConfig) -> np.ndarray:
    """:func:`volume_nms` restricted to the best ``config.max_boxes_per_volume`` survivors, computed from the
    highest-scoring detections only (the same indices as running it on all of them).

    In the reference's volume NMS a box is removed only by a *higher*-scoring overlapping box in its window, so
    whether a box survives never depends on lower-scoring boxes. Running it on every box scoring at least some
    s (ties included) therefore decides those boxes exactly; when that yields enough survivors, the lower boxes
    (which would rank after all of them) cannot enter the top. The candidate set grows 4x until it does.
    """

    limit = int(config.max_boxes_per_volume)
    num_slices = window_slices(num_slices, config)
    nms = {"iou_threshold": config.nms_iou, "min_score": config.nms_min_score,
           "window_fraction": config.nms_window_fraction, "max_boxes": limit}
    count = len(scores)
    size = 4 * limit
    while size < count:
        floor = np.partition(scores, count - size)[count - size]  # the size-th highest score
        subset = np.flatnonzero(scores >= floor)  # ties included, input order kept for volume_nms's tie-break
        keep = np.asarray(volume_nms(slice_index[subset], boxes[subset], scores[subset], num_slices, **nms),
                          dtype=np.int64).reshape(-1)
        if len(keep) >= limit:
            return subset[keep]
        size *= 4
    return np.asarray(volume_nms(slice_index, boxes, scores, num_slices, **nms), dtype=np.int64).reshape(-1)


def detections_to_dbtex(detections: dict[str, np.ndarray], *, scale_y: float, scale_x: float, num_slices: int,
                        config: InferenceConfig, offset_y: float = 0.0, offset_x: float = 0.0) -> dict[str, np.ndarray]:
    """Volume NMS over per-slice detections, then the survivors as DBTex rows in the official frame.

    Volume NMS (reference semantics, ``config.nms_*``) runs on cache-frame boxes: IoU is unchanged by the
    per-axis scaling back to the official frame, so the choice of frame does not change which boxes survive.
    ``scale_*``, ``offset_*``: the volume's framing (``cache_to_official``).
    """
    keep = top_volume_nms(detections["slice_index"], detections["boxes"], detections["scores"], int(num_slices),
                          config)
    xywh = cache_to_official(detections["boxes"][keep], scale_y, scale_x, offset_y, offset_x)
    return {
        "X": xywh[:, 0], "Width": xywh[:, 2], "Y": xywh[:, 1], "Height": xywh[:, 3],
        "Z": detections["slice_index"][keep].astype(np.int64),
        "Depth": np.zeros(len(keep), dtype=np.int64),
        "Score": detections["scores"][keep].astype(np.float64),
    }


def volume_predictions(model, slices, *, scale_y: float, scale_x: float, num_slices: int | None = None,
                       config: InferenceConfig, device: torch.device | str = "cpu", offset_y: float = 0.0,
                       offset_x: float = 0.0) -> dict[str, np.ndarray]:
    """One volume's DBTex rows: detect on every slice -> volume NMS -> official frame at full resolution.

    ``scale_y``, ``scale_x`` = cache pixels per official pixel, ``offset_y``, ``offset_x`` = the official pixel at
    the cache origin (as stored in the cache, :meth:`SliceCache.mapping`). ``num_slices`` (the
    volume's slice count, L of the NMS window) defaults to ``len(slices)``. Returns columns ``X, Width, Y,
    Height`` (float64, top-left + size), ``Z`` (slice), ``Depth`` (0), ``Score``, in descending score order.
    """
    detections = detect_volume(model, slices, config=config, device=device)
    return detections_to_dbtex(detections, scale_y=scale_y, scale_x=scale_x, offset_y=offset_y, offset_x=offset_x,
                               num_slices=int(num_slices if num_slices is not None else slices.shape[0]),
                               config=config)


def empty_dbtex() -> dict[str, np.ndarray]:
    table: dict[str, np.ndarray] = {name: np.zeros(0, dtype=object) for name in DBTEX_COLUMNS[:3]}
    table.update({name: np.zeros(0, dtype=np.float64) for name in _NUMERIC_COLUMNS})
    table["Z"] = table["Z"].astype(np.int64)
    table["Depth"] = table["Depth"].astype(np.int64)
    return table


def concat_dbtex(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return empty_dbtex()
    return {name: np.concatenate([part[name] for part in parts]) for name in DBTEX_COLUMNS}


def with_keys(rows: dict[str, np.ndarray], patient_id: str, study_uid: str, view: str) -> dict[str, np.ndarray]:
    """Prefix a volume's rows with its key columns, in DBTex column order."""
    count = len(rows["Score"])
    keyed = {"PatientID": np.full(count, patient_id, dtype=object), "StudyUID": np.full(count, study_uid, dtype=object),
             "View": np.full(count, view, dtype=object)}
    keyed.update({name: rows[name] for name in _NUMERIC_COLUMNS})
    return {name: keyed[name] for name in DBTEX_COLUMNS}


class _SliceRows(torch.utils.data.Dataset):
    """Cached slices by row, float16 as stored (half the bytes between processes); opens its own HDF5 handle in
    each worker process (see :func:`_own_handle`)."""

    def __init__(self, cache, rows: np.ndarray):
        self.cache, self.rows = cache, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.cache.images_f16(int(self.rows[index])))


def _own_handle(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a handle inherited through ``fork`` stays the parent's; this worker opens
    its own on first read."""
    dataset = torch.utils.data.get_worker_info().dataset
    dataset.cache = dataset.cache.detached()


class _SliceStream:
    """The slices of ``rows`` in order, read and decompressed ahead by ``num_workers`` processes."""

    def __init__(self, cache, rows: np.ndarray, num_workers: int):
        loader = torch.utils.data.DataLoader(_SliceRows(cache, rows), batch_size=None, num_workers=num_workers,
                                             worker_init_fn=_own_handle, prefetch_factor=8)
        self._slices = iter(loader)

    def take(self, count: int) -> np.ndarray:
        return np.stack([next(self._slices).numpy() for _ in range(count)]).astype(np.float32)


class StreamVolume:
    """One volume of a :class:`_SliceStream`: a :class:`SliceSource` for :func:`detect_volume`, which reads its
    ranges in ascending order, exactly the slices the stream was built with."""

    def __init__(self, stream: _SliceStream, shape: tuple[int, int, int], wanted: range):
        self.stream, self.shape, self._next = stream, shape, wanted.start

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(self.shape[0])
        if start != self._next:
            raise RuntimeError(f"slices {start}:{stop} asked for out of order (next is {self._next})")
        self._next = stop
        return self.stream.take(stop - start)


def _check_whole_volumes(cache, split: str, volumes: list[int]) -> None:
    """Val/test volumes hold all their slices in the cache (contiguous, in order); a volume that does not (the
    training split keeps only training samples) cannot be inferred as a volume."""
    vols = cache.volumes
    for volume in volumes:
        num_slices = int(vols["num_slices"][volume])
        rows = cache.volume_slice_rows(volume)
        if rows.stop - rows.start != num_slices or not np.array_equal(cache.slice_index[rows], np.arange(num_slices)):
            raise UsageError(f"split {split!r} volume {vols['patient_id'][volume]}/{vols['view'][volume]} "
                             f"stores {rows.stop - rows.start} of its {num_slices} slices; volume inference needs "
                             "the val or test split, which stores every slice", path=cache.path)


def detect_cache(model, cache, split: str, config: InferenceConfig, device: torch.device | str = "cpu",
                 progress: bool = True) -> dict[str, np.ndarray]:
    """DBTex prediction columns (:data:`DBTEX_COLUMNS`, one row per box) for every volume of ``split`` in a DBT
    :class:`SliceCache`, volume by volume (:func:`volume_predictions`).

    Every volume must hold all its slices (the val or test split; else a usage error). With
    ``config.num_workers`` (auto: on a GPU) the slices are read and decompressed ahead by that many processes,
    in the order the detector takes them; otherwise the main process reads each batch when it is needed.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    volumes = [int(v) for v in cache.volumes_in_split(split)]
    vols = cache.volumes
    _check_whole_volumes(cache, split, volumes)
    device = torch.device(device)
    workers = loader_workers(config.num_workers, device.type)
    radius = input_radius(model)
    wanted = {v: read_range(int(vols["num_slices"][v]), config.skip_edge_slices, radius) for v in volumes}
    stream = None
    if workers > 0 and volumes:
        rows = np.concatenate([np.arange(cache.volume_slice_rows(v).start, cache.volume_slice_rows(v).stop)[wanted[v]]
                               for v in volumes])
        stream = _SliceStream(cache, rows, workers)
    parts: list[dict[str, np.ndarray]] = []
    model.to(device)
    with Progress(TextColumn("[bold]inference[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), disable=not progress, transient=True) as bar:
        task = bar.add_task(split, total=len(volumes))
        for volume in volumes:
            num_slices = int(vols["num_slices"][volume])
            source = CacheVolume(cache, volume)
            if stream is not None:
                source = StreamVolume(stream, source.shape, wanted[volume])
            rows = volume_predictions(model, source, **cache.mapping(volume), num_slices=num_slices,
                                      config=config, device=device)
            parts.append(with_keys(rows, str(vols["patient_id"][volume]), str(vols["study_uid"][volume]),
                                   str(vols["view"][volume])))
            bar.advance(task)
    return concat_dbtex(parts)
