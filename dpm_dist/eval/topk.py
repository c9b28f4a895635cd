"""Each query's top-k gallery items (``eval.topk``), from a local top-k per rank and one merge.

The order is the evaluator's: kept items only (the query's own pid *and* camera removed, as in the
metrics and the pictures), by ranking distance, ties by global gallery index (the position of the key in
the sorted gallery keys), so the lists do not depend on the number of ranks or on the gallery being
sharded. Each rank keeps at most k candidates per query from its part (all queries against its share
with ``eval.shard_gallery``, else its query chunks against the whole gallery); one all-gather of those
(Q·k per rank) and a sort give the lists. Memory per rank: one chunk's distances plus R·Q·k candidates.

Files (rank 0): ``topk.parquet`` (pyarrow, installed with Ray: one row per query, list columns; compact
and typed, read back with ``pandas.read_parquet``/``pyarrow``; the default) or ``topk.jsonl`` (one JSON
object per query line, for quick inspection). Columns: ``query``, ``pid``, ``camid``, ``gallery`` (keys,
best first), ``distance`` (the official values: arccos of the clipped cosine for the cosine metrics, in
float64, the squared Euclidean distance, or the re-ranked distance), ``gallery_pid``, ``gallery_camid``, ``match``
(same pid: a true match, as the junk is removed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dpm_dist import dist
from dpm_dist.dist import DistEnv
from dpm_dist.eval.retrieval import chunk_distance_fn, match_table, query_chunks, true_matches


@dataclass
class TopK:
    """(Q, k) global gallery indices (-1 past a query's kept items) and ranking distances (inf there)."""

    index: torch.Tensor
    distance: torch.Tensor


def local_candidates(
    distances: torch.Tensor, tie: torch.Tensor, junk_rows: torch.Tensor, junk_cols: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This part's k best kept items per row as flat (row, distance, tie) lists. Overwrites ``distances``."""
    empty = torch.zeros(0, dtype=torch.int64, device=distances.device)
    width = min(k, distances.shape[1])
    if width == 0:
        return empty, distances.new_zeros(0), empty
    distances[junk_rows, junk_cols] = float("inf")
    kth = distances.topk(width, dim=1, largest=False).values[:, -1:]
    inside = distances <= kth  # every item that can be among the k, ties at the k-th included
    inside[junk_rows, junk_cols] = False
    rows, cols = inside.nonzero(as_tuple=True)
    return _trim(rows, distances[rows, cols], tie[cols], distances.shape[0], k)


def _trim(
    rows: torch.Tensor, values: torch.Tensor, tie: torch.Tensor, num_rows: int, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first k of each row by (distance, tie), as flat lists."""
    val, idx, _ = match_table(rows, values, tie, num_rows)
    val, idx = val[:, :k], idx[:, :k]
    keep = torch.isfinite(val)
    rows = torch.arange(num_rows, device=val.device)[:, None].expand_as(val)
    return rows[keep], val[keep], idx[keep]


def merge(rows: torch.Tensor, values: torch.Tensor, tie: torch.Tensor, num_query: int, k: int) -> TopK:
    """Every rank's candidates, gathered and cut to the k best per query. Collective."""
    packed = torch.stack([rows.double(), values.double(), tie.double()], 1)
    packed = torch.cat([packed.new_full((1, 3), -1.0), packed])  # never an empty part
    everything = dist.all_gather_varlen(packed)
    everything = everything[everything[:, 0] >= 0]
    val, idx, _ = match_table(
        everything[:, 0].long(), everything[:, 1].to(values.dtype), everything[:, 2].long(), num_query
    )
    width = val.shape[1]
    if width < k:
        val = torch.cat([val, val.new_full((num_query, k - width), float("inf"))], 1)
        idx = torch.cat([idx, idx.new_full((num_query, k - width), -1)], 1)
    val, idx = val[:, :k], idx[:, :k]
    return TopK(index=torch.where(torch.isfinite(val), idx, -1), distance=val)


def topk_lists(query: Any, gallery: Any, eval_cfg: Any, env: DistEnv, k: int, *, exclude_junk: bool = True) -> TopK:
    """The top-k of every query of ``query`` in a gathered gallery or a GalleryShard. Collective.

    ``exclude_junk=False`` (dpm-search's default) keeps the items of the query's own pid and camera.
    """
    from dpm_dist.eval.sharded import GalleryShard, as_shard

    if eval_cfg.rerank and eval_cfg.rerank_method == "sparse" and not isinstance(gallery, GalleryShard):
        gallery = as_shard(gallery, env)  # sparse re-ranking is distributed by gallery rows
    sharded = isinstance(gallery, GalleryShard)
    local = gallery.local if sharded else gallery
    tie = gallery.index if sharded else torch.arange(len(local), device=local.pids.device)
    chunks = query_chunks(
        len(query), eval_cfg.query_chunk, rank=0 if sharded else env.rank, world_size=1 if sharded else env.world_size
    )
    chunk_distance = _chunk_distance(query, gallery, eval_cfg, env, chunks)
    found = []
    for start, end in chunks:
        _, _, j_rows, j_cols = true_matches(query.pids[start:end], local.pids, query.camids[start:end], local.camids)
        if not exclude_junk:
            j_rows, j_cols = j_rows[:0], j_cols[:0]
        rows, values, ties = local_candidates(chunk_distance(start, end), tie, j_rows, j_cols, k)
        found.append((rows + start, values, ties))
    if found:
        rows, values, ties = (torch.cat(parts) for parts in zip(*found))
    else:
        rows = ties = torch.zeros(0, dtype=torch.int64, device=query.pids.device)
        values = query.feats.new_zeros(0)
    return merge(rows, values, ties, len(query), k)


def _chunk_distance(
    query: Any, gallery: Any, eval_cfg: Any, env: DistEnv, chunks: list[tuple[int, int]]
) -> Callable[[int, int], torch.Tensor]:
    from dpm_dist.eval.sharded import GalleryShard, shard_distance_fn

    if isinstance(gallery, GalleryShard):
        return shard_distance_fn(query, gallery, eval_cfg, env)
    if eval_cfg.rerank:
        from dpm_dist.eval.evaluator import _reranked_chunks

        return _reranked_chunks(query, gallery, eval_cfg, chunks)
    return chunk_distance_fn(query.feats, gallery.feats, q_mask=query.masks, metric=eval_cfg.distance)


def gallery_rows(gallery: Any, wanted: torch.Tensor) -> Any:
    """Embeddings of the wanted global gallery indices, sorted by index, on every rank. Collective."""
    from dpm_dist.eval.evaluator import gather_embeddings
    from dpm_dist.eval.sharded import GalleryShard

    wanted = torch.unique(wanted[wanted >= 0])
    if not isinstance(gallery, GalleryShard):
        return gallery.select(wanted.tolist())
    order = torch.argsort(gallery.index)
    pos = torch.searchsorted(gallery.index[order], wanted).clamp_max(max(len(order) - 1, 0))
    hit = gallery.index[order][pos] == wanted if len(order) else torch.zeros_like(wanted, dtype=torch.bool)
    mine = gallery.local.select(order[pos[hit]].tolist())
    mine.masks = torch.zeros_like(mine.feats)  # a shard keeps no gallery masks (the metric uses the query's)
    return gather_embeddings(mine)  # sorted by key, which is the global index order


def official_distance(ranking: list[float], metric: str, reranked: bool) -> list[float]:
    """The reported values of one list: arccos(clip(cos)) for the cosine metrics (ranking = -clip(cos)).

    In float64 by Python's ``math.acos``: a vectorised arccos rounds differently in a tensor's tail, so a
    value's last bit would depend on where it sits.
    """
    if metric == "euclidean" or reranked:
        return ranking
    return [math.acos(min(1.0, max(-1.0, -value))) for value in ranking]


def _id(value: Any) -> int | None:
    """A pid or camid as written: None where unknown (negative; dpm-search's images without a parseable name)."""
    return int(value) if int(value) >= 0 else None


def write_topk(
    out_dir: str, query: Any, gallery: Any, eval_cfg: Any, env: DistEnv, *, exclude_junk: bool = True
) -> str | None:
    """Compute the lists (collective) and write them on rank 0; returns the file's path there."""
    if eval_cfg.topk <= 0:
        return None
    top = topk_lists(query, gallery, eval_cfg, env, eval_cfg.topk, exclude_junk=exclude_junk)
    items = gallery_rows(gallery, top.index.flatten())
    if not env.is_main:
        return None
    position = {int(i): n for n, i in enumerate(torch.unique(top.index[top.index >= 0]).tolist())}
    records = []
    for q in range(len(query)):
        cols = [position[int(i)] for i in top.index[q].tolist() if i >= 0]
        records.append(
            {
                "query": query.keys[q],
                "pid": _id(query.pids[q]),
                "camid": _id(query.camids[q]),
                "gallery": [items.keys[c] for c in cols],
                "distance": official_distance(
                    top.distance[q, : len(cols)].tolist(), eval_cfg.distance, eval_cfg.rerank
                ),
                "gallery_pid": [_id(items.pids[c]) for c in cols],
                "gallery_camid": [_id(items.camids[c]) for c in cols],
                "match": [bool(items.pids[c] == query.pids[q] >= 0) for c in cols],
            }
        )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"topk.{eval_cfg.topk_format}")
    if eval_cfg.topk_format == "jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


def picture_gallery(query: Any, gallery: Any, metrics: Any, eval_cfg: Any, env: DistEnv) -> Any:
    """The gallery the pictures need: a gathered one as it is; of a shard, the pictured queries' top items. Collective.

    Each pictured query's ``eval.picture_topk`` best kept items are among these (its own top-k is), and
    they are sorted by global index, so the pictures' ranked lists are those of the whole gallery.
    """
    from dpm_dist.eval.retrieval import pick_queries
    from dpm_dist.eval.sharded import GalleryShard

    if not isinstance(gallery, GalleryShard) or not eval_cfg.num_pictures:
        return gallery
    pictured = query.select(pick_queries(metrics.ap, metrics.num_rel, eval_cfg.num_pictures))
    plain = dataclasses.replace(eval_cfg, rerank=False)  # the pictures rank by the plain distance (write_pictures)
    top = topk_lists(pictured, gallery, plain, env, eval_cfg.picture_topk)
    return gallery_rows(gallery, top.index.flatten())
