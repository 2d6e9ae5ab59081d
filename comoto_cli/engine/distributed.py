"""Distributed data parallel (DDP) plumbing for the trainer; a no-op in a single process.

Launch with ``torchrun --nproc_per_node N comoto train-teacher ...`` (or ``python -m torch.distributed.run``):
torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, which :func:`init_distributed`
reads. NCCL on GPUs, gloo on CPU. Rank 0 prints, validates and writes files; the others wait at barriers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(use_cuda: bool | None = None) -> DistEnv:
    """Read the torchrun environment; start the process group when WORLD_SIZE > 1.

    Returns the process's :class:`DistEnv`; its device is ``cuda:LOCAL_RANK`` when CUDA is available (or
    ``use_cuda`` says so), else the CPU. Calling it again after the group is up just describes it.
    """
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    world_size = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=30), device_id=device if use_cuda else None)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier(env: DistEnv) -> None:
    if env.enabled and is_initialized():
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def broadcast_object(obj, env: DistEnv, src: int = 0):
    """Rank ``src``'s Python object on every rank (validation metrics, stop decisions)."""
    if not (env.enabled and is_initialized()):
        return obj
    holder = [obj if env.rank == src else None]
    dist.broadcast_object_list(holder, src=src, device=env.device if env.device.type == "cuda" else None)
    return holder[0]


def reduce_mean(values: dict[str, float], counts: dict[str, int], env: DistEnv) -> dict[str, float]:
    """Per-rank sums (``values``) and sample counts -> global means, keyed alike. Keys present on some ranks
    only (a loss term that was off for all of one rank's batches) are averaged over the ranks that had them."""
    if not (env.enabled and is_initialized()):
        return {k: values[k] / counts[k] for k in values if counts.get(k)}
    gathered: list = [None] * env.world_size
    dist.all_gather_object(gathered, (values, counts))
    total: dict[str, float] = {}
    number: dict[str, int] = {}
    for part_values, part_counts in gathered:
        for key, value in part_values.items():
            total[key] = total.get(key, 0.0) + value
            number[key] = number.get(key, 0) + part_counts[key]
    return {k: total[k] / number[k] for k in total if number[k]}


def sum_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key's sum over every rank (a collective: every rank must call it); ``values`` alone without DDP."""
    if not is_initialized():
        return dict(values)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return {key: sum(part[key] for part in gathered) for key in values}


def cleanup(env: DistEnv) -> None:
    if env.enabled and is_initialized():
        dist.destroy_process_group()
