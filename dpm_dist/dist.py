"""The one place that reads the launcher's environment and talks to ``torch.distributed``.

Everything else receives a :class:`DistEnv` (rank, world size) as a value. Every helper here is the
identity when the world size is 1 or no process group is initialised, so a single CPU process runs
the same code paths as a multi-node job.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
import sys
from collections.abc import Iterator
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
    def from_env(cls) -> DistEnv:
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


def init_process_group(env: DistEnv, *, timeout_s: float = 300.0) -> None:
    """Initialise the default process group once: NCCL on GPUs, gloo on CPUs.

    ``timeout_s`` (``engine.collective_timeout_s``) bounds every collective, of the default group and of
    the groups DeepSpeed creates later: a rank whose peer stopped answering raises instead of waiting.
    A single process gets a world of one over an in-memory store: DeepSpeed's engines expect a process group.
    The collective helpers below stay the identity at world size 1.
    """
    if tdist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        # Tear down (abort the communicators, end the process) once a collective times out; torch's
        # default (3) skips the clean-up. Blocking wait stays the user's choice (TORCH_NCCL_BLOCKING_WAIT=1).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(device_for(env))
    timeout = datetime.timedelta(seconds=timeout_s)
    bound_new_groups(timeout)
    if not env.distributed:
        # An in-memory store: no port to pick (a free-port guess can be taken before it is bound, or an
        # inherited MASTER_PORT can point at another process's store).
        for name, value in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_WORLD_SIZE", 1)):
            os.environ.setdefault(name, str(value))
        tdist.init_process_group(backend=backend, store=tdist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        tdist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
    else:
        # torchrun keeps its store (same address and port) across restarts of the workers: the restarted
        # ranks would read the gloo addresses the killed attempt's ranks left there (connectFullMesh:
        # connection refused, then a hang until the timeout). A key prefix per attempt keeps them apart.
        store, rank, world = next(tdist.rendezvous("env://", timeout=timeout))
        tdist.init_process_group(
            backend=backend,
            store=tdist.PrefixStore(f"dpm/attempt_{attempt}", store),
            rank=rank,
            world_size=world,
            timeout=timeout,
        )
    _NODES[:] = all_gather_objects(node_address())


def bound_new_groups(timeout: datetime.timedelta) -> None:
    """Make ``timeout`` the default of every later ``new_group``.

    DeepSpeed reduces gradients over its own clone of the world group (``new_group(ranks)``, no timeout),
    which torch gives the built-in default (30 min for gloo, 10 min for NCCL), not the default group's.
    torch has no public setter for that default; ``_get_default_timeout`` reads these module globals.
    """
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if c10d.default_pg_nccl_timeout is not None:
        c10d.default_pg_nccl_timeout = timeout


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


def broadcast_tensor(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Rank ``src``'s ``tensor`` in place on every rank (each passes one of the same shape and dtype). Collective."""
    if is_active():
        tdist.broadcast(tensor, src=src)
    return tensor


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
    """End the default process group. Through DeepSpeed's ``deepspeed.comm`` when DeepSpeed has used it: that also
    drops the groups DeepSpeed cached on it, which would otherwise outlive it, and a later engine in the same
    process (a new group: tests, notebooks, several commands in one process) would fail with "Group ... is not
    registered"."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None and ds_comm.cdb.is_initialized():
        ds_comm.destroy_process_group()
    else:
        tdist.destroy_process_group()


# ---- a peer that stopped answering ---------------------------------------------------------------------------

_NODES: list[str] = []  # node address of every rank, gathered once the process group is up
RESUME_HINT = "resume by re-running the same command on every node"
_PEER = re.compile(r"\[([0-9A-Fa-f.:]+)\]:\d+")  # gloo names the remote end as [address]:port
_TIMED_OUT = re.compile(r"[Tt]imed out|[Tt]imeout")


class PeerLostError(ConnectionError):
    """A collective failed because another rank stopped answering; the message names the rank and node."""


def node_address() -> str:
    """The address this node reaches ``MASTER_ADDR`` from (a UDP ``connect`` sends nothing); else the host name."""
    master = os.environ.get("MASTER_ADDR", "")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((master, 1))
            return str(sock.getsockname()[0])
    except (OSError, UnicodeError):
        return socket.gethostname()


def _is_collective_failure(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, tdist.DistError) or any(s in text for s in ("gloo", "NCCL", "by peer", "Timed out waiting"))


def _ranks_on(node: str) -> list[int]:
    return [r for r, n in enumerate(_NODES) if n == node]


def _named(ranks: list[int], node: str) -> str:
    who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
    return f"{who} (node {node})"


def describe_peer_failure(err: BaseException, env: DistEnv, timeout_s: float) -> str:
    """One line naming who stopped answering, why, and how to go on."""
    text = str(err)
    me = _NODES[env.rank] if len(_NODES) > env.rank else node_address()
    detail = (
        re.sub(r"\s*" + _PEER.pattern, "", text.split("] ", 1)[-1]).split(". ", 1)[0].strip()
    )  # "Read error: Connection reset by peer"
    cause = f"collective timed out after {timeout_s:g} s" if _TIMED_OUT.search(text) else detail
    peer = _PEER.search(text)
    others = [r for r in range(len(_NODES)) if r != env.rank]
    other_nodes = sorted({_NODES[r] for r in others} - {me})
    on_peer = [r for r in _ranks_on(peer.group(1)) if r != env.rank] if peer else []
    if peer and on_peer:
        who = _named(on_peer, peer.group(1))
    elif peer:
        who = f"node {peer.group(1)}"
    elif len(others) == 1:
        who = _named(others, _NODES[others[0]])
    elif len(other_nodes) == 1:
        who = _named(_ranks_on(other_nodes[0]), other_nodes[0])
    else:
        who = (
            "a rank on one of nodes " + ", ".join(other_nodes[:8]) + (" ..." if len(other_nodes) > 8 else "")
            if other_nodes
            else "a peer rank"
        )
    return f"{who} stopped answering ({cause}; seen by rank {env.rank} on node {me}); {resume_hint()}"


def resume_hint() -> str:
    """How a run goes on after a lost peer: torchrun's own restart while it has restarts left (an elastic job,
    ``NNODES=MIN:MAX``, then finishes on the nodes that are left), else a re-run of the command on every node."""
    restarts, limit = os.environ.get("TORCHELASTIC_RESTART_COUNT"), os.environ.get("TORCHELASTIC_MAX_RESTARTS")
    if restarts and limit and restarts.isdigit() and limit.isdigit() and int(restarts) < int(limit):
        return (
            f"torchrun restarts the ranks that are left from the newest checkpoint (restart {int(restarts) + 1} of "
            f"at most {limit})"
        )
    return RESUME_HINT


@contextlib.contextmanager
def peer_failures(env: DistEnv, timeout_s: float) -> Iterator[None]:
    """Turn a collective that failed on a lost peer (gloo; NCCL with blocking wait) into :class:`PeerLostError`."""
    try:
        yield
    except RuntimeError as err:
        if not (env.distributed and _is_collective_failure(err)):
            raise
        raise PeerLostError(describe_peer_failure(err, env, timeout_s)) from err
