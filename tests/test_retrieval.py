"""Retrieval distances and the Market protocol against hand-computed cases and a per-query reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpm_dist.eval.retrieval import (
    RankingSums,
    arccos_distance,
    cmc_map_minp,
    cosine_similarity,
    distance_matrix,
    euclidean_distance,
    evaluate_features,
    finalize,
    masked_cosine_similarity,
    match_ranks,
    query_chunks,
    ranking_distance,
    score_queries,
)


def per_query_reference(dist, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The official eval_func written out per query, plus fast-reid's mINP; ties by gallery index."""
    dist, q_pids, g_pids, q_camids, g_camids = (np.asarray(a) for a in (dist, q_pids, g_pids, q_camids, g_camids))
    max_rank = min(max_rank, dist.shape[1])
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(dist.shape[0]):
        order = np.argsort(dist[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
        raw = (g_pids[order] == q_pids[i])[keep].astype(np.int64)
        if not raw.any():
            continue
        cum = raw.cumsum()
        cmc = np.minimum(cum, 1)
        cmc = np.concatenate([cmc, np.ones(max(0, max_rank - cmc.size), dtype=cmc.dtype)])  # rank > kept items
        all_cmc.append(cmc[:max_rank])
        hardest = np.nonzero(raw)[0][-1]
        all_inp.append(cum[hardest] / (hardest + 1.0))
        all_ap.append(((cum / np.arange(1, raw.size + 1)) * raw).sum() / raw.sum())
    if not all_ap:
        raise ValueError("no valid query")
    return np.mean(np.stack(all_cmc), 0), float(np.mean(all_ap)), float(np.mean(all_inp)), len(all_ap)


def random_case(seed, num_q=37, num_g=211, num_ids=25, num_cams=4, levels=None):
    g = torch.Generator().manual_seed(seed)
    dist = torch.rand(num_q, num_g, generator=g)
    if levels is not None:  # quantised: many exact ties
        dist = (dist * levels).floor() / levels
    q_pids = torch.randint(0, num_ids + 5, (num_q,), generator=g)  # ids >= num_ids have no gallery match
    g_pids = torch.randint(0, num_ids, (num_g,), generator=g)
    return (
        dist,
        q_pids,
        g_pids,
        torch.randint(0, num_cams, (num_q,), generator=g),
        torch.randint(0, num_cams, (num_g,), generator=g),
    )


def assert_same_as_reference(metrics, ref):
    cmc, ap, inp, num_valid = ref
    assert metrics.num_valid == num_valid
    np.testing.assert_array_equal(metrics.cmc.numpy(), cmc)  # counts / num_valid: the same division
    assert metrics.mAP == pytest.approx(ap, rel=1e-12, abs=0)
    assert metrics.mINP == pytest.approx(inp, rel=1e-12, abs=0)


# --- hand-computed cases -----------------------------------------------------------------------------


def test_hand_computed_cmc_ap_minp_with_junk_removed():
    # Query pid 1, camera 0. Item 0 (pid 1, camera 0) is junk and removed. Kept order: 1 (pid 2), 2 (pid 1),
    # 3 (pid 3), 4 (pid 1): matches at ranks 2 and 4.
    dist = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    args = (torch.tensor([1]), torch.tensor([1, 2, 1, 3, 1]), torch.tensor([0]), torch.tensor([0, 1, 1, 1, 2]))
    m = cmc_map_minp(dist, *args, max_rank=3)
    assert m.cmc.tolist() == [0.0, 1.0, 1.0]
    assert m.mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m.mINP == pytest.approx(2 / 4)
    ranks, num_rel = match_ranks(dist, *args)
    assert ranks.tolist() == [[2, 4]] and num_rel.tolist() == [2]


def test_hand_computed_two_queries_and_a_skipped_one():
    # q0 (pid 0, cam 0): order 2 (pid0 cam1, match), 0 (pid1), 1 (pid0 cam2, match) -> ranks 1, 3.
    # q1 (pid 1, cam 1): order 1 (pid0), 0 (pid1 cam0, match), 2 (pid0) -> rank 2.
    # q2 (pid 7): no match in the gallery: skipped.
    dist = torch.tensor([[0.5, 0.9, 0.1], [0.4, 0.3, 0.8], [0.1, 0.2, 0.3]])
    m = cmc_map_minp(
        dist,
        torch.tensor([0, 1, 7]),
        torch.tensor([1, 0, 0]),
        torch.tensor([0, 1, 0]),
        torch.tensor([0, 2, 1]),
        max_rank=50,
    )
    assert m.num_valid == 2 and m.num_query == 3
    assert m.cmc.numel() == 3  # shortened to the gallery size, as the official code does
    assert m.cmc.tolist() == [0.5, 1.0, 1.0]
    assert m.mAP == pytest.approx(((1 / 1 + 2 / 3) / 2 + 1 / 2) / 2)
    assert m.mINP == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m.ap.tolist()[2] == 0.0 and m.num_rel.tolist() == [2, 1, 0]


def test_ties_are_ranked_by_gallery_index():
    # All distances equal: the kept order is the gallery order. Matches (pid 4, other camera) at 1 and 3;
    # item 2 is junk (pid 4, camera 0) and item 0 a distractor -> kept [0, 1, 3, 4]: matches at ranks 2, 3.
    dist = torch.full((1, 5), 0.25)
    m = cmc_map_minp(
        dist,
        torch.tensor([4]),
        torch.tensor([9, 4, 4, 4, 8]),
        torch.tensor([0]),
        torch.tensor([1, 1, 0, 2, 1]),
        max_rank=2,
    )
    assert m.cmc.tolist() == [0.0, 1.0]
    assert m.mAP == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m.mINP == pytest.approx(2 / 3)


def test_no_valid_query_is_an_error():
    dist = torch.rand(2, 3)
    with pytest.raises(ValueError, match="no query has a true match"):
        cmc_map_minp(dist, torch.tensor([0, 1]), torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.tensor([0, 1, 1]))


# --- against the per-query reference -----------------------------------------------------------------


@pytest.mark.parametrize("levels", [None, 7, 2])
@pytest.mark.parametrize("max_rank", [1, 10, 50])
def test_matches_per_query_reference_on_random_data_with_ties(levels, max_rank):
    for seed in range(3):
        case = random_case(seed, levels=levels)
        ref = per_query_reference(*(a.numpy() for a in case), max_rank=max_rank)
        assert_same_as_reference(cmc_map_minp(*case, max_rank=max_rank, query_chunk=5), ref)


def test_gallery_smaller_than_max_rank_and_short_kept_lists():
    case = random_case(3, num_q=9, num_g=6, num_ids=3, num_cams=2, levels=3)
    ref = per_query_reference(*(a.numpy() for a in case), max_rank=50)
    assert_same_as_reference(cmc_map_minp(*case, max_rank=50), ref)


def test_query_shards_sum_exactly_to_the_whole():
    dist, qp, gp, qc, gc = random_case(4, num_q=53, levels=5)
    whole = score_queries(lambda s, e: dist[s:e], qp, gp, qc, gc, chunks=query_chunks(53, 6), max_rank=20)
    parts = [
        score_queries(
            lambda s, e: dist[s:e], qp, gp, qc, gc, chunks=query_chunks(53, 6, rank=r, world_size=4), max_rank=20
        )
        for r in range(4)
    ]
    total = sum(p.flat() for p in parts)
    assert torch.equal(total, whole.flat())
    merged = finalize(RankingSums.from_flat(total, 53, 20), num_gallery=dist.shape[1])
    assert merged.mAP == finalize(whole, num_gallery=dist.shape[1]).mAP


def test_query_chunks_cover_every_query_once_with_fixed_boundaries():
    for num_q, chunk in [(0, 4), (1, 4), (10, 3), (2210, 256)]:
        reference = query_chunks(num_q, chunk)
        for world in (1, 2, 3, 8, 20):
            got = [c for r in range(world) for c in query_chunks(num_q, chunk, rank=r, world_size=world)]
            assert got == reference  # contiguous, in order, same boundaries at every world size
        assert [i for s, e in reference for i in range(s, e)] == list(range(num_q))


# --- distances ---------------------------------------------------------------------------------------


def official_masked_cosine(qf, gf, qm):
    """docs/method.md §7.4 per query, as the official cosine_single: normalize(m_i * normalize(gf)), then q̂·."""
    rows = [F.normalize(qf[i : i + 1]) @ F.normalize(qm[i : i + 1] * F.normalize(gf)).T for i in range(qf.shape[0])]
    return torch.cat(rows)


def features(seed, num_q=13, num_g=29, dim=48, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(num_q, dim, generator=g, dtype=dtype),
        torch.randn(num_g, dim, generator=g, dtype=dtype),
        torch.rand(num_q, dim, generator=g, dtype=dtype),
    )


def test_masked_cosine_equals_the_per_query_formula():
    qf, gf, qm = features(0)
    torch.testing.assert_close(
        masked_cosine_similarity(qf, qm, gf), official_masked_cosine(qf, gf, qm), rtol=0, atol=1e-13
    )
    qf, gf, qm = (t.float() for t in (qf, gf, qm))
    torch.testing.assert_close(
        masked_cosine_similarity(qf, qm, gf), official_masked_cosine(qf, gf, qm), rtol=0, atol=2e-6
    )


def test_masked_cosine_with_a_zero_mask_row_is_finite_like_the_eps_clamp():
    qf, gf, qm = features(1)
    qm[2] = 0.0
    cos = masked_cosine_similarity(qf, qm, gf)
    assert torch.isfinite(cos).all() and (cos[2] == 0).all()
    torch.testing.assert_close(cos, official_masked_cosine(qf, gf, qm), rtol=0, atol=1e-13)


def test_ranking_distance_is_the_negated_clipped_cosine_bit_for_bit():
    qf, gf, qm = features(2, dtype=torch.float32)
    assert torch.equal(distance_matrix(qf, gf, q_mask=qm), ranking_distance(masked_cosine_similarity(qf, qm, gf)))
    assert torch.equal(distance_matrix(qf, gf, metric="cosine"), ranking_distance(cosine_similarity(qf, gf)))
    torch.testing.assert_close(cosine_similarity(qf, gf), masked_cosine_similarity(qf, torch.ones_like(qm), gf))
    expected = torch.cdist(F.normalize(qf), F.normalize(gf)) ** 2
    torch.testing.assert_close(euclidean_distance(qf, gf), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="q_mask"):
        distance_matrix(qf, gf)


def test_clipped_arccos_order_equals_negated_clipped_cosine_order_with_clip_ties():
    # Near-duplicates: many cosines above 1-1e-5 become tied by the clip in both formulations.
    g = torch.Generator().manual_seed(5)
    gallery = torch.randn(60, 16, generator=g, dtype=torch.float64)
    query = gallery[torch.randint(0, 60, (20,), generator=g)] + 1e-4 * torch.randn(
        20, 16, generator=g, dtype=torch.float64
    )
    gallery = torch.cat([gallery, gallery[:30] + 1e-5 * torch.randn(30, 16, generator=g, dtype=torch.float64)])
    cos = cosine_similarity(query, gallery)
    assert (cos > 1 - 1e-5).sum() > 20
    q_pids, g_pids = torch.randint(0, 8, (20,), generator=g), torch.randint(0, 8, (90,), generator=g)
    q_cams, g_cams = torch.randint(0, 3, (20,), generator=g), torch.randint(0, 3, (90,), generator=g)
    by_arccos = cmc_map_minp(arccos_distance(cos), q_pids, g_pids, q_cams, g_cams)  # float64 arccos: no rounding ties
    by_key = cmc_map_minp(ranking_distance(cos), q_pids, g_pids, q_cams, g_cams)
    assert torch.equal(by_arccos.cmc, by_key.cmc) and by_arccos.mAP == by_key.mAP and by_arccos.mINP == by_key.mINP
    ranks_a, _ = match_ranks(arccos_distance(cos), q_pids, g_pids, q_cams, g_cams)
    ranks_k, _ = match_ranks(ranking_distance(cos), q_pids, g_pids, q_cams, g_cams)
    assert torch.equal(ranks_a, ranks_k)


@pytest.mark.parametrize("metric", ["masked_cosine", "cosine", "euclidean"])
def test_chunked_features_path_equals_the_full_matrix(metric):
    qf, gf, qm = features(6, num_q=41, num_g=97, dtype=torch.float32)
    g = torch.Generator().manual_seed(6)
    labels = (
        torch.randint(0, 12, (41,), generator=g),
        torch.randint(0, 12, (97,), generator=g),
        torch.randint(0, 3, (41,), generator=g),
        torch.randint(0, 3, (97,), generator=g),
    )
    full = cmc_map_minp(distance_matrix(qf, gf, q_mask=qm, metric=metric), *labels, max_rank=20)
    ref = per_query_reference(
        distance_matrix(qf, gf, q_mask=qm, metric=metric).numpy(), *(a.numpy() for a in labels), max_rank=20
    )
    assert_same_as_reference(full, ref)
    for chunk in (1, 8, 41, 500):
        got = evaluate_features(qf, gf, *labels, q_mask=qm, metric=metric, max_rank=20, query_chunk=chunk)
        assert torch.equal(got.cmc, full.cmc) and got.mAP == full.mAP and got.mINP == full.mINP


def test_benchmark_reference_way_gives_identical_metrics_in_float64():
    """benchmarks/eval_retrieval.py's identity claim at a small size: the official loop + eval_func vs ours."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "eval_retrieval", Path(__file__).parents[1] / "benchmarks" / "eval_retrieval.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    qf, gf, qm, qp, gp, qc, gc = bench.make_data(40, 300, 32, 30, 4, 1.5, torch.float64)
    ref = bench.reference_metrics(bench.reference_distances(qf, gf, qm), *(a.numpy() for a in (qp, gp, qc, gc)))
    ours, _ = bench.ours(qf, gf, qm, qp, gp, qc, gc, query_chunk=16)
    assert ours.keys() == ref.keys()
    assert all(ours[k] == pytest.approx(ref[k], rel=1e-12, abs=1e-15) for k in ref), (ours, ref)
    assert 0.0 < ours["mAP"] < 1.0


# --- non-finite and extreme distances (torchreid / fast-reid rank an inf distance last) ---------------------


def _with_extremes(dist: torch.Tensor, seed: int) -> torch.Tensor:
    """``dist`` with some +inf (masked pairs), some -inf, and a few values at float32's extremes."""
    g = torch.Generator().manual_seed(seed)
    out = dist.clone()
    pick = torch.rand(out.shape, generator=g)
    out[pick < 0.1] = float("inf")
    out[(pick >= 0.1) & (pick < 0.13)] = float("-inf")
    out[(pick >= 0.13) & (pick < 0.15)] = 3e38
    out[(pick >= 0.15) & (pick < 0.17)] = -3e38
    return out


@pytest.mark.parametrize("levels", [None, 3])
def test_inf_and_float32_extremes_rank_like_a_stable_sort(levels):
    for seed in range(3):
        dist, *ids = random_case(seed, levels=levels)
        dist = _with_extremes(dist, seed)
        ref = per_query_reference(dist.numpy(), *(a.numpy() for a in ids))
        assert_same_as_reference(cmc_map_minp(dist, *ids, query_chunk=5), ref)
        assert_same_as_reference(cmc_map_minp(dist.double(), *ids), ref)


def test_one_inf_distance_is_simply_last():
    dist = torch.tensor([[0.1, float("inf"), 0.3, 0.2]])
    q_pids, g_pids = torch.tensor([7]), torch.tensor([7, 7, 1, 2])
    metrics = cmc_map_minp(dist, q_pids, g_pids, torch.tensor([0]), torch.tensor([1, 1, 1, 1]))
    # matches at ranks 1 and 4 (the inf one last): AP = (1/1 + 2/4) / 2, mINP = 2/4
    assert metrics.mAP == pytest.approx(0.75) and metrics.mINP == pytest.approx(0.5)
    assert metrics.cmc[0] == 1.0


def test_nan_distances_are_refused_naming_how_many_queries():
    dist, *ids = random_case(0)
    dist[[2, 5, 9], [0, 3, 1]] = float("nan")
    dist[5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"^3 of 37 queries have NaN distances"):
        cmc_map_minp(dist, *ids, query_chunk=4)  # the count is over every chunk
