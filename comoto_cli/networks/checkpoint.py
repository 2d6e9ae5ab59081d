"""Checkpoints that load without executing code: tensors and plain Python only, read with ``weights_only=True``.

Layout of a checkpoint (a ``torch.save`` dict):

``format`` ("comoto-checkpoint"), ``format_version`` (1), ``model_state`` (the detector's state dict),
``model_config`` (canonical JSON string of :class:`ModelConfig`), ``image_size`` ([height, width]), ``geometry``
(the framing of its training images, ``preprocess.geometry``; absent in older checkpoints: "stretch"), ``metadata``
(plain dict: epoch, metrics, command config JSON ...), and optionally ``optimizer_state``, ``scheduler_state``,
``extra_states`` (name -> state dict, e.g. the LsKD projection), ``rng_state`` (:func:`capture_rng_state`).

``torch.load(weights_only=True)`` refuses any pickle that names a global outside PyTorch's allow-list (a
``__reduce__`` that calls ``os.system`` and the like), before anything runs; such files are reported, never loaded.
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from comoto_cli.config import ModelConfig, config_json
from comoto_cli.errors import CheckpointError, ComotoError
from comoto_cli.networks.detector import build_detector
from comoto_cli.utils.atomic import atomic_path
from comoto_cli.utils.torch_files import first_line as _first_line
from comoto_cli.utils.torch_files import safe_torch_load

FORMAT_NAME = "comoto-checkpoint"
FORMAT_VERSION = 1

# ModelConfig fields that change the network's parameters or what they mean; the others (thresholds, the
# initial weights file) may differ between training and use.
ARCHITECTURE_FIELDS = (
    "backbone",
    "width",
    "fpn_channels",
    "returned_layers",
    "anchor_base_sizes",
    "anchor_aspect_ratios",
    "distill_feature",
)

_REQUIRED_KEYS = ("model_state", "model_config", "image_size")


# ---------------------------------------------------------------------------------------------- reading
def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint safely. Returns the stored dict with ``model_config`` parsed into a :class:`ModelConfig`
    (the stored JSON string stays under ``model_config_json``) and ``image_size`` as a (height, width) tuple."""
    path = Path(path)
    payload = safe_torch_load(path, map_location)
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"not a comoto checkpoint (holds a {type(payload).__name__}, not a dict)", path=path
        )
    missing = [key for key in _REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"not a comoto checkpoint: missing {', '.join(missing)}", path=path)
    version = payload.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {version} is newer than this program reads ({FORMAT_VERSION})",
            path=path,
        )
    if not isinstance(payload["model_state"], dict):
        raise CheckpointError("model_state is not a state dict", path=path)
    config_text = payload["model_config"]
    try:
        if not isinstance(config_text, str):
            raise TypeError
        model_config = ModelConfig.model_validate_json(config_text)
    except (ValidationError, TypeError, ValueError) as exc:
        # Name the field: a backbone that is not registered here (a plug-in not imported) must be told apart.
        first = exc.errors()[0] if isinstance(exc, ValidationError) and exc.errors() else None
        detail = f" ({'.'.join(map(str, first['loc']))}: {first['msg']})" if first else ""
        raise CheckpointError(f"model_config is not a valid model configuration{detail}", path=path) from None
    image_size = payload["image_size"]
    if (
        not isinstance(image_size, (list, tuple))
        or len(image_size) != 2
        or not all(isinstance(side, int) and side > 0 for side in image_size)
    ):
        raise CheckpointError(f"image_size must be [height, width], got {image_size!r}", path=path)
    result = dict(payload)
    result["model_config_json"] = config_text
    result["model_config"] = model_config
    result["image_size"] = (int(image_size[0]), int(image_size[1]))
    geometry = payload.get("geometry", "stretch")
    if not isinstance(geometry, str) or not geometry:
        raise CheckpointError(f"geometry must be a framing name, got {geometry!r}", path=path)
    result["geometry"] = geometry
    result.setdefault("metadata", {})
    return result


def architecture_differences(stored: ModelConfig, expected: ModelConfig) -> list[str]:
    """'field: checkpoint X, configured Y' for each architecture field that differs."""
    differences = []
    for field in ARCHITECTURE_FIELDS:
        old, new = getattr(stored, field), getattr(expected, field)
        if old != new:
            differences.append(f"model.{field}: checkpoint {old!r}, configured {new!r}")
    return differences


def load_detector(path: Path, *, expected: ModelConfig | None = None, map_location: Any = "cpu"):
    """Rebuild the detector stored in ``path`` and load its weights.

    With ``expected``, the architecture fields must match (else :class:`CheckpointError` naming them) and the
    detector uses ``expected``'s inference settings (thresholds); otherwise the stored config. The initial
    ``weights`` file of the config is not read again. Returns (detector, checkpoint dict of :func:`load_checkpoint`).
    """

    path = Path(path)
    checkpoint = load_checkpoint(path, map_location=map_location)
    stored: ModelConfig = checkpoint["model_config"]
    config = stored
    if expected is not None:
        differences = architecture_differences(stored, expected)
        if differences:
            raise CheckpointError(
                "checkpoint was made with another model: " + "; ".join(differences), path=path
            )
        config = expected
    try:
        detector = build_detector(config, checkpoint["image_size"], load_weights=False)
    except ComotoError as exc:
        raise CheckpointError(f"cannot rebuild the stored model: {exc.reason}", path=path) from None
    detector.geometry = checkpoint["geometry"]
    state = checkpoint["model_state"]
    own = detector.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
        for key in own
        if key in state and isinstance(state[key], torch.Tensor) and state[key].shape != own[key].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            parts.append(f"{len(mismatched)} with another shape (e.g. {'; '.join(mismatched[:3])})")
        raise CheckpointError(
            "model weights do not fit the stored model config: " + ", ".join(parts), path=path
        )
    try:
        detector.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"cannot load model weights ({_first_line(exc)})", path=path) from None
    if isinstance(map_location, (str, torch.device)):
        detector.to(map_location)
    return detector, checkpoint


# ---------------------------------------------------------------------------------------------- writing
def _plain(value: Any, where: str) -> Any:
    """Tensors and plain Python only (what ``weights_only`` loading accepts); numpy values become tensors or
    Python numbers, paths become strings."""
    if value is None or isinstance(
        value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device, torch.Size)
    ):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        items = [(key, _plain(item, f"{where}.{key}")) for key, item in value.items()]
        for key, _ in items:
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"checkpoint {where}: key {key!r} of type {type(key).__name__} is not plain")
        return OrderedDict(items) if isinstance(value, OrderedDict) else dict(items)
    if isinstance(value, list):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_plain(item, f"{where}[{i}]") for i, item in enumerate(value))
    raise TypeError(
        f"checkpoint {where}: {type(value).__module__}.{type(value).__name__} cannot be stored "
        "(only tensors and plain Python values load safely)"
    )


def save_checkpoint(
    path: Path,
    *,
    model_state: dict,
    model_config: ModelConfig,
    image_size: tuple[int, int],
    metadata: dict,
    optimizer_state: dict | None = None,
    scheduler_state: dict | None = None,
    extra_states: dict[str, dict] | None = None,
    rng_state: dict | None = None,
    geometry: str = "stretch",
) -> None:
    """Write a checkpoint atomically (temporary file + rename: a crash never leaves a partial file)."""
    payload: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_state": _plain(model_state, "model_state"),
        "model_config": config_json(model_config),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "geometry": str(geometry),
        "metadata": _plain(json.loads(json.dumps(metadata, default=_json_default)), "metadata"),
    }
    if optimizer_state is not None:
        payload["optimizer_state"] = _plain(optimizer_state, "optimizer_state")
    if scheduler_state is not None:
        payload["scheduler_state"] = _plain(scheduler_state, "scheduler_state")
    if extra_states is not None:
        payload["extra_states"] = _plain(extra_states, "extra_states")
    if rng_state is not None:
        payload["rng_state"] = _plain(rng_state, "rng_state")
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)


def _json_default(value: Any) -> Any:
    # Metadata is JSON-like (epochs, metrics, config dumps); numpy numbers and paths are common and harmless.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON-like")


# ---------------------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """Torch CPU (+ every CUDA device), numpy's global and Python's ``random`` state, weights_only-safe."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "algorithm": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_version), "state": [int(v) for v in py_state], "gauss_next": py_gauss},
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored when the same number of devices is present."""
    try:
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
        cuda_states = state.get("cuda") or []
        if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to("cpu", torch.uint8) for s in cuda_states])
        numpy_state = state["numpy"]
        np.random.set_state(
            (
                numpy_state["algorithm"],
                numpy_state["keys"].cpu().numpy().astype(np.uint32),
                int(numpy_state["pos"]),
                int(numpy_state["has_gauss"]),
                float(numpy_state["cached_gaussian"]),
            )
        )
        python_state = state["python"]
        random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss_next"]))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(
            f"invalid random-number-generator state in checkpoint ({_first_line(exc)})"
        ) from None


__all__ = [
    "ARCHITECTURE_FIELDS",
    "architecture_differences",
    "capture_rng_state",
    "load_checkpoint",
    "load_detector",
    "restore_rng_state",
    "safe_torch_load",
    "save_checkpoint",
]
