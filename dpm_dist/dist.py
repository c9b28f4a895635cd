"""The one place that reads the launcher's environment and talks to ``torch.distributed``.

Everything else receives a :class:`DistEnv` (rank, world size) as a value. Every helper here is the
identity when the world size is 1 or no process group is initialised, so a single CPU process runs
the same code paths as a multi-node job.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistEnv:
    """Rank layout of this process. ``DistEnv()`` is a single process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> "DistEnv":
        """Read torchrun / deepspeed launcher / Ray Train / Slurm variables (torchrun names win)."""
        env = os.environ

        def first(*names: str, default: int) -> int:
            for name in names:
                if name in env and env[name] != "":
                    return int(env[name])
            return default

        world = first("WORLD_SIZE", "SLURM_NTASKS", default=1)
        rank = first("RANK", "SLURM_PROCID", default=0)
        local_rank = first("LOCAL_RANK", "SLURM_LOCALID", default=0)
        local_world = first("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=world)
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world)


def device_for(env: DistEnv) -> torch.device:
    """The accelerator of this local rank, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group(env: DistEnv, *, timeout_s: float = 600.0) -> None:
    """Initialise the default process group once: NCCL on GPUs, gloo on CPUs.

    A single process gets a world of one over an in-memory store: DeepSpeed's engines expect a process group.
    The collective helpers below stay the identity at world size 1.
    """
    if tdist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device_for(env))
    timeout = datetime.timedelta(seconds=timeout_s)
    if not env.distributed:
        # An in-memory store: no port to pick (a free-port guess can be taken before it is bound, or an
        # inherited MASTER_PORT can point at another process's store).
        for name, value in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_WORLD_SIZE", 1)):
            os.environ.setdefault(name, str(value))
        tdist.init_process_group(backend=backend, store=tdist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    tdist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout)


def is_active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def barrier() -> None:
    if is_active():
        tdist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` on one process). Collective: all ranks call it."""
    if not is_active():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank. Collective."""
    if not is_active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it. Collective."""
    if is_active():
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_gather_varlen(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, allowing different lengths per rank.

    Pads to the longest length for the collective and strips the padding afterwards, so no sample is
    duplicated or dropped. Collective: all ranks call it, even with zero rows.
    """
    if not is_active():
        return tensor
    world = tdist.get_world_size()
    length = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    tdist.all_gather(lengths, length)
    sizes = [int(n.item()) for n in lengths]
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    tdist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


def destroy() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
