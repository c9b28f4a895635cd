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
    sq = (feat ** 2).sum(1)
    original = np.maximum(sq[:, None] + sq[None, :] - 2 * feat @ feat.T, 0)
    original = original / original.max(axis=1, keepdims=True)
    rank = np.argsort(original, axis=1, kind="stable")
    V = np.zeros_like(original)
    for i in range(num_all):
        forward = rank[i, :k1 + 1]
        backward = rank[forward, :k1 + 1]
        recip = forward[np.where(backward == i)[0]]
        expansion = recip
        for cand in recip:
            cf = rank[cand, :int(np.around(k1 / 2)) + 1]
            cb = rank[cf, :int(np.around(k1 / 2)) + 1]
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
