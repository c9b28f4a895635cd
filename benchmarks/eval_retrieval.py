"""Masked retrieval + CMC/mAP/mINP: this evaluator vs the reference's per-query loop, side by side.

    .venv/bin/python benchmarks/eval_retrieval.py                      # Occluded-Duke size, loop on 200 queries
    .venv/bin/python benchmarks/eval_retrieval.py --ref-queries 0      # the loop on every query (minutes)
    .venv/bin/python benchmarks/eval_retrieval.py --dtype float32      # the official dtype (see below)

Random identity-structured features at Occluded-Duke size (2,210 queries × 17,661 gallery, D = 768,
1,110 identities, 8 cameras, sigmoid masks). "Reference way" is the official code path written out:
``cosine_single`` (a Python loop over queries that re-normalises the gallery, applies the query's mask,
renormalises and grows the matrix with ``torch.cat``), numpy clip + arccos, then ``eval_func`` (argsort
of the whole matrix and a per-query CMC/AP loop, plus fast-reid's mINP). Its one change is
``argsort(kind="stable")`` instead of numpy's unstable quicksort, so that ties have one answer.

By default the loop runs on the first ``--ref-queries`` queries and its time is extrapolated linearly to
all queries; that is a lower bound for the loop (its ``torch.cat`` growth is quadratic), and it is
labelled as such. The identity check always compares both metric sets on that same subset.

Precision: in float64 (default) the two formulations differ by ~1e-16, which cannot reorder distinct
distances, so the metric sets must be identical and the script fails otherwise. In float32 they differ
by ~1 ulp (~6e-8) and the official float32 arccos merges cosines closer than its ~1e-7 output spacing
into ties, so items closer than that can swap and the metrics agree to about 1e-5 (printed, not failed).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from dpm_dist.eval.retrieval import evaluate_features


def make_data(
    num_query: int, num_gallery: int, dim: int, num_ids: int, num_cams: int, noise: float, dtype, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_ids, dim, generator=g, dtype=dtype)
    q_pids = torch.randint(0, num_ids, (num_query,), generator=g)
    g_pids = torch.randint(0, num_ids, (num_gallery,), generator=g)
    qf = centres[q_pids] + noise * torch.randn(num_query, dim, generator=g, dtype=dtype)
    gf = centres[g_pids] + noise * torch.randn(num_gallery, dim, generator=g, dtype=dtype)
    qm = torch.sigmoid(2.0 * torch.randn(num_query, dim, generator=g, dtype=dtype))
    cams = torch.randint(0, num_cams, (num_query + num_gallery,), generator=g)
    return qf, gf, qm, q_pids, g_pids, cams[:num_query], cams[num_query:]


def reference_distances(qf: torch.Tensor, gf: torch.Tensor, qm: torch.Tensor) -> np.ndarray:
    """The official cosine_single: a loop over queries on the CPU growing the matrix with torch.cat."""
    epsilon = 0.00001
    qf, gf = F.normalize(qf), F.normalize(gf)  # R1_mAP_eval.compute normalises first (feat_norm)
    for i in range(qf.shape[0]):
        query_vector = F.normalize(qf[i, :].unsqueeze(0))
        gallery_matrix = F.normalize(qm[i, :].unsqueeze(0) * F.normalize(gf))
        row = query_vector.mm(gallery_matrix.t())
        dist = row if i == 0 else torch.cat((dist, row), 0)
    dist = np.clip(dist.cpu().numpy(), -1 + epsilon, 1 - epsilon)
    return np.arccos(dist)


def reference_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50) -> dict[str, float]:
    """The official eval_func (stable argsort) with fast-reid's mINP."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for q_idx in range(num_q):
        order = indices[q_idx]
        keep = np.invert((g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx]))
        orig_cmc = matches[q_idx][keep]
        if not np.any(orig_cmc):
            continue
        cmc = orig_cmc.cumsum()
        hardest = np.max(np.where(orig_cmc == 1))
        all_inp.append(cmc[hardest] / (hardest + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        tmp = orig_cmc.cumsum() / np.arange(1, orig_cmc.shape[0] + 1)
        all_ap.append((tmp * orig_cmc).sum() / orig_cmc.sum())
    cmc = np.asarray(all_cmc).astype(np.float64).sum(0) / len(all_ap)
    return {
        "mAP": float(np.mean(all_ap)),
        "mINP": float(np.mean(all_inp)),
        "rank1": float(cmc[0]),
        "rank5": float(cmc[4]),
        "rank10": float(cmc[9]),
        "num_valid_query": float(len(all_ap)),
    }


def ours(qf, gf, qm, q_pids, g_pids, q_camids, g_camids, query_chunk: int) -> tuple[dict[str, float], float]:
    start = time.perf_counter()
    metrics = evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, q_mask=qm, query_chunk=query_chunk)
    elapsed = time.perf_counter() - start
    return {k: v for k, v in metrics.as_dict().items() if k not in ("num_query", "num_gallery")}, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-query", type=int, default=2210)
    parser.add_argument("--num-gallery", type=int, default=17661)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--num-ids", type=int, default=1110)
    parser.add_argument("--num-cams", type=int, default=8)
    parser.add_argument("--noise", type=float, default=3.0, help="per-sample noise around the identity centre (std 1)")
    parser.add_argument("--ref-queries", type=int, default=200, help="queries for the reference loop; 0 = all")
    parser.add_argument("--query-chunk", type=int, default=256)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of this evaluator (the best is reported)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    qf, gf, qm, q_pids, g_pids, q_cams, g_cams = make_data(
        args.num_query, args.num_gallery, args.dim, args.num_ids, args.num_cams, args.noise, dtype
    )
    n_ref = args.num_query if args.ref_queries <= 0 else min(args.ref_queries, args.num_query)
    print(
        f"{args.num_query} queries x {args.num_gallery} gallery, D={args.dim}, {args.dtype}, "
        f"torch threads={torch.get_num_threads()}, query_chunk={args.query_chunk}",
        flush=True,
    )

    runs = [ours(qf, gf, qm, q_pids, g_pids, q_cams, g_cams, args.query_chunk) for _ in range(args.repeats)]
    full_metrics, t_ours = runs[0][0], min(t for _, t in runs)
    print(
        f"this evaluator, all {args.num_query} queries: {t_ours:.2f} s (best of {args.repeats})  {json.dumps(full_metrics)}",
        flush=True,
    )

    sub = slice(0, n_ref)
    start = time.perf_counter()
    ref_dist = reference_distances(qf[sub], gf, qm[sub])
    t_dist = time.perf_counter() - start
    labels = [a.numpy() for a in (q_pids[sub], g_pids, q_cams[sub], g_cams)]
    start = time.perf_counter()
    ref_metrics = reference_metrics(ref_dist, *labels)
    t_metrics = time.perf_counter() - start
    t_ref = t_dist + t_metrics
    scale = args.num_query / n_ref
    t_ref_full = t_ref * scale
    label = (
        "measured"
        if n_ref == args.num_query
        else (
            f"EXTRAPOLATED linearly from {n_ref} queries (x{scale:.2f}); a lower bound, the torch.cat growth is quadratic"
        )
    )
    print(
        f"reference way, {n_ref} queries: {t_ref:.2f} s (distances {t_dist:.2f} s + CMC/mAP {t_metrics:.2f} s)",
        flush=True,
    )
    print(f"reference way, all {args.num_query} queries: {t_ref_full:.1f} s [{label}]")
    print(f"speed-up: {t_ref_full / t_ours:.0f}x")

    sub_metrics, _ = ours(qf[sub], gf, qm[sub], q_pids[sub], g_pids, q_cams[sub], g_cams, args.query_chunk)
    print(f"identity check on the same {n_ref} queries:")
    print(f"  this evaluator: {json.dumps(sub_metrics)}")
    print(f"  reference way:  {json.dumps(ref_metrics)}")
    diff = max(abs(sub_metrics[k] - ref_metrics[k]) for k in ref_metrics)
    identical = sub_metrics["num_valid_query"] == ref_metrics["num_valid_query"] and diff <= 1e-12
    print(
        f"  max |difference| = {diff:.3g} -> {'IDENTICAL' if identical else 'DIFFERENT'} (float64 summation-order slack 1e-12)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "ours_s": t_ours,
                    "ref_s_subset": t_ref,
                    "ref_s_full": t_ref_full,
                    "ref_extrapolated": n_ref != args.num_query,
                    "speedup": t_ref_full / t_ours,
                    "ours_full": full_metrics,
                    "ours_subset": sub_metrics,
                    "ref_subset": ref_metrics,
                    "max_abs_diff": diff,
                },
                f,
                indent=2,
            )
    if args.dtype == "float64" and not identical:
        raise SystemExit("metric sets differ in float64")


if __name__ == "__main__":
    main()
