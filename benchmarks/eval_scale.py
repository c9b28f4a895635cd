"""Evaluation at scale: gallery-sharded vs gathered evaluator, 1/2/4 gloo ranks, and sparse vs dense re-ranking.

    nice -n 10 python benchmarks/eval_scale.py                       # G = 1e5 and 1e6, D = 768, 1, 2, 4 ranks
    python benchmarks/eval_scale.py --sizes 20000 --queries 200      # a quick run
    python benchmarks/eval_scale.py --rerank-only --rerank-sizes 1000:9000 11659:82161
    nice -n 10 python benchmarks/eval_scale.py --rerank-only --no-single-rerank --rerank-sizes 11659:82161 --rerank-ranks 1 2

Synthetic identity-structured features: ``--ids`` identity centres, each sample its centre plus noise,
generated in fixed blocks seeded by block index, so every world size sees the same gallery whatever its
share. Each rank generates only its share (uneven: the last rank gets the remainder). Per run: wall time
of the evaluation (shard + gather queries + score; the gathered path: gather + score), peak resident
memory per rank during the evaluation (VmHWM, reset after generating the data; it includes the rank's
resident features and the process's ~0.5 GB of torch), the metrics, and the floor: the same
ranks' two matrix products alone (``Q̂⊙M · Ĝᵀ`` and ``M² · (Ĝ²)ᵀ`` on the share). ``--rerank-ranks``: the
evaluation with sparse re-ranking (``eval.rerank_method=sparse``) on a sharded gallery, the same measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time

import torch
import torch.multiprocessing as mp

BLOCK = 8192


def block_features(
    block: int, ids: torch.Tensor, num: int, dim: int, centres: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1_000_003 * block + 17)
    pids = torch.randint(0, ids.numel(), (num,), generator=g)
    feats = centres[pids].add_(torch.randn(num, dim, generator=g), alpha=3.0)
    return ids[pids], torch.randint(0, 6, (num,), generator=g), feats


def centres_for(num_ids: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.arange(num_ids), torch.randn(num_ids, dim, generator=g)


def gallery_share(size: int, dim: int, num_ids: int, rank: int, world: int):
    """This rank's contiguous run of whole blocks (the last ranks get one block fewer when uneven)."""
    from dpm_dist.eval.evaluator import Embeddings

    ids, centres = centres_for(num_ids, dim)
    blocks = -(-size // BLOCK)
    mine = range(rank * blocks // world, (rank + 1) * blocks // world)
    count = sum(min(BLOCK, size - b * BLOCK) for b in mine)
    feats = torch.empty(count, dim)
    pids, camids, keys, at = [], [], [], 0
    for b in mine:
        n = min(BLOCK, size - b * BLOCK)
        p, c, f = block_features(b, ids, n, dim, centres)
        feats[at : at + n] = f
        at += n
        pids.append(p)
        camids.append(c)
        keys += [f"g{b * BLOCK + j:09d}" for j in range(n)]
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)
    return Embeddings(keys, ["gallery"] * count, cat(pids), cat(camids), feats, torch.zeros(count, 0))


def queries(num: int, dim: int, num_ids: int, rank: int, world: int):
    """Queries with masks; rank 0 holds them all (the gather gives every rank the same set)."""
    from dpm_dist.eval.evaluator import Embeddings

    ids, centres = centres_for(num_ids, dim)
    if rank != 0:
        e = torch.zeros(0, dtype=torch.long)
        return Embeddings([], [], e, e.clone(), torch.zeros(0, dim), torch.zeros(0, dim))
    p, c, f = block_features(10**9, ids, num, dim, centres)
    masks = torch.rand(num, dim, generator=torch.Generator().manual_seed(9))
    return Embeddings([f"q{i:07d}" for i in range(num)], ["query"] * num, p, c, f, masks)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def proc_status_gb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, GiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**20


def reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux: "5" to clear_refs), so the peak is the evaluation's, not the generator's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def matmul_floor(query, share, chunk: int) -> tuple[float, float]:
    """The two matrix products alone: (pure: block by block into one reused buffer, as the evaluator computes
    them; with output: ``Gallery.product`` twice, each writing its (chunk, G/R) result) seconds."""
    from dpm_dist.eval.retrieval import GALLERY_BLOCK, Gallery, l2_normalize

    gallery = Gallery.build(share.feats if len(share) else query.feats.new_zeros(0, query.feats.shape[1]))
    buf = query.feats.new_empty((chunk, GALLERY_BLOCK))
    start = time.perf_counter()
    for s in range(0, len(query), chunk):
        q = l2_normalize(query.feats[s : s + chunk]) * query.masks[s : s + chunk]
        m2 = query.masks[s : s + chunk] ** 2
        out = buf[: q.shape[0]]
        for block in gallery.feat:
            torch.mm(q, block.T, out=out)
            torch.mm(m2, (block * block).T, out=out)
    pure = time.perf_counter() - start
    start = time.perf_counter()
    for s in range(0, len(query), chunk):
        q = l2_normalize(query.feats[s : s + chunk]) * query.masks[s : s + chunk]
        gallery.product(q)
        gallery.product(query.masks[s : s + chunk] ** 2, squares=True)
    return pure, time.perf_counter() - start


def worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import torch.distributed as tdist

    from dpm_dist.config import EvalConfig
    from dpm_dist.dist import DistEnv
    from dpm_dist.eval.evaluator import (
        Embeddings,
        _shard,
        evaluate_embeddings,
        gather_embeddings,
        gather_queries,
        split_roles,
    )

    torch.set_num_threads(args["threads"])
    if world > 1:
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    env = DistEnv(rank=rank, world_size=world, local_world_size=world)
    cfg = EvalConfig(query_chunk=args["chunk"], max_rank=50, rerank=args["mode"] == "rerank", rerank_method="sparse")
    share = gallery_share(args["size"], args["dim"], args["ids"], rank, world)
    local_q = queries(args["queries"], args["dim"], args["ids"], rank, world)
    generated_peak = peak_rss_gb()
    reset_peak_rss()
    base = proc_status_gb("VmRSS")
    start = time.perf_counter()
    if args["mode"] in ("sharded", "rerank"):
        query = gather_queries(local_q)
        gallery = _shard(share, env)
    else:  # today's path: every rank gathers every feature (and mask)
        share.masks = torch.zeros_like(share.feats)
        local = Embeddings(
            local_q.keys + share.keys,
            local_q.roles + share.roles,
            torch.cat([local_q.pids, share.pids]),
            torch.cat([local_q.camids, share.camids]),
            torch.cat([local_q.feats, share.feats]),
            torch.cat([local_q.masks, share.masks]),
        )
        del share
        query, gallery = split_roles(gather_embeddings(local))
        del local
    metrics = evaluate_embeddings(query, gallery, cfg, env)
    seconds = time.perf_counter() - start
    rss = proc_status_gb("VmHWM")
    floor, floor_out = (
        matmul_floor(query, gallery.local if args["mode"] == "sharded" else gallery, args["chunk"])
        if args["floor"]
        else (float("nan"), float("nan"))
    )
    result = {
        "rank": rank,
        "seconds": seconds,
        "peak_rss_gb": rss,
        "rss_before_gb": base,
        "floor_s": floor,
        "floor_with_output_s": floor_out,
        "generator_peak_gb": generated_peak,
        "metrics": metrics.as_dict(),
        "ap_sum": float(metrics.ap.sum()),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if world > 1:
        tdist.destroy_process_group()


def run(mode: str, size: int, world: int, ns: argparse.Namespace, out: str, num_queries: int = 0) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = os.path.join(out, f"{mode}_{size}_{world}")
    os.makedirs(folder, exist_ok=True)
    args = dict(
        mode=mode,
        size=size,
        dim=ns.dim,
        ids=ns.ids,
        queries=num_queries or ns.queries,
        chunk=ns.query_chunk,
        threads=ns.threads,
        floor=mode == "sharded",
    )
    mp.spawn(worker, args=(world, port, args, folder), nprocs=world, join=True)
    ranks = [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(world)]
    assert all(r["metrics"] == ranks[0]["metrics"] for r in ranks), "ranks disagree"
    return {
        "mode": mode,
        "Q": args["queries"],
        "G": size,
        "ranks": world,
        "seconds": max(r["seconds"] for r in ranks),
        "peak_rss_gb": max(r["peak_rss_gb"] for r in ranks),
        "floor_s": max(r["floor_s"] for r in ranks),
        "floor_with_output_s": max(r["floor_with_output_s"] for r in ranks),
        "metrics": ranks[0]["metrics"],
    }


def rerank_bench(num_q: int, num_g: int, ns: argparse.Namespace, dense: bool) -> dict:
    """Dense and/or sparse re-ranking of all queries, in a fresh process each (peak RSS is per process)."""
    import subprocess

    code = (
        f"import sys,time,resource,torch; sys.path.insert(0,{os.path.dirname(os.path.abspath(__file__))!r});"
        "from eval_scale import *; torch.set_num_threads(%d);"
        % ns.threads
        + f"q=queries({num_q},{ns.dim},{ns.ids},0,1).feats; g=gallery_share({num_g},{ns.dim},{ns.ids},0,1).feats;"
        "from dpm_dist.eval.rerank import k_reciprocal_distance as D; from dpm_dist.eval.rerank_sparse import sparse_k_reciprocal_distance as S;"
        "r0=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20; t=time.perf_counter();"
        f"d=({'D' if dense else 'S'})(q,g); t=time.perf_counter()-t;"
        "print(json.dumps(dict(seconds=t, peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20, "
        "rss_before_gb=r0, checksum=float(d.double().sum()), first=d[0,:5].tolist())))"
    )
    proc = subprocess.run([sys.executable, "-c", "import json;" + code], capture_output=True, text=True, check=True)
    return dict(
        json.loads(proc.stdout.strip().splitlines()[-1]), Q=num_q, G=num_g, method="dense" if dense else "sparse"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--gathered-max", type=float, default=1e5, help="largest G run on today's gathered path too")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--ids", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--query-chunk", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument(
        "--rerank-sizes", nargs="*", default=["1000:9000", "2000:30000"], help="Q:G pairs; dense runs at the first"
    )
    parser.add_argument("--rerank-only", action="store_true")
    parser.add_argument(
        "--rerank-ranks",
        type=int,
        nargs="*",
        default=[],
        help="also evaluate with sparse re-ranking on a sharded gallery on these rank counts, every Q:G pair",
    )
    parser.add_argument(
        "--no-single-rerank", action="store_true", help="skip the 1-process dense/sparse distance matrices"
    )
    parser.add_argument("--out", default="/tmp/eval_scale")
    ns = parser.parse_args()
    rows = []
    if not ns.rerank_only:
        for size in (int(s) for s in ns.sizes):
            for world in ns.ranks:
                modes = ["sharded"] + (["gathered"] if size <= ns.gathered_max else [])
                for mode in modes:
                    row = run(mode, size, world, ns, ns.out)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        print_table(rows)
    reranks, distributed = [], []
    for n, pair in enumerate(ns.rerank_sizes):
        num_q, num_g = (int(x) for x in pair.split(":"))
        for dense in ([True, False] if n == 0 else [False]) if not ns.no_single_rerank else []:
            reranks.append(rerank_bench(num_q, num_g, ns, dense))
            print(json.dumps(reranks[-1]), flush=True)
        for world in ns.rerank_ranks:
            distributed.append(run("rerank", num_g, world, ns, ns.out, num_queries=num_q))
            print(json.dumps(distributed[-1]), flush=True)
    if distributed:
        print_rerank_table(distributed)


def print_table(rows: list[dict]) -> None:
    print(
        "\n| G | ranks | path | wall s | floor s (products alone) | wall / floor | floor s (with their output) | "
        "wall / that | peak RSS GB/rank | RSS vs 1 rank | mAP | rank-1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        one = next(
            r
            for r in rows
            if r["G"] == row["G"]
            and r["mode"] == row["mode"]
            and r["ranks"] == min(x["ranks"] for x in rows if x["G"] == row["G"] and x["mode"] == row["mode"])
        )
        ratio = row["seconds"] / row["floor_s"] if row["floor_s"] == row["floor_s"] else float("nan")
        ratio_out = row["seconds"] / row["floor_with_output_s"] if row["floor_s"] == row["floor_s"] else float("nan")
        m = row["metrics"]
        print(
            f"| {row['G']:.0e} | {row['ranks']} | {row['mode']} | {row['seconds']:.1f} | {row['floor_s']:.1f} | "
            f"{ratio:.2f} | {row['floor_with_output_s']:.1f} | {ratio_out:.2f} | {row['peak_rss_gb']:.2f} | "
            f"{row['peak_rss_gb'] / one['peak_rss_gb']:.2f} | "
            f"{m['mAP']:.6f} | {m['rank1']:.4f} |"
        )


def print_rerank_table(rows: list[dict]) -> None:
    print("\n| Q × G | ranks | wall s | peak RSS GB/rank | RSS vs 1 rank | mAP | rank-1 |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        one = min((r for r in rows if r["G"] == row["G"] and r["Q"] == row["Q"]), key=lambda r: r["ranks"])
        m = row["metrics"]
        print(
            f"| {row['Q']:,} × {row['G']:,} | {row['ranks']} | {row['seconds']:.1f} | {row['peak_rss_gb']:.2f} | "
            f"{row['peak_rss_gb'] / one['peak_rss_gb']:.2f} | {m['mAP']:.6f} | {m['rank1']:.4f} |"
        )


if __name__ == "__main__":
    main()
