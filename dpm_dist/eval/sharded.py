"""Gallery-sharded exact evaluation (``eval.shard_gallery=true``): no rank ever holds the whole gallery.

    every rank: its gallery share (features, never gathered) ─► keys, pids, cameras all-gathered (O(G), no
        features) ─► dedupe by key, global index = position in key order (the gathered path's gallery index)
    all ranks:  the queries all-gathered (small) and sorted by key, cut into the fixed chunks
    per chunk:  distances to this rank's share ─► its true matches' (query, distance, global index) ─►
        all-gather (a few per query) ─► every rank counts its kept items at or before each match ─►
        one all-reduce of those counts = the matches' ranks, the same on every rank

A match's rank is the number of kept gallery items ahead of it (smaller distance, or equal with a smaller
global index) plus one, and the counts over disjoint shares add up to it, so CMC, mAP and mINP are
exactly those of the gathered path (:func:`dpm_dist.eval.evaluator.evaluate_embeddings`): the same
chunks, the same distances bit for bit (:class:`~dpm_dist.eval.retrieval.Gallery` computes each distance
with fixed-shape products), the same ranks, the same float sums. Memory per rank: the share's features
and their normalised copy (G/R × D × 8 bytes) + one chunk's distances (query_chunk × G/R × ~5 bytes) + the
gathered queries + O(G) keys. Re-ranking (``eval.rerank_method=sparse``) gives each rank the re-ranked
distances against its share (:mod:`dpm_dist.eval.rerank_sparse`), scored the same way; a gathered gallery
is cut into contiguous shares for it (:func:`as_shard`). Every function that talks to other ranks says
"Collective".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dpm_dist import dist
from dpm_dist.dist import DistEnv
from dpm_dist.eval.embeddings import Embeddings
from dpm_dist.eval.retrieval import (
    RankingSums,
    RetrievalMetrics,
    chunk_distance_fn,
    count_at_or_before,
    effective_max_rank,
    finalize,
    match_table,
    query_chunks,
    true_matches,
    valid_ranks,
)


@dataclass
class GalleryShard:
    """This rank's part of the gallery: rows it alone owns, each with its world-size-independent index."""

    local: Embeddings  # one row per owned item (masks unused: may be empty)
    index: torch.Tensor  # (n,) int64: position of each row's key in the sorted keys of the whole gallery
    size: int  # G, the whole gallery

    def __len__(self) -> int:
        return self.size


def shard_gallery(local: Embeddings, env: DistEnv) -> GalleryShard:
    """Dedupe this rank's gallery rows against every rank's keys and index them by key order. Collective.

    A key on several ranks (padding) is kept by its first occurrence in rank order. Raises ValueError when
    a key appears with two identities or the whole gallery is empty.
    """
    parts = dist.all_gather_objects(list(local.keys))
    keys = np.array([key for part in parts for key in part], dtype=str)
    if keys.size == 0:
        raise ValueError("the evaluation set has no gallery samples")
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    owner = first[inverse]  # position (in rank order) of the copy that counts
    pids = dist.all_gather_varlen(local.pids.cpu()).numpy()
    camids = dist.all_gather_varlen(local.camids.cpu()).numpy()
    clash = (pids != pids[owner]) | (camids != camids[owner])
    if clash.any():
        raise ValueError(
            f"sample {keys[int(clash.nonzero()[0][0])]!r} (gallery) appears twice with different "
            "pid/camera; keys must be unique"
        )
    offset = sum(len(part) for part in parts[: env.rank])
    mine = np.arange(offset, offset + len(local))
    own = (owner[mine] == mine).nonzero()[0]
    index = torch.from_numpy(inverse[mine][own].astype(np.int64)).to(local.pids.device)
    kept = local if own.size == len(local) else local.select(own.tolist())  # no copy of the features when all are ours
    return GalleryShard(local=kept, index=index, size=int(first.size))


def _gather_matches(rows: torch.Tensor, values: torch.Tensor, tie: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's (row, distance, tie index) lists, concatenated. Collective.

    Packed in float64, which holds float32/float64 distances and indices below 2**53 exactly; a leading
    dummy row keeps every rank's part non-empty.
    """
    packed = torch.stack([rows.double(), values.double(), tie.double()], 1)
    packed = torch.cat([packed.new_full((1, 3), -1.0), packed])
    everything = dist.all_gather_varlen(packed)
    everything = everything[everything[:, 0] >= 0]
    return everything[:, 0].long(), everything[:, 1].to(values.dtype), everything[:, 2].long()


def as_shard(gallery: Embeddings, env: DistEnv) -> GalleryShard:
    """A gathered gallery (sorted by key) cut into contiguous shares by index: rank r keeps r·G/R .. (r+1)·G/R."""
    size = len(gallery)
    lo, hi = env.rank * size // env.world_size, (env.rank + 1) * size // env.world_size
    return GalleryShard(
        local=gallery.select(list(range(lo, hi))), index=torch.arange(lo, hi, device=gallery.pids.device), size=size
    )


def shard_distance_fn(
    query: Embeddings, shard: GalleryShard, eval_cfg: Any, env: DistEnv
) -> Callable[[int, int], torch.Tensor]:
    """``(start, end) -> (end-start, share)`` ranking distances; collective to build when re-ranking (sparse only)."""
    local = shard.local
    g_feat = local.feats if len(local) else query.feats.new_zeros(0, query.feats.shape[1])
    if not eval_cfg.rerank:
        return chunk_distance_fn(query.feats, g_feat, q_mask=query.masks, metric=eval_cfg.distance)
    if eval_cfg.rerank_method != "sparse":
        raise ValueError(
            "eval.rerank_method=dense needs the gathered gallery: set eval.rerank_method=sparse "
            "or eval.shard_gallery=false"
        )
    from dpm_dist.eval.rerank_sparse import Peers, SparseReRanking

    return SparseReRanking(
        query.feats,
        g_feat,
        shard.index,
        shard.size,
        k1=eval_cfg.rerank_k1,
        k2=eval_cfg.rerank_k2,
        lambda_value=eval_cfg.rerank_lambda,
        peers=Peers(env.rank, env.world_size),
    ).chunk


def score_sharded(query: Embeddings, shard: GalleryShard, eval_cfg: Any, env: DistEnv) -> RankingSums:
    """All query chunks against this rank's share; the matches' ranks summed over ranks. Collective."""
    local = shard.local
    chunk_distance = shard_distance_fn(query, shard, eval_cfg, env)
    num_query = len(query)
    sums = RankingSums.zeros(num_query, effective_max_rank(eval_cfg.max_rank, shard.size), device=query.pids.device)
    order = torch.argsort(local.pids, stable=True)  # once, not per chunk
    for start, end in query_chunks(num_query, eval_cfg.query_chunk):
        distances = chunk_distance(start, end)
        m_rows, m_cols, j_rows, j_cols = true_matches(
            query.pids[start:end], local.pids, query.camids[start:end], local.camids, order
        )
        rows, values, tie = _gather_matches(m_rows, distances[m_rows, m_cols], shard.index[m_cols])
        match_val, match_tie, num_rel = match_table(rows, values, tie, end - start)
        counts = count_at_or_before(distances, shard.index, match_val, match_tie, j_rows, j_cols)
        sums.add_(valid_ranks(dist.all_reduce_sum(counts.contiguous()), num_rel), num_rel, start)
    return sums


def evaluate_sharded(query: Embeddings, shard: GalleryShard, eval_cfg: Any, env: DistEnv) -> RetrievalMetrics:
    """Metrics of gathered queries against a sharded gallery; the same floats on every rank. Collective."""
    return finalize(score_sharded(query, shard, eval_cfg, env), num_gallery=shard.size)
