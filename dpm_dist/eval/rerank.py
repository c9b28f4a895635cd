"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) in torch, vectorised over samples.

As the official code would run it if its flag were wired (docs/method.md §7.6): squared Euclidean distances of
the L2-normalised features of queries and gallery together (masks ignored), each row divided by its
maximum, k-reciprocal sets expanded with the half-size sets of their members, Gaussian-weighted
encodings V, local query expansion over k2 neighbours, Jaccard distance, and
``final = (1-λ)·jaccard + λ·original``. Differences: V is kept in float32 (the reference stores float16),
the k-nearest-neighbour lists order equal distances by index (a stable argsort; the reference's unstable
argsort breaks a tie at the k-th neighbour arbitrarily), and only the requested query rows of the final
matrix are built. Memory is O((Q+G)²): three dense (Q+G)² float32 matrices at the peak.
"""

from __future__ import annotations

import torch

from dpm_dist.eval.retrieval import l2_normalize, match_table

ROW_CHUNK = 512  # rows processed at once in the (rows, k, k, k) membership tests


def _knn(dist: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) nearest neighbours of every row by (distance, index), nearest first (the row itself included).

    Exactly a stable argsort's first k: every item tied with the k-th is a candidate, then the index decides.
    """
    out = []
    for start in range(0, dist.shape[0], ROW_CHUNK):
        rows = dist[start : start + ROW_CHUNK]
        kth = torch.topk(rows, k, dim=1, largest=False).values[:, -1:]
        r, c = (rows <= kth).nonzero(as_tuple=True)
        out.append(match_table(r, rows[r, c], c, rows.shape[0])[1][:, :k])
    return torch.cat(out)


def _reciprocal(neighbours: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) mask: neighbour t of i is k-reciprocal, i.e. i is among that neighbour's k nearest."""
    top = neighbours[:, :k]
    self_index = torch.arange(top.shape[0], device=top.device)[:, None, None]
    return (neighbours[top][:, :, :k] == self_index).any(-1)


def _encodings(original: torch.Tensor, neighbours: torch.Tensor, k1: int) -> torch.Tensor:
    """V: row i holds exp(-d) over the expanded k-reciprocal set of i, normalised to sum 1."""
    num, device = original.shape[0], original.device
    half = int(round(k1 / 2))  # numpy's np.around: round half to even, like Python's round
    recip = _reciprocal(neighbours, k1 + 1)  # (N, k1+1)
    recip_half = _reciprocal(neighbours, half + 1)  # (N, half+1)
    top, top_half = neighbours[:, : k1 + 1], neighbours[:, : half + 1]
    encodings = torch.zeros_like(original)
    for start in range(0, num, ROW_CHUNK):
        rows = slice(start, min(start + ROW_CHUNK, num))
        members = torch.where(recip[rows], top[rows], num)  # (c, k1+1); num = "no member"
        cand_sets = top_half[members.clamp_max(num - 1)]  # (c, k1+1, half+1) half sets of the candidates
        cand_valid = recip_half[members.clamp_max(num - 1)] & (members < num)[:, :, None]
        inside = (cand_sets[..., None] == members[:, None, None, :]).any(-1) & cand_valid
        accept = inside.sum(-1) * 3 > 2 * cand_valid.sum(-1)  # |H_c ∩ R(i)| > 2/3 |H_c|
        expanded = torch.where(cand_valid & accept[..., None], cand_sets, num).flatten(1)
        chosen = torch.zeros((members.shape[0], num + 1), dtype=torch.bool, device=device)
        chosen.scatter_(1, torch.cat([members, expanded], 1), True)
        weight = torch.exp(-original[rows]) * chosen[:, :num]
        encodings[rows] = weight / weight.sum(1, keepdim=True)
    return encodings


def k_reciprocal_distance(
    q_feat: torch.Tensor,
    g_feat: torch.Tensor,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    query_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Re-ranked (Q, G) distances, or only rows ``query_range = (start, end)``; smaller is better."""
    num_q = q_feat.shape[0]
    if num_q + g_feat.shape[0] <= max(k1, k2):
        raise ValueError(
            f"re-ranking needs more than max(k1, k2) = {max(k1, k2)} samples, got {num_q + g_feat.shape[0]} "
            "(eval.rerank_k1 / eval.rerank_k2)"
        )
    feat = l2_normalize(torch.cat([q_feat, g_feat]).float())
    sq = (feat * feat).sum(1)
    original = (sq[:, None] + sq[None, :]).addmm_(feat, feat.T, alpha=-2.0).clamp_min_(0.0)
    original /= original.max(dim=1, keepdim=True).values.clamp_min(torch.finfo(original.dtype).tiny)
    neighbours = _knn(original, max(k1 + 1, k2))
    encodings = _encodings(original, neighbours, k1)
    if k2 != 1:
        expanded = torch.empty_like(encodings)
        for start in range(0, encodings.shape[0], ROW_CHUNK):
            rows = slice(start, start + ROW_CHUNK)
            expanded[rows] = encodings[neighbours[rows, :k2]].mean(1)
        encodings = expanded
    start, end = query_range if query_range is not None else (0, num_q)
    gallery_enc = encodings[num_q:]
    out = torch.empty((end - start, g_feat.shape[0]), dtype=original.dtype, device=original.device)
    for i in range(start, end):
        (support,) = encodings[i].nonzero(as_tuple=True)
        overlap = torch.minimum(encodings[i, support][None, :], gallery_enc[:, support]).sum(1)
        out[i - start] = (1.0 - overlap / (2.0 - overlap)) * (1.0 - lambda_value) + original[i, num_q:] * lambda_value
    return out
