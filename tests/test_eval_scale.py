"""Gallery-sharded evaluation: bit-identical to the gathered path on 1 and 3 gloo ranks; shape-independent distances."""

from __future__ import annotations

import pytest
import torch
from test_evaluator import NUM_G, NUM_Q, rank_share, synthetic_embeddings
from test_retrieval_rerank import CASES, assemble, distributed_rerank

from dpm_dist.config import EvalConfig
from dpm_dist.dist import DistEnv
from dpm_dist.eval.evaluator import Embeddings, evaluate_embeddings, gather_embeddings, gather_queries, split_roles
from dpm_dist.eval.evaluator import _shard as shard_of
from dpm_dist.eval.retrieval import (
    count_at_or_before,
    distance_matrix,
    match_ranks,
    match_table,
    true_matches,
    valid_ranks,
)
from dpm_dist.eval.topk import topk_lists
from tests.conftest import run_ranks

CONFIGS = {
    "masked_cosine": EvalConfig(distance="masked_cosine", query_chunk=4, max_rank=20),
    "cosine": EvalConfig(distance="cosine", query_chunk=3, max_rank=50),
    "euclidean": EvalConfig(distance="euclidean", query_chunk=7, max_rank=10),
}


def tied_embeddings() -> Embeddings:
    """The evaluator tests' set plus clip ties: gallery items pointing the same way as their query."""
    data = synthetic_embeddings()
    data.feats[NUM_Q + 80 : NUM_Q + 86] = data.feats[:6] * 3.0  # cos = 1 up to rounding: all clipped to one value
    data.pids[NUM_Q + 80 : NUM_Q + 86] = data.pids[:6]
    return data


def by_role(local: Embeddings, role: str) -> Embeddings:
    return local.select([i for i, r in enumerate(local.roles) if r == role])


def scenarios(env: DistEnv) -> dict:
    data = tied_embeddings()
    local = data.select(rank_share(len(data), env.rank, env.world_size))
    query, gallery = split_roles(gather_embeddings(local))
    sharded_query, shard = gather_queries(by_role(local, "query")), shard_of(by_role(local, "gallery"), env)
    out = {"share": len(shard.local), "rerank_rows": distributed_rerank(env)}
    for method, q, g in (
        ("dense", query, gallery),
        ("sparse", query, gallery),
        ("sparse_sharded", sharded_query, shard),
    ):
        cfg = EvalConfig(rerank=True, rerank_method=method.split("_")[0], rerank_k1=6, rerank_k2=3, query_chunk=4)
        m = evaluate_embeddings(q, g, cfg, env)
        out["rerank_" + method] = dict(m.as_dict(), ap=m.ap.tolist())
        top = topk_lists(q, g, cfg, env, 7)
        out["rerank_top_" + method] = (top.index.tolist(), top.distance.tolist())
    for name, cfg in CONFIGS.items():
        gathered = evaluate_embeddings(query, gallery, cfg, env)
        sharded = evaluate_embeddings(sharded_query, shard, cfg, env)
        out[name] = dict(gathered.as_dict(), cmc=gathered.cmc.tolist(), ap=gathered.ap.tolist())
        out[name + "_sharded"] = dict(sharded.as_dict(), cmc=sharded.cmc.tolist(), ap=sharded.ap.tolist())
        for k in (5, NUM_G + 1):  # fewer than the gallery, more than it
            for kind, g in (("", gallery), ("_sharded", shard)):
                top = topk_lists(sharded_query if kind else query, g, cfg, env, k)
                out[f"{name}_top{k}{kind}"] = (top.index.tolist(), top.distance.tolist())
    return out


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> tuple[dict, list[dict]]:
    """``scenarios`` in one process and on 3 gloo ranks (spawned once for the tests below)."""
    folder = tmp_path_factory.mktemp("worlds")
    return run_ranks(scenarios, 1, folder / "w1")[0], run_ranks(scenarios, 3, folder / "w3")


@pytest.mark.slow
def test_sharded_equals_gathered_on_1_and_3_ranks(worlds):
    single, multi = worlds
    assert [r["share"] for r in multi][1] == 0 and sum(
        r["share"] for r in multi
    ) == NUM_G  # an empty rank, no duplicates
    for name in CONFIGS:
        assert single[name + "_sharded"] == single[name], name
        for rank_result in multi:
            assert rank_result[name + "_sharded"] == single[name], name
            assert rank_result[name] == single[name], name
            for k in (5, NUM_G + 1):
                assert rank_result[f"{name}_top{k}_sharded"] == single[f"{name}_top{k}"], (name, k)
                assert rank_result[f"{name}_top{k}"] == single[f"{name}_top{k}"], (name, k)
    assert 0 < single["masked_cosine"]["num_valid_query"] < NUM_Q  # queries without a match are skipped
    for kind in ("rerank_sparse", "rerank_top_sparse"):  # distributed by rows; a sharded gallery gives the same
        assert single[kind + "_sharded"] == single[kind] and all(
            r[kind] == single[kind] and r[kind + "_sharded"] == single[kind] for r in multi
        ), kind
    assert single["rerank_sparse"]["mAP"] == pytest.approx(single["rerank_dense"]["mAP"], abs=1e-12)
    assert single["rerank_top_sparse"][0] == single["rerank_top_dense"][0]
    index, distance = single["masked_cosine_top5"]
    assert all(row == sorted(row) for row in distance) and min(map(min, index)) >= 0
    index, distance = single["masked_cosine_top102"]
    assert min(map(min, index)) == -1 and all(i.count(-1) == d.count(float("inf")) for i, d in zip(index, distance))


@pytest.mark.slow
def test_row_distributed_sparse_rerank_has_the_same_bits_on_1_and_3_ranks(worlds):
    """Uneven gallery shares (one empty), a rank owning no row at all (one query), ties: the 1-process floats,
    which equal the dense re-ranking (tests/test_retrieval_rerank.py)."""
    single, multi = worlds
    for case in CASES:
        assert torch.equal(assemble([r["rerank_rows"] for r in multi], case), assemble([single["rerank_rows"]], case))


# --- one process -------------------------------------------------------------------------------------


def test_a_distance_has_the_same_bits_in_any_gallery():
    g = torch.Generator().manual_seed(0)
    q, gal, mask = torch.randn(5, 64, generator=g), torch.randn(700, 64, generator=g), torch.rand(5, 64, generator=g)
    for metric in ("masked_cosine", "cosine", "euclidean"):
        full = distance_matrix(q, gal, q_mask=mask, metric=metric)
        perm = torch.randperm(700, generator=g)
        assert torch.equal(distance_matrix(q, gal[perm], q_mask=mask, metric=metric), full[:, perm]), metric
        for start, size in ((0, 1), (3, 7), (250, 300)):
            part = distance_matrix(q, gal[start : start + size], q_mask=mask, metric=metric)
            assert torch.equal(part, full[:, start : start + size]), (metric, start, size)


def test_counts_over_disjoint_parts_add_up_to_the_match_ranks():
    g = torch.Generator().manual_seed(3)
    num_q, num_g = 9, 60
    dist = torch.randint(0, 6, (num_q, num_g), generator=g).float()  # many ties
    q_pids, g_pids = torch.randint(0, 4, (num_q,), generator=g), torch.randint(0, 4, (num_g,), generator=g)
    q_cams, g_cams = torch.randint(0, 2, (num_q,), generator=g), torch.randint(0, 2, (num_g,), generator=g)
    expected, num_rel = match_ranks(dist, q_pids, g_pids, q_cams, g_cams)
    parts = torch.randperm(num_g, generator=g).tensor_split([0, 25, 25, 41])  # one empty part
    pieces = [true_matches(q_pids, g_pids[p], q_cams, g_cams[p]) for p in parts]
    rows = torch.cat([m_rows for m_rows, *_ in pieces])
    values = torch.cat([dist[:, p][m_rows, m_cols] for p, (m_rows, m_cols, _, _) in zip(parts, pieces)])
    match_val, match_tie, rel = match_table(
        rows, values, torch.cat([p[m_cols] for p, (_, m_cols, _, _) in zip(parts, pieces)]), num_q
    )
    total = sum(
        count_at_or_before(dist[:, p].contiguous(), p, match_val, match_tie, j_rows, j_cols)
        for p, (_, _, j_rows, j_cols) in zip(parts, pieces)
    )
    assert torch.equal(rel, num_rel) and torch.equal(valid_ranks(total, rel), expected)


def brute_force_ranks(dist, q_pids, g_pids, q_cams, g_cams) -> list[list[int]]:
    """Each query's true-match ranks by a stable sort of its kept items (distance, then gallery index)."""
    out = []
    for i in range(dist.shape[0]):
        kept = [j for j in range(dist.shape[1]) if not (g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i])]
        order = sorted(kept, key=lambda j: (float(dist[i, j]), j))
        out.append([r + 1 for r, j in enumerate(order) if g_pids[j] == q_pids[i]])
    return out


@pytest.mark.parametrize("cells,piece", [(4, 7), (64, 33), (16384, 8192)])
def test_match_ranks_by_cells_equal_a_stable_sort(cells, piece, monkeypatch):
    """The cell look-up and column pieces give the binary search's integers: ties, collisions, coarse cells."""
    from dpm_dist.eval import retrieval

    monkeypatch.setattr(retrieval, "CELLS", cells)
    monkeypatch.setattr(retrieval, "RANK_PIECE", piece)
    g = torch.Generator().manual_seed(cells)
    for dist in (
        torch.randint(0, 9, (7, 300), generator=g).float(),
        torch.rand(7, 300, generator=g) ** 4,
        torch.full((7, 300), 0.25),
    ):
        q_pids, g_pids = torch.randint(0, 5, (7,), generator=g), torch.randint(0, 5, (300,), generator=g)
        q_cams, g_cams = torch.randint(0, 2, (7,), generator=g), torch.randint(0, 2, (300,), generator=g)
        ranks, num_rel = match_ranks(dist, q_pids, g_pids, q_cams, g_cams)
        got = [ranks[i, :n].tolist() for i, n in enumerate(num_rel.tolist())]
        assert got == brute_force_ranks(dist, q_pids, g_pids, q_cams, g_cams)


def test_dense_rerank_with_a_sharded_gallery_is_an_error_naming_the_fields():
    data = tied_embeddings()
    query, shard = gather_queries(by_role(data, "query")), shard_of(by_role(data, "gallery"), DistEnv())
    with pytest.raises(
        ValueError, match="eval.rerank_method=dense.*eval.rerank_method=sparse.*eval.shard_gallery=false"
    ):
        evaluate_embeddings(query, shard, EvalConfig(rerank=True, rerank_method="dense"), DistEnv())
    with pytest.raises(ValueError, match="eval.rerank_method.*dense.*eval.shard_gallery=true"):
        EvalConfig(rerank=True, rerank_method="dense", shard_gallery=True)


def test_a_gallery_key_with_two_identities_is_an_error():
    gallery = by_role(synthetic_embeddings(), "gallery").select([0, 1, 0])
    gallery.pids[2] = gallery.pids[0] + 1
    with pytest.raises(ValueError, match="appears twice with different pid"):
        shard_of(gallery, DistEnv())
