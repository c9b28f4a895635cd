"""Step time and peak memory of the prototype head alone: replicated, sharded, and sharded with Partial FC sampling
(docs/training.md, "Sharded prototype head"; docs/benchmarks.md, "Prototype head at scale").

    DS_ACCELERATOR=cpu nice -n 10 .venv/bin/python benchmarks/head_scale.py --classes 10000 100000 --ranks 1 2 4
    DS_ACCELERATOR=cpu nice -n 10 .venv/bin/python benchmarks/head_scale.py --classes 1000000 --ranks 1 4
    python benchmarks/head_scale.py --device cuda --precision bf16 --classes 1000000 --kinds replicated sampled

One step = forward of both classification branches (plain CE + masked ArcFace CE) on B samples per rank,
backward into W, the features and the masks, and the SGD (momentum, weight decay) step of W; gloo ranks on this
host. The replicated head holds all of W (its gradient all-reduced, as DeepSpeed does); the sharded head holds
C/R rows (dpm_dist/train/sharded_head.py); "sampled" is the sharded head at ``--sample-rate`` (Partial FC: the
batch's classes plus seeded negatives). Peak memory: the peak resident set of each rank process (ru_maxrss), from
a process that only built the head, so it is the head's memory plus the interpreter's (~0.4 GB). A configuration
whose estimated memory exceeds what the host has free is skipped and says so.

``--precision bf16`` runs the forward under ``torch.autocast(bfloat16)`` as the engine does at
``engine.precision=bf16``: the heads' products then run as the product runs them, the plain branch's F·Wᵀ in bf16
and its softmax CE in fp32; the masked branch's cosines, ArcFace and CE stay fp32 (dpm_dist/train/losses.py turns
autocast off there). W, its gradient and momentum stay fp32 (DeepSpeed's torch_autocast keeps fp32 parameters).

``--device cuda`` (``auto``: CUDA when there is one) runs one rank in this process, without a process group, at each
C: the replicated head against the sharded head of one rank (all C rows; at ``--sample-rate``: Partial FC). Peak
memory is then ``torch.cuda.max_memory_allocated`` (reset for each configuration): the head's tensors alone, no
interpreter; a configuration that runs out of GPU memory says so. ``--json PATH`` also writes every number.
"""

from __future__ import annotations

import argparse
import gc
import json
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


MARGIN, SCALE = 0.5, 30.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run_steps(
    kind: str,
    classes: int,
    dim: int,
    batch: int,
    steps: int,
    rate: float,
    *,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> tuple[list[float], list[float]]:
    """(seconds, loss) of each of ``steps`` steps of one rank's head: the product's classification terms
    (:func:`losses.classification_terms` for the replicated head, :func:`sharded_head.shard_classification_terms`
    for a shard), backward, the replicated gradient's all-reduce, the SGD step. Collective when ``world`` > 1."""
    from dpm_dist.model.dpm import prototype_rows
    from dpm_dist.train.losses import classification_terms
    from dpm_dist.train.sharded_head import gather_rows, sample_rows, sample_seed, shard_classification_terms

    device = torch.device(device)
    cuda = device.type == "cuda"
    distributed = tdist.is_available() and tdist.is_initialized()
    start, stop = prototype_rows(classes, rank, world) if kind != "replicated" else (0, classes)
    g = torch.Generator(device=device).manual_seed(rank)
    weight = torch.nn.Parameter(torch.empty(stop - start, dim, device=device).uniform_(-0.05, 0.05, generator=g))
    opt = torch.optim.SGD([weight], lr=1e-3, momentum=0.9, weight_decay=1e-4)
    autocast = torch.autocast(device_type=device.type, dtype=DTYPES[precision], enabled=precision != "fp32")
    times, losses = [], []
    for step in range(steps):
        feat = torch.randn(batch, dim, generator=g, device=device, requires_grad=True)
        mask = torch.rand(batch, dim, generator=g, device=device, requires_grad=True)
        labels = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(1000 * step + rank))
        labels = labels.to(device)
        if distributed:
            tdist.barrier()
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with autocast:
            if kind == "replicated":
                terms = classification_terms(feat, mask, weight, labels, margin=MARGIN, scale=SCALE)
            else:
                feats, masks, all_labels = (
                    gather_rows(feat, world),
                    gather_rows(mask, world),
                    gather_rows(labels, world),
                )
                rows = None
                if kind == "sampled":
                    gen = torch.Generator().manual_seed(sample_seed(0, step, rank))
                    rows = sample_rows(all_labels, start, stop - start, rate, gen).to(device)
                terms = shard_classification_terms(
                    feats, masks, weight, all_labels, start, margin=MARGIN, scale=SCALE, rows=rows
                )
            loss = terms["loss_id"] + terms["loss_mask_id"]
        loss.backward()
        if kind == "replicated" and world > 1:
            tdist.all_reduce(weight.grad)  # the data-parallel average (its /R is a cheap scale)
            weight.grad.div_(world)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return times, losses


def _worker(
    rank: int,
    world: int,
    port: int,
    kind: str,
    classes: int,
    dim: int,
    batch: int,
    steps: int,
    rate: float,
    precision: str,
    queue,
) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    times, _ = run_steps(kind, classes, dim, batch, steps, rate, rank=rank, world=world, precision=precision)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    queue.put((rank, statistics.median(times[1:] or times), peak_gb))
    tdist.destroy_process_group()


def measure_one_device(
    kind: str, classes: int, dim: int, batch: int, steps: int, rate: float, *, device: str, precision: str
) -> tuple[float, float | None] | str:
    """One rank in this process, no process group: (median step seconds, peak GB: ``torch.cuda.max_memory_allocated``
    on CUDA, None elsewhere), or "out of memory"."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        times, _ = run_steps(kind, classes, dim, batch, steps, rate, device=dev, precision=precision)
    except torch.cuda.OutOfMemoryError:  # (the same class as torch.OutOfMemoryError in recent torch)
        return "out of memory"
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None
    return statistics.median(times[1:] or times), peak


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


def measure(
    kind: str, classes: int, world: int, dim: int, batch: int, steps: int, rate: float, precision: str = "fp32"
) -> tuple[float, float]:
    """(median step seconds of the slowest rank, max peak RSS GB over ranks): ``world`` gloo ranks on this host."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(
        _worker,
        args=(world, _socket_port(), kind, classes, dim, batch, steps, rate, precision, queue),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    results = [queue.get() for _ in range(world)]
    procs.join()
    return max(r[1] for r in results), max(r[2] for r in results)


def _cell(value: float | None, fmt: str, missing: str) -> str:
    return f"{value:{fmt}}" if value is not None else missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument(
        "--ranks", type=int, nargs="+", default=None, help="gloo ranks on CPU (default 1 2 4); 1 on CUDA"
    )
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--sample-rate", type=float, default=0.1, help="Partial FC's share for the 'sampled' kind")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=64, help="samples per rank")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="cuda: one rank in this process (auto: cuda if any)",
    )
    parser.add_argument("--precision", choices=tuple(DTYPES), default="fp32", help="bf16: the forward under autocast")
    parser.add_argument(
        "--inline",
        action="store_true",
        help="one rank in this process, no process group (always on CUDA; on CPU no peak memory is measured)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every number here")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    inline = device == "cuda" or args.inline
    ranks = args.ranks or ([1] if inline else [1, 2, 4])
    if inline and ranks != [1]:
        parser.error("--device cuda and --inline run one rank (--ranks 1)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    kinds = args.kinds
    if device == "cuda":
        where = f"one {torch.cuda.get_device_name(0)}, {args.precision}; GB = torch.cuda.max_memory_allocated / 2^30"
    elif inline:
        where = f"{args.precision} on CPU, one rank in this process; GB = not measured"
    else:
        where = f"{args.precision} on CPU gloo ranks; GB = peak RSS per rank process"
    print(f"sampled = sharded at sample_rate {args.sample_rate}; ratios against the replicated head of the same row")
    print(f"{where}; D = {args.dim}, B = {args.batch} per rank, median of steps 2-{args.steps}")
    print(
        "| C | ranks | "
        + " | ".join(f"{k} s/step" for k in kinds)
        + " | "
        + " | ".join(f"{k} GB/rank" for k in kinds)
        + " | ratios (time, memory) |"
    )
    print("|---|---|" + "---|" * (2 * len(kinds) + 1))
    record: dict = {"device": device, "precision": args.precision, "sample_rate": args.sample_rate, "rows": []}
    record.update(dim=args.dim, batch=args.batch, steps=args.steps, memory=where.split("GB = ")[1])
    if device == "cuda":
        record["gpu"] = torch.cuda.get_device_name(0)
    for classes in args.classes:
        for world in ranks:
            got: dict = {}
            missing: dict = {}
            for kind in kinds:
                if inline:
                    result = measure_one_device(
                        kind,
                        classes,
                        args.dim,
                        args.batch,
                        args.steps,
                        args.sample_rate,
                        device=device,
                        precision=args.precision,
                    )
                elif estimate_gb(kind, classes, world, args.dim, args.batch, args.sample_rate) < 0.9 * free_gb():
                    result = measure(
                        kind, classes, world, args.dim, args.batch, args.steps, args.sample_rate, args.precision
                    )
                else:
                    result = "skipped (memory)"
                if isinstance(result, str):
                    got[kind], missing[kind] = None, result
                else:
                    got[kind] = result
            times = " | ".join(_cell(got[k] and got[k][0], ".3f", missing.get(k, "–")) for k in kinds)
            mems = " | ".join(_cell(got[k] and got[k][1], ".2f", missing.get(k, "–")) for k in kinds)
            base = got.get("replicated")
            ratios = (
                ", ".join(
                    f"{k}/rep {got[k][0] / base[0]:.2f}x"
                    + (f", {got[k][1] / base[1]:.2f}x" if base[1] and got[k][1] is not None else "")
                    for k in kinds
                    if k != "replicated" and base and got[k]
                )
                or "-"
            )
            print(f"| {classes:,} | {world} | {times} | {mems} | {ratios} |", flush=True)
            row: dict = {"classes": classes, "ranks": world}
            for k in kinds:
                row[k] = {"s_per_step": got[k][0], "peak_gb": got[k][1]} if got[k] else {"missing": missing[k]}
            record["rows"].append(row)
            if args.json:  # after every row: a run stopped by its timeout keeps the rows it finished
                with open(args.json, "w") as f:
                    json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
