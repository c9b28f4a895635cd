"""k-reciprocal re-ranking from sparse k-nearest-neighbour lists (``eval.rerank_method=sparse``).

The same steps as :mod:`dpm_dist.eval.rerank` (Zhong et al. 2017, docs/method.md §7.6) without the dense
(Q+G)² matrices: memory O((Q+G)·k1·k2) plus one chunk of rows.

1. Original distances in row chunks (the dense formula, squared Euclidean of normalised features, each
   row divided by its maximum, which the chunk pass also finds): only each row's K = max(k1+1, k2)
   nearest neighbours and the row maximum are kept.
2. Encodings V: per row at most (k1+1)·(round(k1/2)+2) nonzeros (the expanded k-reciprocal set); their
   weights exp(-d) need d for members outside the row's own neighbour list, computed pair by pair from
   the features.
3. Query expansion: the mean of the k2 neighbours' sparse rows.
4. Jaccard through an inverted index (column -> gallery rows), the official code's ``invIndex``: only
   pairs sharing a column have a nonzero overlap; every other pair has Jaccard distance exactly 1, as in
   the dense matrix. The final ``(1-λ)·jaccard + λ·original`` is built for a chunk of queries against
   the whole gallery, the original distances recomputed for that chunk.

Nothing is approximated: every pair gets the dense implementation's value. The floats differ by rounding
only (a pair distance computed alone rounds differently from the same entry of a big product, sums
run in another order), to ~1e-6, which can reorder neighbours only at exact-tie level.
Not distributed: every rank holds the gathered features (Q+G)·D.
"""

from __future__ import annotations

from typing import Optional

import torch

from dpm_dist.eval.retrieval import l2_normalize

ROW_CHUNK = 256
PAIR_CHUNK = 1 << 22  # (query entry, gallery row) pairs accumulated at once in the Jaccard step


def _original_rows(feat: torch.Tensor, sq: torch.Tensor, rows: slice, cols: slice = slice(None)) -> torch.Tensor:
    return (sq[rows, None] + sq[None, cols]).addmm_(feat[rows], feat[cols].T, alpha=-2.0).clamp_min_(0.0)


def _neighbours(feat: torch.Tensor, sq: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, k) nearest neighbours (stable tie order, as the dense _knn) and (N,) row maxima."""
    num = feat.shape[0]
    out, maxima = [], []
    for start in range(0, num, ROW_CHUNK):
        rows = _original_rows(feat, sq, slice(start, start + ROW_CHUNK))
        top = rows.max(dim=1, keepdim=True).values.clamp_min(torch.finfo(rows.dtype).tiny)
        rows /= top
        val, idx = torch.topk(rows, k, dim=1, largest=False, sorted=True)
        order = torch.argsort(idx, dim=1)
        val, idx = val.gather(1, order), idx.gather(1, order)
        out.append(idx.gather(1, torch.argsort(val, dim=1, stable=True)))
        maxima.append(top.squeeze(1))
    return torch.cat(out), torch.cat(maxima)


def _reciprocal(neighbours: torch.Tensor, k: int) -> torch.Tensor:
    top = neighbours[:, :k]
    return (neighbours[top][:, :, :k] == torch.arange(top.shape[0], device=top.device)[:, None, None]).any(-1)


def _pair_distance(feat: torch.Tensor, sq: torch.Tensor, maxima: torch.Tensor, rows: torch.Tensor,
                   cols: torch.Tensor) -> torch.Tensor:
    """Normalised original distance of (rows[i], cols[i, s]) pairs."""
    dot = torch.einsum("cd,csd->cs", feat[rows], feat[cols])
    return (sq[rows, None] + sq[cols] - 2.0 * dot).clamp_min_(0.0) / maxima[rows, None]


def _encodings(feat, sq, maxima, neighbours, k1) -> tuple[torch.Tensor, torch.Tensor]:
    """V as padded rows: (N, S) column indices (N = none) and weights (0 there)."""
    num, device = feat.shape[0], feat.device
    half = int(round(k1 / 2))
    recip, recip_half = _reciprocal(neighbours, k1 + 1), _reciprocal(neighbours, half + 1)
    top, top_half = neighbours[:, :k1 + 1], neighbours[:, :half + 1]
    idx_parts, val_parts = [], []
    for start in range(0, num, ROW_CHUNK):
        rows = torch.arange(start, min(start + ROW_CHUNK, num), device=device)
        members = torch.where(recip[rows], top[rows], num)
        cand_sets = top_half[members.clamp_max(num - 1)]
        cand_valid = recip_half[members.clamp_max(num - 1)] & (members < num)[:, :, None]
        inside = (cand_sets[..., None] == members[:, None, None, :]).any(-1) & cand_valid
        accept = inside.sum(-1) * 3 > 2 * cand_valid.sum(-1)
        expanded = torch.where(cand_valid & accept[..., None], cand_sets, num).flatten(1)
        cols = torch.cat([members, expanded], 1).sort(dim=1).values
        cols[:, 1:][cols[:, 1:] == cols[:, :-1]] = num  # each member once
        cols = cols.sort(dim=1).values
        weight = torch.exp(-_pair_distance(feat, sq, maxima, rows, cols.clamp_max(num - 1))) * (cols < num)
        idx_parts.append(cols)
        val_parts.append(weight / weight.sum(1, keepdim=True))
    return torch.cat(idx_parts), torch.cat(val_parts)


def _coalesce(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, num: int) -> tuple[torch.Tensor, ...]:
    """COO entries with duplicates summed and the "none" column (num) dropped, sorted by (row, col)."""
    keep = cols < num
    key = rows[keep] * (num + 1) + cols[keep]
    uniq, inverse = torch.unique(key, return_inverse=True)
    summed = torch.zeros(uniq.numel(), dtype=vals.dtype, device=vals.device).index_add_(0, inverse, vals[keep])
    return uniq // (num + 1), uniq % (num + 1), summed


def _expanded(v_idx: torch.Tensor, v_val: torch.Tensor, neighbours: torch.Tensor, k2: int) -> tuple[torch.Tensor, ...]:
    """Query expansion as COO (rows, cols, vals): the mean of each row's k2 nearest rows of V."""
    num = v_idx.shape[0]
    if k2 == 1:
        rows = torch.arange(num, device=v_idx.device)[:, None].expand_as(v_idx)
        return _coalesce(rows.flatten(), v_idx.flatten(), v_val.flatten(), num)
    parts = []
    for start in range(0, num, ROW_CHUNK):
        near = neighbours[start:start + ROW_CHUNK, :k2]  # (c, k2)
        cols, vals = v_idx[near].flatten(1), v_val[near].flatten(1) / k2
        rows = torch.arange(start, start + near.shape[0], device=v_idx.device)[:, None].expand_as(cols)
        parts.append(_coalesce(rows.flatten(), cols.flatten(), vals.flatten(), num))
    return tuple(torch.cat(p) for p in zip(*parts))


def sparse_k_reciprocal_distance(q_feat: torch.Tensor, g_feat: torch.Tensor, *, k1: int = 20, k2: int = 6,
                                 lambda_value: float = 0.3, query_range: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Re-ranked (Q, G) distances (or rows ``query_range``), equal to ``rerank.k_reciprocal_distance`` up to rounding."""
    num_q, num_g = q_feat.shape[0], g_feat.shape[0]
    if num_q + num_g <= max(k1, k2):
        raise ValueError(f"re-ranking needs more than max(k1, k2) = {max(k1, k2)} samples, got {num_q + num_g} "
                         "(eval.rerank_k1 / eval.rerank_k2)")
    feat = l2_normalize(torch.cat([q_feat, g_feat]).float())
    sq = (feat * feat).sum(1)
    neighbours, maxima = _neighbours(feat, sq, max(k1 + 1, k2))
    rows, cols, vals = _expanded(*_encodings(feat, sq, maxima, neighbours, k1), neighbours, k2)
    # Inverted index over the gallery rows: column m -> (gallery row, weight), sorted by column.
    is_gallery = rows >= num_q
    g_rows, g_cols, g_vals = rows[is_gallery] - num_q, cols[is_gallery], vals[is_gallery]
    order = torch.argsort(g_cols, stable=True)
    g_rows, g_cols, g_vals = g_rows[order], g_cols[order], g_vals[order]
    col_count = torch.bincount(g_cols, minlength=feat.shape[0])
    col_start = torch.cumsum(col_count, 0) - col_count
    row_start = torch.searchsorted(rows, torch.arange(num_q + 1, device=rows.device))  # rows are sorted
    start, end = query_range if query_range is not None else (0, num_q)
    out = torch.empty((end - start, num_g), dtype=feat.dtype, device=feat.device)
    for lo in range(start - start % ROW_CHUNK, end, ROW_CHUNK):  # fixed chunks: the same floats for any range
        hi = min(lo + ROW_CHUNK, num_q)
        overlap = _overlap(rows, cols, vals, row_start, lo, hi, g_rows, g_vals, col_start, col_count, num_g)
        original = _original_rows(feat, sq, slice(lo, hi), slice(num_q, None)) / maxima[lo:hi, None]
        final = (1.0 - overlap / (2.0 - overlap)) * (1.0 - lambda_value) + original * lambda_value
        a, b = max(lo, start), min(hi, end)
        out[a - start:b - start] = final[a - lo:b - lo]
    return out


def _overlap(rows, cols, vals, row_start, lo, hi, g_rows, g_vals, col_start, col_count, num_g) -> torch.Tensor:
    """(hi-lo, G) sum over shared columns of min(V_i, V_j), pair lists cut to PAIR_CHUNK."""
    overlap = torch.zeros((hi - lo, num_g), dtype=vals.dtype, device=vals.device)
    first, last = int(row_start[lo]), int(row_start[hi])
    counts = col_count[cols[first:last]]
    cum = torch.cumsum(counts, 0)
    begin = first
    while begin < last:
        stop = first + int(torch.searchsorted(cum, int(cum[begin - first] - counts[begin - first]) + PAIR_CHUNK, right=True))
        stop = min(max(stop, begin + 1), last)
        q_rows, q_cols, q_vals = rows[begin:stop] - lo, cols[begin:stop], vals[begin:stop]
        num = col_count[q_cols]
        entry = torch.repeat_interleave(torch.arange(num.numel(), device=num.device), num)
        within = torch.arange(entry.numel(), device=num.device) - (torch.cumsum(num, 0) - num)[entry]
        pos = col_start[q_cols][entry] + within
        flat = q_rows[entry] * num_g + g_rows[pos]
        overlap.view(-1).index_add_(0, flat, torch.minimum(q_vals[entry], g_vals[pos]))
        begin = stop
    return overlap
