"""``comoto cache merge OUT SHARD...``: join the shard caches of ``comoto preprocess ... --shard K/N``.

Each shard is a normal cache of the volumes at plan positions i with ``i % N == K - 1`` (the plan and the patient
split are made over all inputs in every shard), plus the root attribute ``shard`` ("K/N") and
``/shard/plan_index`` (each stored volume's position in the full plan). The merge checks that the shards belong
together (the same N, each K once, the same config, format, modality, image size, data root and plan size), then
re-adds every volume in plan order through :class:`CacheWriter`, copying the compressed image chunks as they are
stored (no decoding). The result has no shard attribute or group, so its
:func:`comoto_cli.preprocess.summary.cache_content_hash` equals that of a single ``comoto preprocess`` run.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from comoto_cli.cache.h5cache import (
    FORMAT_VERSION,
    WORK_KEY,
    CacheWriter,
    SliceCache,
    StoredSlices,
    VolumeRecord,
    level_layout,
    stored_layout,
)
from comoto_cli.cache.shards import SHARD_ATTR, SHARD_GROUP, parse_shard
from comoto_cli.errors import ComotoError, InputDataError, UsageError
from comoto_cli.preprocess.pipeline import FINGERPRINT_ATTR, _skip_key
from comoto_cli.preprocess.summary import _content_config
from comoto_cli.utils.atomic import atomic_path

# Root attributes every shard of one run shares, with the words an error uses for them.
_SHARED = (("format_version", "cache format"), ("modality", "modality"), ("config_hash", "preprocess config"),
           ("image_height", "image height"), ("image_width", "image width"), ("source_root", "data root"))


@dataclass
class _Shard:
    path: Path
    index: int  # K, 1-based
    count: int  # N
    attrs: dict
    plan_index: np.ndarray
    plan_size: int
    compression: tuple  # h5cache.stored_layout of its images
    cache: SliceCache

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _open_shard(path: Path) -> _Shard:
    path = Path(path)
    if not path.is_file():
        raise InputDataError("shard file not found" if not path.exists() else "not a file", path=path)
    try:
        with h5py.File(path, "r") as handle:
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in handle.attrs.items()}
            version = int(attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise InputDataError(f"cache format version {version}, this comoto reads {FORMAT_VERSION}", path=path)
            if SHARD_ATTR not in attrs:
                raise InputDataError("not a shard: no `shard` attribute (made without `--shard K/N`?)", path=path)
            if SHARD_GROUP not in handle or "plan_index" not in handle[SHARD_GROUP]:
                raise InputDataError("shard without /shard/plan_index (not written by `comoto preprocess`)",
                                     path=path)
            plan_index = np.asarray(handle[SHARD_GROUP]["plan_index"][()], dtype=np.int64)
            plan_size = int(handle[SHARD_GROUP].attrs.get("plan_size", -1))
            compression = stored_layout(handle["slices/images"])
            if compression != level_layout(int(compression[2] or 0), *compression[0][1:]):
                raise InputDataError(f"images stored as {compression[1:]}, a layout this comoto does not write (gzip "
                                     "at level 0 is from before level 0 meant uncompressed); preprocess the shards "
                                     "again", path=path)
    except ComotoError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise InputDataError(f"not a readable comoto cache ({exc})", path=path) from None
    try:
        index, count = parse_shard(_text(attrs[SHARD_ATTR]))
    except UsageError:
        raise InputDataError(f"bad shard attribute {_text(attrs[SHARD_ATTR])!r}", path=path) from None
    cache = SliceCache(path)
    if len(plan_index) != cache.num_volumes:
        raise InputDataError(f"/shard/plan_index has {len(plan_index)} rows for {cache.num_volumes} volumes",
                             path=path)
    if (len(plan_index) and (np.any(plan_index % count != index - 1) or np.any(np.diff(plan_index) <= 0)
                             or plan_index[0] < 0 or (plan_size >= 0 and plan_index[-1] >= plan_size))):
        raise InputDataError(f"/shard/plan_index does not fit shard {index}/{count}", path=path)
    return _Shard(path, index, count, attrs, plan_index, plan_size, compression, cache)


def _check_together(shards: list[_Shard]) -> list[_Shard]:
    """The shards ordered by K, or a one-line error naming the file that does not belong."""

    first = shards[0]
    for shard in shards[1:]:
        if shard.count != first.count:
            raise InputDataError(f"shard {shard.label} does not belong with {first.path} (shard {first.label}): "
                                 "a different number of shards", path=shard.path)
        for key, what in _SHARED:
            mine, theirs = first.attrs.get(key), shard.attrs.get(key)
            if _text(mine) != _text(theirs):
                raise InputDataError(f"made with a different {what} than {first.path} ({_text(theirs)!r} vs "
                                     f"{_text(mine)!r})", path=shard.path)
        if _content_config(_text(shard.attrs.get("config_json", ""))) != \
                _content_config(_text(first.attrs.get("config_json", ""))):
            raise InputDataError(f"made with a different preprocess config than {first.path}", path=shard.path)
        if shard.plan_size != first.plan_size:
            raise InputDataError(f"made from different inputs than {first.path} (a plan of {shard.plan_size} "
                                 f"volumes vs {first.plan_size}); rerun every shard on the same data",
                                 path=shard.path)
        if shard.compression != first.compression:
            raise InputDataError(f"images stored with another compression than {first.path} ({shard.compression[1:]} "
                                 f"vs {first.compression[1:]})", path=shard.path)
    by_index: dict[int, _Shard] = {}
    for shard in shards:
        if shard.index in by_index:
            raise InputDataError(f"shard {shard.label} given twice (also {by_index[shard.index].path})",
                                 path=shard.path)
        by_index[shard.index] = shard
    missing = [f"{k}/{first.count}" for k in range(1, first.count + 1) if k not in by_index]
    if missing:
        given = ", ".join(s.label for s in sorted(shards, key=lambda s: s.index))
        raise InputDataError(f"shard {', '.join(missing)} missing: give all {first.count} shards of the run "
                             f"(given {given})")
    return [by_index[k] for k in range(1, first.count + 1)]


def _merged_skipped(shards: list[_Shard]) -> list[dict]:
    """Every shard lists the inputs skipped before the split (they are the same in each); the ones skipped while
    decoding are in one shard only. Each distinct entry is kept as often as the shard that lists it most."""

    most: dict[str, int] = {}
    first_seen: dict[str, dict] = {}
    for shard in shards:
        counts = Counter()
        for entry in shard.cache.skipped:
            key = json.dumps(entry, sort_keys=True, default=str)
            counts[key] += 1
            first_seen.setdefault(key, entry)
        for key, count in counts.items():
            most[key] = max(most.get(key, 0), count)
    merged = [first_seen[key] for key, count in most.items() for _ in range(count)]
    return sorted(merged, key=_skip_key)


def _volume(cache: SliceCache, v: int, lesion_start: int):
    """Volume ``v`` of a cache as the arguments of :meth:`CacheWriter.add_volume` (images aside) and its rows."""
    volumes, lesions = cache.volumes, cache.lesions
    lesion_rows = np.flatnonzero(np.asarray(lesions["volume"]) == v)
    record = VolumeRecord(
        patient_id=str(volumes["patient_id"][v]), study_uid=str(volumes["study_uid"][v]), view=str(volumes["view"][v]),
        split=str(volumes["split"][v]), source=str(volumes["source"][v]),
        num_slices=int(volumes["num_slices"][v]), original_height=int(volumes["original_height"][v]),
        original_width=int(volumes["original_width"][v]), scale_y=float(volumes["scale_y"][v]),
        scale_x=float(volumes["scale_x"][v]), flipped=bool(volumes["flipped"][v]),
        offset_y=float(volumes["offset_y"][v]), offset_x=float(volumes["offset_x"][v]),
        content_height=int(volumes["content_height"][v]), content_width=int(volumes["content_width"][v]),
        volume_slices=int(volumes["volume_slices"][v]), label=str(volumes["label"][v]),
        lesions=[(int(lesions["slice"][r]), float(lesions["x"][r]), float(lesions["y"][r]),
                  float(lesions["width"][r]), float(lesions["height"][r])) for r in lesion_rows],
        lesion_classes=[str(lesions["class"][r]) for r in lesion_rows],
        work_key=str(volumes[WORK_KEY][v]) if WORK_KEY in volumes else "",
    )
    rows = cache.volume_slice_rows(v)
    slice_indices, boxes, lesion_ids = [], [], []
    for row in range(rows.start, rows.stop):
        if int(cache.slice_volume[row]) != v:
            raise InputDataError(f"slice row {row} does not belong to volume {v}", path=cache.path)
        start, count = int(cache.box_start[row]), int(cache.box_count[row])
        slice_indices.append(int(cache.slice_index[row]))
        boxes.append(np.asarray(cache.all_boxes[start:start + count], dtype=np.float32).reshape(-1, 4))
        # Stored lesion ids are rows of the shard's /lesions; the writer wants them local to the volume.
        lesion_ids.append(np.asarray(cache.box_lesion[start:start + count], dtype=np.int64) - lesion_start)
    return record, slice_indices, rows, boxes, lesion_ids, cache.slice_context[rows].tolist()


def _progress(enabled: bool, console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not enabled, transient=False)


def merge_caches(out: str | Path, shards: Sequence[str | Path], *, progress: bool = True, console=None) -> dict:
    """Join the shard caches ``shards`` (all N shards of one ``preprocess --shard K/N`` run, in any order) into the
    cache ``out``, written atomically. Returns ``out``, ``shards``, ``volumes``, ``slices``, ``skipped`` (the merged
    list), ``fingerprint`` (whether the shards' input fingerprints agreed and were kept) and ``seconds``."""
    from rich.console import Console


    started = time.perf_counter()
    console = console or Console(stderr=True, highlight=False)
    out = Path(out)
    paths = [Path(p) for p in shards]
    if not paths:
        raise UsageError("give the shard files to merge")
    if out.exists() and out.is_dir():
        raise InputDataError("output is a folder; give a file name such as dbt.h5", path=out)
    for path in paths:
        if path.exists() and out.exists() and path.resolve() == out.resolve():
            raise UsageError("the output is one of the shards; give a new file name", path=out)
    opened = _check_together([_open_shard(path) for path in paths])
    first = opened[0]
    entries = sorted((int(position), number, v) for number, shard in enumerate(opened)
                     for v, position in enumerate(shard.plan_index))
    positions = [e[0] for e in entries]
    if len(set(positions)) != len(positions):  # cannot happen for shards that passed the checks above
        raise InputDataError("two shards hold the same plan position")
    if not entries:
        raise InputDataError(f"the {len(opened)} shards hold no volumes; nothing to cache", path=first.path)
    fingerprints = {_text(s.attrs[FINGERPRINT_ATTR]) if FINGERPRINT_ATTR in s.attrs else None for s in opened}
    fingerprint = next(iter(fingerprints)) if len(fingerprints) == 1 else None
    skipped = _merged_skipped(opened)
    lesion_starts = []
    for shard in opened:
        counts = np.bincount(np.asarray(shard.cache.lesions["volume"], dtype=np.int64),
                             minlength=shard.cache.num_volumes)
        lesion_starts.append(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    attrs = first.attrs
    report = {"out": str(out), "shards": len(opened), "volumes": 0, "slices": 0, "skipped": skipped,
              "fingerprint": fingerprint is not None}
    handles = [h5py.File(shard.path, "r") for shard in opened]
    try:
        with atomic_path(out) as temporary:
            writer = CacheWriter(temporary, modality=_text(attrs["modality"]), image_height=int(attrs["image_height"]),
                                 image_width=int(attrs["image_width"]), config_json=_text(attrs["config_json"]),
                                 config_hash=_text(attrs["config_hash"]), source_root=_text(attrs["source_root"]),
                                 compression_level=int(first.compression[2] or 0))
            try:
                with _progress(progress, console) as bar:
                    task = bar.add_task("merge shards", total=len(entries))
                    for _, number, v in entries:
                        shard = opened[number]
                        record, indices, rows, boxes, lesion_ids, context = _volume(shard.cache, v,
                                                                                    int(lesion_starts[number][v]))
                        # Copied as stored chunks: the pixels are never decoded or recompressed.
                        images = StoredSlices(handles[number]["slices/images"], rows)
                        writer.add_volume(record, indices, images, boxes, lesion_ids, context)
                        report["volumes"] += 1
                        report["slices"] += len(indices)
                        bar.advance(task)
                writer.set_skipped(skipped)
                if fingerprint is not None:
                    writer.file.attrs[FINGERPRINT_ATTR] = fingerprint
                writer.close()
            except BaseException:
                writer.abort()
                raise
    finally:
        for handle in handles:
            handle.close()
        for shard in opened:
            shard.cache.close()
    report["seconds"] = time.perf_counter() - started
    return report
