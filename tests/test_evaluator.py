"""The distributed evaluator: identical metrics on 1 and 3 real gloo processes, uneven splits, dedupe by key."""

from __future__ import annotations

import pytest
import torch
from test_retrieval import per_query_reference

from dpm_dist.config import EvalConfig
from dpm_dist.dist import DistEnv
from dpm_dist.eval.evaluator import (
    Embeddings,
    evaluate_embeddings,
    extract,
    extract_and_gather,
    gather_embeddings,
    split_roles,
)
from dpm_dist.eval.retrieval import evaluate_features
from tests.conftest import run_ranks

NUM_Q, NUM_G, DIM = 23, 101, 16  # 101 gallery items: no even split over 3 ranks
TINY_MODEL = dict(
    backbone="vit_base_patch16_224",
    embed_dim=32,
    depth=2,
    num_heads=4,
    tap_blocks=(1, 2),
    drop_path=0.0,
    img_size=(64, 32),
    patch_size=8,
    stride=(6, 6),
    num_classes=5,
    num_cams=3,
)


def synthetic_embeddings() -> Embeddings:
    """Queries and gallery with identity structure, exact duplicate gallery features (ties) and
    queries whose identity is absent from the gallery."""
    g = torch.Generator().manual_seed(11)
    centres = torch.randn(14, DIM, generator=g)
    q_pids = torch.randint(0, 14, (NUM_Q,), generator=g)  # ids 12, 13 never appear in the gallery
    g_pids = torch.randint(0, 12, (NUM_G,), generator=g)
    feats = torch.cat([centres[q_pids], centres[g_pids]]) + 0.9 * torch.randn(NUM_Q + NUM_G, DIM, generator=g)
    feats[NUM_Q + 60 : NUM_Q + 70] = feats[NUM_Q : NUM_Q + 10]  # exact duplicates: tied distances
    masks = torch.rand(NUM_Q + NUM_G, DIM, generator=g)
    return Embeddings(
        keys=[f"q{i:03d}" for i in range(NUM_Q)] + [f"g{j:03d}" for j in range(NUM_G)],
        roles=["query"] * NUM_Q + ["gallery"] * NUM_G,
        pids=torch.cat([q_pids, g_pids]),
        camids=torch.randint(0, 3, (NUM_Q + NUM_G,), generator=g),
        feats=feats,
        masks=masks,
    )


def rank_share(total: int, rank: int, world: int, seed: int = 5) -> list[int]:
    """An uneven, shuffled share: rank 1 of 3 gets nothing, and rank 2 repeats three of rank 0's samples."""
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    if world == 1:
        return order
    sizes = [total * 5 // 8, 0, total - total * 5 // 8]
    start = sum(sizes[:rank])
    share = order[start : start + sizes[rank]]
    return share + order[:3] if rank == 2 else share  # padding-style duplicates


def image_for(key: str) -> torch.Tensor:
    seed = int.from_bytes(key.encode(), "little") % (2**31)
    return torch.rand(3, 64, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def model_batches(data: Embeddings, share: list[int], role: str, batch_size: int = 4) -> list[dict]:
    rows = [i for i in share if data.roles[i] == role]
    return [
        {
            "images": torch.stack([image_for(data.keys[i]) for i in rows[s : s + batch_size]]),
            "pids": data.pids[rows[s : s + batch_size]],
            "camids": data.camids[rows[s : s + batch_size]],
            "keys": [data.keys[i] for i in rows[s : s + batch_size]],
            "roles": [role] * len(rows[s : s + batch_size]),
        }
        for s in range(0, len(rows), batch_size)
    ]


def tiny_model():
    from dpm_dist.model.dpm import create_model

    torch.manual_seed(0)
    model = create_model(**TINY_MODEL)
    torch.nn.init.normal_(model.mask_gen.fc.weight, std=0.5)  # a non-constant mask
    return model


def scenarios(env: DistEnv, shards: str | None) -> dict:
    """Everything the multi-rank test compares, computed on this rank."""
    from dpm_dist.config import to_config
    from dpm_dist.eval.evaluator import evaluate

    data = synthetic_embeddings()
    local = data.select(rank_share(len(data), env.rank, env.world_size))
    query, gallery = split_roles(gather_embeddings(local))
    out = {"keys": query.keys + gallery.keys, "feats": torch.cat([query.feats, gallery.feats])}
    for name, cfg in {
        "masked_cosine": EvalConfig(distance="masked_cosine", query_chunk=4, max_rank=20),
        "cosine": EvalConfig(distance="cosine", query_chunk=3, max_rank=50),
        "euclidean": EvalConfig(distance="euclidean", query_chunk=7, max_rank=10),
        "rerank": EvalConfig(rerank=True, rerank_k1=6, rerank_k2=3, query_chunk=4),
    }.items():
        m = evaluate_embeddings(query, gallery, cfg, env)
        out[name] = dict(m.as_dict(), cmc=m.cmc.tolist(), ap=m.ap.tolist())
    model = tiny_model()
    share = rank_share(len(data), env.rank, env.world_size, seed=env.world_size)
    loaders = {role: model_batches(data, share, role) for role in ("query", "gallery")}
    mq, mg = extract_and_gather(model, None, env, device="cpu", loaders=loaders)
    out["model"] = evaluate_embeddings(mq, mg, EvalConfig(query_chunk=5), env).as_dict()
    out["model_feats"] = torch.cat([mq.feats, mg.feats])
    if shards is not None:
        cfg = to_config(
            {
                "data": {
                    "root": shards,
                    "img_size": [64, 32],
                    "num_workers": 0,
                    "eval_batch_size": 3,
                    "dataset": "synthetic",
                },
                "model": {"img_size": [64, 32], "stride": [6, 6], "patch_size": 8},
                "eval": {"query_chunk": 2},
            }
        )
        out["loader"] = evaluate(model, cfg, env, device="cpu")
    return out


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.slow
def test_world_sizes_1_and_3_give_identical_metrics(tmp_path, tiny_shards):
    single = run_ranks(scenarios, 1, tmp_path / "w1", str(tiny_shards))[0]
    multi = run_ranks(scenarios, 3, tmp_path / "w3", str(tiny_shards))
    for rank_result in multi:
        assert_identical(rank_result, single)
    # The gathered set is the canonical one: every key once, sorted by (role, key), whatever the shares.
    assert single["keys"] == [f"q{i:03d}" for i in range(NUM_Q)] + [f"g{j:03d}" for j in range(NUM_G)]
    data = synthetic_embeddings()
    expected = evaluate_features(
        data.feats[:NUM_Q],
        data.feats[NUM_Q:],
        data.pids[:NUM_Q],
        data.pids[NUM_Q:],
        data.camids[:NUM_Q],
        data.camids[NUM_Q:],
        q_mask=data.masks[:NUM_Q],
        max_rank=20,
    )
    assert single["masked_cosine"]["mAP"] == expected.mAP and single["masked_cosine"]["cmc"] == expected.cmc.tolist()
    assert 0 < single["masked_cosine"]["num_valid_query"] < NUM_Q  # some queries have no match and are skipped
    assert single["loader"]["num_query"] == 10 and single["loader"]["num_gallery"] == 15


# --- one process -------------------------------------------------------------------------------------


def test_gather_on_one_process_dedupes_sorts_and_splits_by_role():
    data = synthetic_embeddings()
    shuffled = data.select(rank_share(len(data), 2, 3) + rank_share(len(data), 0, 3))  # has duplicates
    query, gallery = split_roles(gather_embeddings(shuffled))
    assert query.keys == sorted(query.keys) and len(query) + len(gallery) == len(set(shuffled.keys))
    assert set(query.roles) == {"query"} and set(gallery.roles) == {"gallery"}
    row = data.keys.index(query.keys[0])
    assert torch.equal(query.feats[0], data.feats[row]) and query.pids[0] == data.pids[row]


def test_metrics_follow_keys_not_positions():
    data = synthetic_embeddings()
    cfg = EvalConfig(query_chunk=5)
    forward = evaluate_embeddings(*split_roles(gather_embeddings(data)), cfg, DistEnv())
    backward = evaluate_embeddings(
        *split_roles(gather_embeddings(data.select(list(range(len(data)))[::-1]))), cfg, DistEnv()
    )
    assert forward.as_dict() == backward.as_dict()
    q, g = data.select(list(range(NUM_Q))), data.select(list(range(NUM_Q, NUM_Q + NUM_G)))
    ref = per_query_reference(
        (
            -torch.clamp(
                (torch.nn.functional.normalize(q.feats) * q.masks)
                @ torch.nn.functional.normalize(g.feats).T
                / torch.sqrt((q.masks**2) @ (torch.nn.functional.normalize(g.feats) ** 2).T),
                -1 + 1e-5,
                1 - 1e-5,
            )
        ).numpy(),
        q.pids.numpy(),
        g.pids.numpy(),
        q.camids.numpy(),
        g.camids.numpy(),
    )
    assert forward.mAP == pytest.approx(ref[1], rel=1e-12) and forward.num_valid == ref[3]


def test_a_key_with_two_identities_is_an_error():
    data = synthetic_embeddings()
    twice = data.select([0, 1, 0, NUM_Q])
    twice.pids[2] = twice.pids[0] + 1
    with pytest.raises(ValueError, match="appears twice with different pid"):
        gather_embeddings(twice)


def test_split_roles_errors():
    data = synthetic_embeddings()
    with pytest.raises(ValueError, match="no gallery samples"):
        split_roles(data.select(list(range(NUM_Q))))
    bad = data.select([0, NUM_Q])
    bad.roles[0] = "probe"
    with pytest.raises(ValueError, match="unknown sample roles"):
        split_roles(bad)


def test_extract_uses_eval_mode_and_restores_train_mode():
    data = synthetic_embeddings()
    model = tiny_model().train()
    batches = model_batches(data, list(range(6)), "query", batch_size=3)
    emb = extract(model, batches, device="cpu")
    assert model.training and emb.keys == data.keys[:6] and emb.feats.shape == (6, 32)
    with torch.no_grad():
        model.eval()
        out = model(torch.stack([image_for(k) for k in data.keys[:3]]), data.camids[:3])
    torch.testing.assert_close(emb.feats[:3], out.feat)
    torch.testing.assert_close(emb.masks[:3], out.mask)
    assert ((emb.masks > 0) & (emb.masks < 1)).all()


def test_neck_feat_after_takes_the_bnneck_output_with_running_statistics():
    data = synthetic_embeddings()
    model = tiny_model()
    model.bottleneck.running_mean.normal_()  # a non-trivial running mean to subtract
    batches = model_batches(data, list(range(6)), "query", batch_size=3)
    after = extract(model, batches, device="cpu", neck_feat="after")
    with torch.no_grad():
        model.eval()
        out = model(torch.stack([image_for(k) for k in data.keys[:3]]), data.camids[:3])
    torch.testing.assert_close(after.feats[:3], out.feat_bn)
    torch.testing.assert_close(after.feats[:3], model.bottleneck(out.feat))
    assert not torch.allclose(after.feats[:3], out.feat)
