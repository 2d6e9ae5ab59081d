"""Reading PyTorch files without executing code: ``torch.load(weights_only=True)`` and one-line errors.

``weights_only=True`` refuses any pickle that names a global outside PyTorch's allow-list (a ``__reduce__`` that
calls ``os.system`` and the like) before anything runs; such files are reported, never loaded. Used for
checkpoints and for user-supplied initial weights.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from comoto_cli.errors import CheckpointError


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with one-line :class:`CheckpointError` messages."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("file not found", path=path)
    if not path.is_file():
        raise CheckpointError("not a file", path=path)
    try:
        with warnings.catch_warnings():
            # A foreign pickle protocol is reported below as a refusal or corruption; the warning adds nothing.
            warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        # The weights-only unpickler names the blocked GLOBAL (a function or class to import) it refused.
        if "GLOBAL" in message or "global" in message.lower().replace("weights only", ""):
            raise CheckpointError(
                "refusing to load this checkpoint: it needs unpickling of arbitrary objects (only tensors and "
                "plain Python values are accepted)",
                path=path,
            ) from None
        detail = message.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        detail_text = detail[0] if detail and "WeightsUnpickler" in message else first_line(exc)
        raise CheckpointError(f"corrupt or not a PyTorch checkpoint ({detail_text})", path=path) from None
    except (
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
        AttributeError,
        ImportError,
        KeyError,
        IndexError,
    ) as exc:
        raise CheckpointError(
            f"corrupt or not a PyTorch checkpoint ({first_line(exc)})", path=path
        ) from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
