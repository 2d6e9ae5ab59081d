"""What this process may use of the machine: cores and free memory, as a scheduler or container limits them."""

from __future__ import annotations

import os
from pathlib import Path


def usable_cores() -> int:
    """Cores this process may run on (a SLURM allocation or taskset restricts them), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def available_memory_bytes() -> int | None:
    """Memory this process may still use: the kernel's MemAvailable, capped by a cgroup limit (a SLURM job, a
    container) when one is set. None where neither can be read."""
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 2**60:
            candidates.append(max(cap - used, 0))
    return min(candidates) if candidates else None


def loader_workers(value: int | str, device_type: str, loaders: int = 1) -> int:
    """DataLoader worker processes for one of ``loaders`` loaders feeding this process.

    An explicit count is kept. ``"auto"``: none on the CPU (the model's own threads use the cores, and reading a
    slice costs far less than a CPU step); on a GPU the cores of this process's share of the node (SLURM or
    torchrun start one process per GPU) less one for the main process, at most 8, split between the loaders.
    """
    if value != "auto":
        return int(value)
    if device_type != "cuda":
        return 0
    per_process = usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    total = min(8, max(0, per_process - 1))
    return max(1, total // max(1, loaders)) if total else 0


def pick_device():
    """The first CUDA device when there is one, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
