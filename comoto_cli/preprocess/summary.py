"""What is in a slice cache (``comoto cache info``) and a hash of its content (crash-safety checks).

HDF5 files holding the same data can differ byte for byte (allocation order, free space after a resize), so
equality of two caches is judged by :func:`cache_content_hash` over their datasets and attributes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from comoto_cli.cache.h5cache import SliceCache
from comoto_cli.errors import InputDataError

# Attributes that may differ between two runs producing the same content: the input fingerprint holds file
# mtimes (touching an input changes it, not the content). The cache holds no timestamps; the other names are
# listed so that a future one is excluded deliberately.
TIME_DEPENDENT_ATTRS: frozenset[str] = frozenset({"input_fingerprint", "created", "created_at", "elapsed_seconds"})
# Datasets left out for the same reason: each volume's work key holds its DICOM's mtime.
TIME_DEPENDENT_DATASETS: frozenset[str] = frozenset({"volumes/work_key"})


# Preprocess settings that change only the speed: the stored config keeps them (provenance), the hash does not.
SPEED_ONLY_SETTINGS: frozenset[str] = frozenset({"workers", "decoder"})


def _content_config(config_json: str) -> str:
    """The stored preprocess config without its speed-only settings, as canonical JSON."""
    try:
        settings = json.loads(config_json)
    except ValueError:
        return config_json
    if not isinstance(settings, dict):
        return config_json
    return json.dumps({k: v for k, v in settings.items() if k not in SPEED_ONLY_SETTINGS}, sort_keys=True)


def _attr_value(value) -> object:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def cache_content_hash(path: str | Path) -> str:
    """SHA-256 over every dataset (name, dtype, shape, values) and the deterministic attributes, in sorted
    name order. Two caches with equal hashes hold the same images, boxes, tables and settings."""
    import h5py

    path = Path(path)
    digest = hashlib.sha256()
    try:
        with h5py.File(path, "r") as handle:
            def update_attrs(name: str, attrs) -> None:
                for key in sorted(attrs.keys()):
                    if key in TIME_DEPENDENT_ATTRS:
                        continue
                    value = _attr_value(attrs[key])
                    if name == "/" and key == "config_json" and isinstance(value, str):
                        value = _content_config(value)
                    digest.update(json.dumps([name, key, value], default=str).encode())

            update_attrs("/", handle.attrs)
            names: list[str] = []
            handle.visit(names.append)
            for name in sorted(names):
                if name in TIME_DEPENDENT_DATASETS:
                    continue
                item = handle[name]
                update_attrs(name, item.attrs)
                if not isinstance(item, h5py.Dataset):
                    digest.update(f"group:{name}".encode())
                    continue
                digest.update(f"dataset:{name}:{item.dtype.str}:{item.shape}".encode())
                if item.dtype.kind == "O" or h5py.check_string_dtype(item.dtype) is not None:
                    values = [v.decode() if isinstance(v, bytes) else str(v) for v in item.asstr()[()]]
                    digest.update(json.dumps(values).encode())
                elif item.ndim >= 3:
                    for index in range(item.shape[0]):  # one slice at a time: caches can be large
                        digest.update(np.ascontiguousarray(item[index]).tobytes())
                else:
                    digest.update(np.ascontiguousarray(item[()]).tobytes())
    except FileNotFoundError:
        raise InputDataError("cache file not found", path=path) from None
    except OSError as exc:
        raise InputDataError(f"not a readable HDF5 file ({exc})", path=path) from None
    return digest.hexdigest()


def cache_summary(path: str | Path) -> dict:
    """Counts and settings of a cache, per split: volumes (images for mammography), patients, stored slices (of
    them, context slices: 2.5-D neighbours, not samples), lesions, boxes, slices with boxes, volumes with lesions."""

    path = Path(path)
    cache = SliceCache(path)
    volumes = cache.volumes
    lesion_volume = np.asarray(cache.lesions["volume"], dtype=np.int64)
    box_count = np.asarray(cache.box_count, dtype=np.int64)
    slice_volume = np.asarray(cache.slice_volume, dtype=np.int64)
    splits: dict[str, dict] = {}
    names = [s for s in ("train", "val", "test") if s in set(volumes["split"])]
    names += sorted(set(volumes["split"]) - set(names))
    for split in names:
        rows = cache.volumes_in_split(split)
        in_split = np.isin(slice_volume, rows)
        lesions_in = np.isin(lesion_volume, rows)
        splits[split] = {
            "volumes": len(rows),
            "patients": len(set(volumes["patient_id"][rows])),
            "slices": int(in_split.sum()),
            "context_slices": int((in_split & cache.slice_context).sum()),
            "lesions": int(lesions_in.sum()),
            "boxes": int(box_count[in_split].sum()),
            "slices_with_boxes": int((box_count[in_split] > 0).sum()),
            "volumes_with_lesions": len(set(lesion_volume[lesions_in].tolist())),
        }
    total = {key: sum(s[key] for s in splits.values()) for key in
             ("volumes", "slices", "context_slices", "lesions", "boxes", "slices_with_boxes", "volumes_with_lesions")}
    total["patients"] = len(set(volumes["patient_id"]))
    attrs = cache.attrs
    return {
        "path": str(path),
        "modality": cache.modality,
        "format_version": int(attrs["format_version"]),
        "config_hash": str(attrs.get("config_hash", "")),
        "image_height": cache.image_height,
        "image_width": cache.image_width,
        "geometry": cache.geometry,
        "file_size_bytes": path.stat().st_size,
        "skipped": len(cache.skipped),
        "splits": splits,
        "total": total,
    }
