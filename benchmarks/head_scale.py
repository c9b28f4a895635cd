"""Step time and peak memory of the prototype head alone, replicated vs sharded (docs/training.md, "Sharded prototype head").

    DS_ACCELERATOR=cpu nice -n 10 .venv/bin/python benchmarks/head_scale.py --classes 10000 100000 --ranks 1 2 4
    DS_ACCELERATOR=cpu nice -n 10 .venv/bin/python benchmarks/head_scale.py --classes 1000000 --ranks 4

One step = forward of both classification branches (plain CE + masked ArcFace CE) on B samples per rank,
backward into W, the features and the masks, and the SGD (momentum) step of W; gloo ranks on this host. The
replicated head holds all of W (its gradient all-reduced, as DeepSpeed does); the sharded head holds C/R rows
(dpm_dist/train/sharded_head.py). Peak memory: the peak resident set of each rank process (ru_maxrss), from a
process that only built the head, so it is the head's memory plus the interpreter's (~0.4 GB).
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


def _socket_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world: int, port: int, kind: str, classes: int, dim: int, batch: int, steps: int, queue) -> None:
    from dpm_dist.model.dpm import prototype_rows
    from dpm_dist.train.losses import classification_terms
    from dpm_dist.train.sharded_head import gather_rows, shard_cross_entropy, shard_masked_arcface_ce

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    start, stop = prototype_rows(classes, rank, world) if kind == "sharded" else (0, classes)
    g = torch.Generator().manual_seed(rank)
    weight = torch.nn.Parameter(torch.empty(stop - start, dim).uniform_(-0.05, 0.05, generator=g))
    opt = torch.optim.SGD([weight], lr=1e-3, momentum=0.9, weight_decay=1e-4)
    times = []
    for _ in range(steps):
        feat = torch.randn(batch, dim, generator=g, requires_grad=True)
        mask = torch.rand(batch, dim, generator=g, requires_grad=True)
        labels = torch.randint(0, classes, (batch,), generator=g)
        tdist.barrier()
        t0 = time.perf_counter()
        if kind == "sharded":
            feats, masks, all_labels = gather_rows(feat, world), gather_rows(mask, world), gather_rows(labels, world)
            loss = shard_cross_entropy(feats @ weight.t(), all_labels, start)[0]
            loss = loss + shard_masked_arcface_ce(feats, masks, weight, all_labels, start, margin=0.5, scale=30.0)
        else:
            terms = classification_terms(feat, mask, weight, labels, margin=0.5, scale=30.0)
            loss = terms["loss_id"] + terms["loss_mask_id"]
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


def measure(kind: str, classes: int, world: int, dim: int, batch: int, steps: int) -> tuple[float, float]:
    """(median step seconds of the slowest rank, max peak RSS GB over ranks)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    ctx_procs = mp.start_processes(_worker, args=(world, _socket_port(), kind, classes, dim, batch, steps, queue),
                                   nprocs=world, join=False, start_method="spawn")
    results = [queue.get() for _ in range(world)]
    ctx_procs.join()
    return max(r[1] for r in results), max(r[2] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=64, help="samples per rank")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print("| C | ranks | replicated s/step | sharded s/step | time ratio sh/rep | replicated GB/rank | sharded GB/rank | memory ratio sh/rep |")
    print("|---|---|---|---|---|---|---|---|")
    for classes in args.classes:
        for world in args.ranks:
            rt, rm = measure("replicated", classes, world, args.dim, args.batch, args.steps)
            st, sm = measure("sharded", classes, world, args.dim, args.batch, args.steps)
            print(f"| {classes:,} | {world} | {rt:.3f} | {st:.3f} | {st / rt:.2f} | {rm:.2f} | {sm:.2f} | {sm / rm:.2f} |", flush=True)


if __name__ == "__main__":
    main()
