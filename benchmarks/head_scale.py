"""Step time and peak memory of the prototype head alone: replicated, sharded, and sharded with Partial FC sampling
(docs/training.md, "Sharded prototype head"; docs/benchmarks.md, "Prototype head at scale").

    DS_ACCELERATOR=cpu nice -n 10 .venv/bin/python benchmarks/head_scale.py --classes 10000 100000 --ranks 1 2 4
    DS_ACCELERATOR=cpu nice -n 10 .venv/bin/python benchmarks/head_scale.py --classes 1000000 --ranks 1 4

One step = forward of both classification branches (plain CE + masked ArcFace CE) on B samples per rank,
backward into W, the features and the masks, and the SGD (momentum, weight decay) step of W; gloo ranks on this
host. The replicated head holds all of W (its gradient all-reduced, as DeepSpeed does); the sharded head holds
C/R rows (dpm_dist/train/sharded_head.py); "sampled" is the sharded head at ``--sample-rate`` (Partial FC: the
batch's classes plus seeded negatives). Peak memory: the peak resident set of each rank process (ru_maxrss), from
a process that only built the head, so it is the head's memory plus the interpreter's (~0.4 GB). A configuration
whose estimated memory exceeds what the host has free is skipped and says so.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

KINDS = ("replicated", "sharded", "sampled")


def _socket_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int, world: int, port: int, kind: str, classes: int, dim: int, batch: int, steps: int, rate: float, queue
) -> None:
    from dpm_dist.model.dpm import prototype_rows
    from dpm_dist.train.losses import classification_terms
    from dpm_dist.train.sharded_head import (
        gather_rows,
        sample_rows,
        sample_seed,
        shard_cross_entropy,
        shard_masked_arcface_ce,
    )

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    start, stop = prototype_rows(classes, rank, world) if kind != "replicated" else (0, classes)
    g = torch.Generator().manual_seed(rank)
    weight = torch.nn.Parameter(torch.empty(stop - start, dim).uniform_(-0.05, 0.05, generator=g))
    opt = torch.optim.SGD([weight], lr=1e-3, momentum=0.9, weight_decay=1e-4)
    times = []
    for step in range(steps):
        feat = torch.randn(batch, dim, generator=g, requires_grad=True)
        mask = torch.rand(batch, dim, generator=g, requires_grad=True)
        labels = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(1000 * step + rank))
        tdist.barrier()
        t0 = time.perf_counter()
        if kind == "replicated":
            terms = classification_terms(feat, mask, weight, labels, margin=0.5, scale=30.0)
            loss = terms["loss_id"] + terms["loss_mask_id"]
        else:
            feats, masks, all_labels = gather_rows(feat, world), gather_rows(mask, world), gather_rows(labels, world)
            rows = None
            if kind == "sampled":
                gen = torch.Generator().manual_seed(sample_seed(0, step, rank))
                rows = sample_rows(all_labels, start, stop - start, rate, gen)
            w = weight if rows is None else weight.index_select(0, rows)
            loss = shard_cross_entropy(feats @ w.t(), all_labels, start, width=stop - start, rows=rows)[0]
            loss = loss + shard_masked_arcface_ce(
                feats, masks, weight, all_labels, start, margin=0.5, scale=30.0, rows=rows
            )
        loss.backward()
        if kind == "replicated" and world > 1:
            tdist.all_reduce(weight.grad)  # the data-parallel average (its /R is a cheap scale)
            weight.grad.div_(world)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    queue.put((rank, statistics.median(times[1:] or times), peak_gb))
    tdist.destroy_process_group()


def estimate_gb(kind: str, classes: int, world: int, dim: int, batch: int, rate: float) -> float:
    """Resident memory of all ranks together, as measured here: ~7 W-sized tensors (W, its gradient and momentum,
    the normalised W and its square, saved for the backward), ~10 logit-sized ones, 0.6 GB of interpreter each."""
    rows = classes if kind == "replicated" else -(-classes // world)
    n = batch if kind == "replicated" else batch * world
    cols = rows * (rate if kind == "sampled" else 1.0)
    return world * ((7 * rows * dim + 10 * n * cols) * 4 / 2**30 + 0.6)


def free_gb() -> float:
    """MemAvailable (free plus reclaimable page cache), GB."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20


def measure(kind: str, classes: int, world: int, dim: int, batch: int, steps: int, rate: float) -> tuple[float, float]:
    """(median step seconds of the slowest rank, max peak RSS GB over ranks)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(
        _worker,
        args=(world, _socket_port(), kind, classes, dim, batch, steps, rate, queue),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    results = [queue.get() for _ in range(world)]
    procs.join()
    return max(r[1] for r in results), max(r[2] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--sample-rate", type=float, default=0.1, help="Partial FC's share for the 'sampled' kind")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=64, help="samples per rank")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    kinds = args.kinds
    print(f"sampled = sharded at sample_rate {args.sample_rate}; ratios against the replicated head of the same row")
    print(
        "| C | ranks | "
        + " | ".join(f"{k} s/step" for k in kinds)
        + " | "
        + " | ".join(f"{k} GB/rank" for k in kinds)
        + " | ratios (time, memory) |"
    )
    print("|---|---|" + "---|" * (2 * len(kinds) + 1))
    for classes in args.classes:
        for world in args.ranks:
            got = {}
            for kind in kinds:
                need = estimate_gb(kind, classes, world, args.dim, args.batch, args.sample_rate)
                got[kind] = (
                    measure(kind, classes, world, args.dim, args.batch, args.steps, args.sample_rate)
                    if need < 0.9 * free_gb()
                    else None
                )
            cell = lambda v, f: f"{v:{f}}" if v is not None else "skipped (memory)"
            times = " | ".join(cell(got[k] and got[k][0], ".3f") for k in kinds)
            mems = " | ".join(cell(got[k] and got[k][1], ".2f") for k in kinds)
            base = got.get("replicated")
            ratios = (
                ", ".join(
                    f"{k}/rep {got[k][0] / base[0]:.2f}x, {got[k][1] / base[1]:.2f}x"
                    for k in kinds
                    if k != "replicated" and base and got[k]
                )
                or "-"
            )
            print(f"| {classes:,} | {world} | {times} | {mems} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
