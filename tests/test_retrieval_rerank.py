"""k-reciprocal re-ranking against the classic per-sample loop (Zhong et al. 2017, the reference's re_ranking)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpm_dist.eval.rerank import k_reciprocal_distance


def loop_rerank(q, g, k1, k2, lambda_value):
    """The classic numpy implementation written out sample by sample (float64, stable argsort)."""
    feat = F.normalize(torch.cat([q, g]).double()).numpy()
    num_q, num_all = q.shape[0], feat.shape[0]
    sq = (feat**2).sum(1)
    original = np.maximum(sq[:, None] + sq[None, :] - 2 * feat @ feat.T, 0)
    original = original / original.max(axis=1, keepdims=True)
    rank = np.argsort(original, axis=1, kind="stable")
    V = np.zeros_like(original)
    for i in range(num_all):
        forward = rank[i, : k1 + 1]
        backward = rank[forward, : k1 + 1]
        recip = forward[np.where(backward == i)[0]]
        expansion = recip
        for cand in recip:
            cf = rank[cand, : int(np.around(k1 / 2)) + 1]
            cb = rank[cf, : int(np.around(k1 / 2)) + 1]
            c_recip = cf[np.where(cb == cand)[0]]
            if len(np.intersect1d(c_recip, recip)) > 2 / 3 * len(c_recip):
                expansion = np.append(expansion, c_recip)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        V[i, expansion] = weight / weight.sum()
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(0) for i in range(num_all)])
    jaccard = np.zeros((num_q, num_all))
    for i in range(num_q):
        overlap = np.minimum(V[i][None, :], V).sum(1)
        jaccard[i] = 1 - overlap / (2 - overlap)
    final = jaccard * (1 - lambda_value) + original[:num_q] * lambda_value
    return final[:, num_q:]


@pytest.mark.parametrize("k1,k2", [(6, 3), (5, 1), (10, 4)])
def test_matches_the_per_sample_loop(k1, k2):
    g = torch.Generator().manual_seed(k1)
    centres = torch.randn(6, 12, generator=g)
    q = centres[torch.randint(0, 6, (9,), generator=g)] + 0.7 * torch.randn(9, 12, generator=g)
    gal = centres[torch.randint(0, 6, (40,), generator=g)] + 0.7 * torch.randn(40, 12, generator=g)
    expected = loop_rerank(q, gal, k1, k2, 0.3)
    got = k_reciprocal_distance(q, gal, k1=k1, k2=k2, lambda_value=0.3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-5)
    rows = k_reciprocal_distance(q, gal, k1=k1, k2=k2, lambda_value=0.3, query_range=(3, 7))
    assert torch.equal(rows, got[3:7])


def test_lambda_one_is_the_normalised_original_distance():
    g = torch.Generator().manual_seed(0)
    q, gal = torch.randn(4, 8, generator=g), torch.randn(10, 8, generator=g)
    got = k_reciprocal_distance(q, gal, k1=3, k2=2, lambda_value=1.0)
    feat = F.normalize(torch.cat([q, gal]))
    original = torch.cdist(feat, feat) ** 2
    expected = (original / original.max(dim=1, keepdim=True).values)[:4, 4:]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("k1,k2", [(6, 3), (5, 1), (10, 4), (20, 6)])
def test_sparse_rerank_equals_the_dense_one(k1, k2, monkeypatch):
    from dpm_dist.eval import rerank_sparse

    monkeypatch.setattr(rerank_sparse, "ROW_CHUNK", 7)  # several row chunks
    monkeypatch.setattr(rerank_sparse, "PAIR_CHUNK", 50)  # and several pair pieces per chunk
    g = torch.Generator().manual_seed(k1 + k2)
    centres = torch.randn(8, 12, generator=g)
    q = centres[torch.randint(0, 8, (13,), generator=g)] + 0.7 * torch.randn(13, 12, generator=g)
    gal = centres[torch.randint(0, 8, (57,), generator=g)] + 0.7 * torch.randn(57, 12, generator=g)
    dense = k_reciprocal_distance(q, gal, k1=k1, k2=k2, lambda_value=0.3)
    sparse = rerank_sparse.sparse_k_reciprocal_distance(q, gal, k1=k1, k2=k2, lambda_value=0.3)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-6)
    assert (dense < 0.3 * 1.0 + 0.7 - 1e-6).any()  # some pairs share k-reciprocal neighbours (Jaccard < 1)
    rows = rerank_sparse.sparse_k_reciprocal_distance(q, gal, k1=k1, k2=k2, lambda_value=0.3, query_range=(4, 11))
    torch.testing.assert_close(rows, sparse[4:11], rtol=0, atol=0)


# --- distributed by rows ------------------------------------------------------------------------------

CASES = [(13, 6, 3), (13, 5, 1), (1, 10, 4)]  # (queries, k1, k2); one query: a rank of 3 owns no row at all


def rerank_set(num_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity-structured queries and gallery with exact duplicates (tied neighbours)."""
    g = torch.Generator().manual_seed(num_q)
    centres = torch.randn(8, 12, generator=g)
    q = centres[torch.randint(0, 8, (num_q,), generator=g)] + 0.7 * torch.randn(num_q, 12, generator=g)
    gal = centres[torch.randint(0, 8, (57,), generator=g)] + 0.7 * torch.randn(57, 12, generator=g)
    gal[40:46] = gal[3:9]
    return q, gal


def gallery_share(env) -> list[int]:
    """Shuffled, uneven: rank 1 of 3 holds no gallery row."""
    order = torch.randperm(57, generator=torch.Generator().manual_seed(4)).tolist()
    return order if env.world_size == 1 else [order[:20], [], order[20:]][env.rank]


def distributed_rerank(env) -> dict:
    from dpm_dist.eval import rerank_sparse

    saved = rerank_sparse.ROW_CHUNK
    rerank_sparse.ROW_CHUNK = 5  # several row blocks per rank
    try:
        out = {}
        for num_q, k1, k2 in CASES:
            q, gal = rerank_set(num_q)
            share = gallery_share(env)
            reranked = rerank_sparse.SparseReRanking(
                q,
                gal[share],
                torch.tensor(share, dtype=torch.long),
                57,
                k1=k1,
                k2=k2,
                lambda_value=0.3,
                peers=rerank_sparse.Peers(env.rank, env.world_size),
            )
            out[(num_q, k1, k2)] = (share, reranked.chunk(0, num_q), reranked.chunk(num_q // 3, num_q // 3 + 4))
        return out
    finally:
        rerank_sparse.ROW_CHUNK = saved


def assemble(ranks: list[dict], case: tuple[int, int, int]) -> torch.Tensor:
    """The (Q, G) matrix from every rank's rows against its share; checks a caller's chunks give the same bits."""
    num_q = case[0]
    full = torch.full((num_q, 57), float("nan"))
    for share, rows, part in (r[case] for r in ranks):
        full[:, share] = rows
        assert torch.equal(part, rows[num_q // 3 : num_q // 3 + 4]), case
    return full


def test_row_distributed_sparse_rerank_with_ties_equals_the_dense_one_and_the_loop():
    from dpm_dist.dist import DistEnv

    result = distributed_rerank(DistEnv())
    for case in CASES:
        num_q, k1, k2 = case
        q, gal = rerank_set(num_q)
        full = assemble([result], case)
        torch.testing.assert_close(
            full, k_reciprocal_distance(q, gal, k1=k1, k2=k2, lambda_value=0.3), rtol=0, atol=1e-6
        )
        np.testing.assert_allclose(full.numpy(), loop_rerank(q, gal, k1, k2, 0.3), rtol=0, atol=1e-5)
