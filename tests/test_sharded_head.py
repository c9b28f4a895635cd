"""The sharded prototype head (model.classifier=sharded) is the replicated head, to fp32 rounding, at 2 and 3 ranks."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

from dpm_dist.config import to_config
from dpm_dist.dist import DistEnv
from dpm_dist.model.dpm import create_model, prototype_rows
from tests.conftest import run_ranks

sys.path.insert(0, str(Path(__file__).parent))
import itertools

import engine_worker as W

NUM_CLASSES = 11  # uneven at 2 (6 + 5) and 3 ranks (4 + 4 + 3); W.batches labels 0..3·world−1
STEPS = 5
CASES = [("exact", 0), ("exact", 1), ("exact", 2), ("approx", 1), ("reference", 0)]
TERMS_LOCAL = ("loss_hem", "loss_triplet")  # per rank in both heads
TERMS_GLOBAL = ("loss_id", "loss_mask_id", "acc", "loss_step2")  # sharded: the mean over ranks of the replicated


def test_prototype_rows_cover_every_class_once():
    for classes, world in [(11, 2), (11, 3), (12, 4), (5, 5), (1_000_000, 3)]:
        rows = [prototype_rows(classes, r, world) for r in range(world)]
        assert rows[0][0] == 0 and rows[-1][1] == classes
        assert all(a[1] == b[0] for a, b in itertools.pairwise(rows))
        sizes = [stop - start for start, stop in rows]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="3 classes cannot be sharded over 4 ranks"):
        prototype_rows(3, 0, 4)


def test_the_config_refuses_what_the_sharded_head_does_not_cover():
    with pytest.raises(ValueError, match="model.classifier"):
        to_config({"model": {"classifier": "shards"}})
    for section, field, value in [("engine", "precision", "fp16"), ("engine", "gradient_clipping", 1.0)]:
        with pytest.raises(ValueError, match=f"config field `{section}.{field}`"):
            to_config({"model": {"classifier": "sharded"}, section: {field: value}})
        to_config({section: {field: value}})  # the replicated head takes them
    with pytest.raises(ValueError, match="config field `loss.sample_rate`: 0.1 samples the classes of a sharded head"):
        to_config({"loss": {"sample_rate": 0.1}})
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="config field `loss.sample_rate`: must be in"):
            to_config({"model": {"classifier": "sharded"}, "loss": {"sample_rate": bad}})
    assert to_config({"model": {"classifier": "sharded"}, "loss": {"sample_rate": 0.1}}).loss.sample_rate == 0.1


def _cfg(mode: str, zero: int, classifier: str):
    # W.make_cfg's lr 0.05 makes 5 steps of this tiny model chaotic: a 2e-7 relative change of W's init alone then
    # moves the HMG weights by 5e-4 relative. At 1e-3 the runs stay within fp32 rounding of each other.
    cfg = W.make_cfg(mode, zero)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, classifier=classifier),
        optim=dataclasses.replace(cfg.optim, base_lr=1e-3),
    )


def _model():
    torch.manual_seed(0)
    model = create_model(**dict(W.TINY, num_classes=NUM_CLASSES))
    torch.nn.init.normal_(model.mask_gen.fc.weight, std=0.05)  # as W.fresh_model: step 2 reaches every HMG layer
    return model


def _run(env: DistEnv, mode: str, zero: int, classifier: str) -> dict:
    """STEPS iterations; the per-rank gradients of the first one (each backward, in order); final weights."""
    from dpm_dist.train.engine import DPMEngine

    model = _model()
    engine = DPMEngine.from_config(_cfg(mode, zero, classifier), env, model)
    named = {n: p for n, p in engine.model.named_parameters() if p.requires_grad}  # not the frozen BNNeck bias
    if classifier == "sharded":
        named["classifier.weight"] = engine.head.weight
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in named}
    hooks = [p.register_hook(lambda g, name=name: grads[name].append(g.detach().clone())) for name, p in named.items()]
    engine.start_epoch(2)
    metrics = []
    for i, batch in enumerate(W.batches(env, STEPS)):
        metrics.append(engine.step(batch))
        if i == 0:
            for h in hooks:
                h.remove()
    state = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    if classifier == "sharded":
        state["classifier.weight"] = engine.head.weight.detach().clone()
        assert not any(p is engine.head.weight for p in engine.model.parameters())  # DeepSpeed never saw the shard
    return {
        "metrics": metrics,
        "grads": grads,
        "state": state,
        "rows": prototype_rows(NUM_CLASSES, env.rank, env.world_size),
    }


def cases(env: DistEnv) -> dict:
    # What a launcher sets and DeepSpeed reads (run_ranks' spawned workers only join the process group).
    os.environ.update(
        RANK=str(env.rank),
        LOCAL_RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_WORLD_SIZE=str(env.world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="1",
    )  # group exists already
    return {
        (mode, zero, classifier): _run(env, mode, zero, classifier)
        for mode, zero in CASES
        for classifier in ("replicated", "sharded")
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| relative to the tensor's largest magnitude, floored at 1e-2: a tensor whose true gradient is 0
    (a conv bias before a BN, the final LN bias before the BNNeck) holds rounding noise only."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-2))


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def ranks(request, tmp_path_factory) -> list[dict]:
    return run_ranks(cases, request.param, tmp_path_factory.mktemp("sharded") / "ranks")


@pytest.mark.parametrize("mode,zero", CASES)
@pytest.mark.slow
def test_sharded_head_equals_replicated(ranks, mode, zero):
    rep = [r[(mode, zero, "replicated")] for r in ranks]
    sh = [r[(mode, zero, "sharded")] for r in ranks]
    world = len(ranks)
    terms = 0.0
    for step in range(STEPS):  # the loss terms of every step
        for term in TERMS_LOCAL + TERMS_GLOBAL[: 3 if mode == "reference" else 4]:  # reference: loss_step2 is the total
            for r in range(world):
                want = (
                    rep[r]["metrics"][step][term]
                    if term in TERMS_LOCAL
                    else sum(x["metrics"][step][term] for x in rep) / world
                )
                terms = max(terms, abs(sh[r]["metrics"][step][term] - want) / max(abs(want), 1e-3))
    worst = {}
    for r in range(world):  # the gradients of the first iteration into the backbone, the HMG and the BNNeck, per rank
        for name, got in sh[r]["grads"].items():
            if name == "classifier.weight":
                continue
            want = rep[r]["grads"][name]
            assert len(got) == len(want), name
            for g, w in zip(got, want):
                worst[name] = max(worst.get(name, 0.0), _rel(g, w))
    start, stop = sh[0]["rows"], None
    for r in range(world):  # W's gradient: the shard's rows of the rank-averaged replicated gradient
        start, stop = sh[r]["rows"]
        want = [
            sum(x["grads"]["classifier.weight"][i] for x in rep)[start:stop] / world
            for i in range(len(rep[r]["grads"]["classifier.weight"]))
        ]
        got = sh[r]["grads"]["classifier.weight"]
        assert len(got) == len(want)
        worst["classifier.weight"] = max(
            [worst.get("classifier.weight", 0.0)] + [_rel(g, w) for g, w in zip(got, want)]
        )
    w_full = torch.cat([s["state"]["classifier.weight"] for s in sh])
    weights = {}
    for r in range(world):  # the weights after STEPS iterations
        for name, want in rep[r]["state"].items():
            got = w_full if name == "classifier.weight" else sh[r]["state"][name]
            if want.is_floating_point():
                weights[name] = max(weights.get(name, 0.0), _rel(got, want))
            else:
                assert torch.equal(got, want), name
    print(
        f"{world} ranks {mode} ZeRO-{zero}: max relative difference of the weights after {STEPS} steps "
        f"{max(weights.values()):.2e}, of the first gradients {max(worst.values()):.2e}, of the loss terms {terms:.2e}"
    )
    # Measured (docs/training.md): 1e-6..1e-5 mostly, 4e-4 at worst; a 2e-7 change of W's init gives ~1e-5 alone.
    assert terms <= 1e-4
    assert max(worst.values()) <= 1e-3, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    assert max(weights.values()) <= 1e-3, sorted(weights.items(), key=lambda kv: -kv[1])[:5]


def _terms(env: DistEnv, sharded: bool) -> dict:
    """The two classification terms and their gradients (fp64) on random inputs, replicated or sharded."""
    from dpm_dist.train.losses import classification_terms, masked_arcface_ce
    from dpm_dist.train.sharded_head import ShardedHead

    g = torch.Generator().manual_seed(7)
    full_w = torch.randn(NUM_CLASSES, 32, generator=g, dtype=torch.float64)
    rows = [
        (
            torch.randn(4, 32, generator=g, dtype=torch.float64),
            torch.rand(4, 32, generator=g, dtype=torch.float64),
            torch.randint(0, NUM_CLASSES, (4,), generator=g),
        )
        for _ in range(env.world_size)
    ]
    feat, mask, labels = (t.clone().requires_grad_(t.is_floating_point()) for t in rows[env.rank])
    margin, scale = 0.5, 30.0
    if sharded:
        model = create_model(**dict(W.TINY, num_classes=NUM_CLASSES)).double()
        model.classifier.weight.data.copy_(full_w)
        head = ShardedHead(model, _cfg("exact", 0, "sharded"), env)
        terms = head.classification_terms(feat, mask, labels)
        weight = head.weight
        step2 = head.masked_arcface_ce(feat.detach(), mask, labels)
    else:
        weight = full_w.clone().requires_grad_(True)
        terms = classification_terms(feat, mask, weight, labels, margin=margin, scale=scale)
        step2 = masked_arcface_ce(feat.detach(), mask, weight.detach(), labels, margin=margin, scale=scale)
    (terms["loss_id"] + 0.7 * terms["loss_mask_id"]).backward()
    out = {
        "loss_id": terms["loss_id"].detach(),
        "loss_mask_id": terms["loss_mask_id"].detach(),
        "acc": terms["acc"],
        "d_feat": feat.grad.clone(),
        "d_mask": mask.grad.clone(),
        "d_w": weight.grad.clone(),
    }
    mask.grad = None
    step2.backward()
    return dict(out, step2=step2.detach(), d_mask2=mask.grad.clone())


def pair(env: DistEnv) -> tuple[dict, dict]:
    return _terms(env, False), _terms(env, True)


@pytest.mark.slow
def test_sharded_terms_and_gradients_match_in_float64(tmp_path):
    """The distributed softmax and the gathers' backward, without DeepSpeed: what each rank's samples and rows get."""
    out = run_ranks(pair, 3, tmp_path / "ranks")
    world = len(out)
    for r, (rep, sh) in enumerate(out):
        for key in ("loss_id", "loss_mask_id", "acc", "step2"):
            mean = sum(o[0][key] for o in out) / world
            torch.testing.assert_close(sh[key], mean, rtol=1e-12, atol=1e-12)
        for key in ("d_feat", "d_mask", "d_mask2"):  # ×R: DeepSpeed's average then gives the replicated value
            torch.testing.assert_close(sh[key], rep[key], rtol=1e-12, atol=1e-12)
        start, stop = prototype_rows(NUM_CLASSES, r, world)
        torch.testing.assert_close(
            sh["d_w"], (sum(o[0]["d_w"] for o in out) / world)[start:stop], rtol=1e-12, atol=1e-12
        )


# ---- Partial FC (loss.sample_rate < 1) ----------------------------------------------------------------------

PFC_CLASSES, PFC_RATE = 40, 0.5  # shards of 14/13/13 rows keep 7/6/6: the 12 labels leave room for negatives


def test_sampled_rows_keep_every_positive_and_are_seeded_by_seed_iteration_and_rank():
    from dpm_dist.train.sharded_head import sample_rows, sample_seed

    labels = torch.tensor([3, 3, 17, 25, 26, 39, 0])
    rows = lambda seed, it, rank, rate=0.3: sample_rows(
        labels, 10, 20, rate, torch.Generator().manual_seed(sample_seed(seed, it, rank))
    )
    got = rows(0, 1, 0)
    assert got.tolist() == sorted(set(got.tolist())) and len(got) == 6  # int(0.3 · 20), sorted, unique
    assert {7, 15, 16} <= set(got.tolist())  # labels 17, 25, 26 are this shard's rows 7, 15, 16
    assert torch.equal(got, rows(0, 1, 0))  # a resumed run draws the same rows
    assert len({tuple(rows(*k).tolist()) for k in [(0, 1, 0), (0, 2, 0), (0, 1, 1), (1, 1, 0)]}) == 4
    assert rows(0, 1, 0, rate=0.1).tolist() == [7, 15, 16]  # the positives alone exceed int(0.1 · 20) = 2
    assert len(sample_rows(torch.tensor([0]), 10, 5, 0.1, torch.Generator())) == 1  # at least one row


def _pfc(env: DistEnv) -> dict:
    """One sampled iteration of the sharded head (fp64), and the same iteration computed in one process on the
    union of every rank's sampled rows with the replicated functions."""
    from dpm_dist.train.losses import classification_terms, masked_arcface_ce
    from dpm_dist.train.sharded_head import ShardedHead

    g = torch.Generator().manual_seed(11)
    full_w = torch.randn(PFC_CLASSES, 32, generator=g, dtype=torch.float64)
    data = [
        (
            torch.randn(4, 32, generator=g, dtype=torch.float64),
            torch.rand(4, 32, generator=g, dtype=torch.float64),
            torch.randint(0, PFC_CLASSES, (4,), generator=g),
        )
        for _ in range(env.world_size)
    ]
    feat, mask, labels = (t.clone().requires_grad_(t.is_floating_point()) for t in data[env.rank])
    model = create_model(**dict(W.TINY, num_classes=PFC_CLASSES)).double()
    model.classifier.weight.data.copy_(full_w)
    cfg = _cfg("exact", 0, "sharded")
    head = ShardedHead(model, dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, sample_rate=PFC_RATE)), env)
    head.begin_iteration()
    terms = head.classification_terms(feat, mask, labels)
    (terms["loss_id"] + 0.7 * terms["loss_mask_id"]).backward()
    step2 = head.masked_arcface_ce(feat.detach(), mask, labels)  # the same rows in step 2
    kept = [head.start + r for r in head._rows.tolist()]
    union = torch.tensor(sorted(k for part in _all_gather_objects(kept) for k in part))
    feats, masks, all_labels = (torch.cat([d[i] for d in data]) for i in range(3))
    sub_w = full_w[union].clone().requires_grad_(True)
    ref_feat = feats.clone().requires_grad_(True)
    local = torch.searchsorted(union, all_labels)  # every label is kept: positives are never dropped
    ref = classification_terms(ref_feat, masks, sub_w, local, margin=0.5, scale=30.0)
    (ref["loss_id"] + 0.7 * ref["loss_mask_id"]).backward()
    ref_step2 = masked_arcface_ce(feats, masks, sub_w.detach(), local, margin=0.5, scale=30.0)
    d_w_ref = torch.zeros_like(full_w).index_copy_(0, union, sub_w.grad)
    rows = slice(env.rank * 4, env.rank * 4 + 4)
    return {
        "kept": kept,
        "labels": all_labels.tolist(),
        "width": head.stop - head.start,
        "got": [terms["loss_id"], terms["loss_mask_id"], step2, feat.grad * 1.0, head.weight.grad],
        "want": [
            ref["loss_id"],
            ref["loss_mask_id"],
            ref_step2,
            ref_feat.grad[rows] * env.world_size,
            d_w_ref[head.start : head.stop],
        ],
    }


def _all_gather_objects(obj):
    from dpm_dist import dist

    return dist.all_gather_objects(obj)


@pytest.mark.slow
def test_partial_fc_is_the_softmax_over_every_ranks_sampled_classes(tmp_path):
    """At 3 ranks, fp64: the sampled head's terms and gradients are those of the replicated loss restricted to the
    union of the sampled rows; an unsampled row gets a zero gradient."""
    out = run_ranks(_pfc, 3, tmp_path / "ranks")
    for rank in out:
        owned = {label - rank["kept"][0] for label in rank["labels"]} & set(range(rank["width"]))
        assert len(rank["kept"]) == max(int(PFC_RATE * rank["width"]), len(owned)) > len(owned) - 1
        for got, want in zip(rank["got"], rank["want"]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert sum(len(r["kept"]) for r in out) < PFC_CLASSES


# ---- the shards in checkpoints ------------------------------------------------------------------------------


def _head(env: DistEnv, seed: int):
    from dpm_dist.train.sharded_head import ShardedHead

    torch.manual_seed(seed)
    model = create_model(**dict(W.TINY, num_classes=NUM_CLASSES))
    return ShardedHead(model, _cfg("exact", 0, "sharded"), env)


def _save_head(env: DistEnv, folder: str) -> dict:
    head = _head(env, 0)
    for _ in range(2):  # momentum buffers that differ from the weights
        head.weight.grad = torch.randn_like(head.weight)
        head.step()
    head.iteration = 5
    head.save(folder)
    full = head.full_weight()
    momentum = head.optimizer.state[head.weight]["momentum_buffer"]
    return {"full": full, "weight": head.weight.detach().clone(), "momentum": momentum.clone()}


def _load_head(env: DistEnv, folder: str, saved_world: int) -> dict:
    head = _head(env, 1)  # another init: everything must come from the files
    head.load(folder, saved_world)
    return {
        "weight": head.weight.detach().clone(),
        "momentum": head.optimizer.state[head.weight]["momentum_buffer"].clone(),
        "iteration": head.iteration,
        "lr": head.optimizer.param_groups[0]["lr"],
    }


@pytest.mark.slow
def test_head_shards_are_saved_by_their_owners_and_resharded_on_another_world_size(tmp_path):
    folder = str(tmp_path / "epoch_0001")
    saved = run_ranks(_save_head, 2, tmp_path / "save", folder)
    weight, momentum = torch.cat([s["weight"] for s in saved]), torch.cat([s["momentum"] for s in saved])
    assert torch.equal(saved[0]["full"], weight) and saved[1]["full"] is None  # the whole W on rank 0 only
    assert sorted(os.listdir(os.path.join(folder, "head"))) == ["rank_0.pt", "rank_1.pt"]
    for world in (1, 3):  # (the same world size: the resume in test_dpm_train_with_a_sharded_head...)
        loaded = run_ranks(_load_head, world, tmp_path / f"load{world}", folder, 2)
        assert torch.equal(torch.cat([r["weight"] for r in loaded]), weight), world
        assert torch.equal(torch.cat([r["momentum"] for r in loaded]), momentum), world
        assert all(r["iteration"] == 5 for r in loaded)
    torch.save(
        dict(torch.load(os.path.join(folder, "head", "rank_1.pt"), weights_only=False), num_classes=12),
        os.path.join(folder, "head", "rank_1.pt"),
    )
    with pytest.raises(ValueError, match=r"head/rank_1.pt: rows \[6, 11\] of 12 classes, expected \[6, 11\) of 11"):
        _load_head(DistEnv(), folder, 2)


@pytest.mark.slow
def test_dpm_train_with_a_sharded_head_resumes_exactly_reshards_and_writes_the_whole_w(tiny_shards, tmp_path):
    """The real command, 2 gloo ranks, Partial FC at 75 %: a run resumed from its epoch-1 checkpoint ends with the
    uninterrupted run's weights bit for bit; model_final.pt holds the whole W; one rank resumes the 2-rank shards."""
    import json
    import shutil
    import subprocess

    from tests.conftest import (
        ROOT,
        RUN_TIMEOUT_S,
        TINY_TRAIN,
        VENV_BIN,
        assert_identical,
        model_weights,
        relative_workdir,
        train_env,
    )

    work = relative_workdir(tmp_path / "work", tiny_shards)
    # 2 ids per rank: a global batch names 4 of the 8 classes, so each shard (4 rows, keeping 3) draws negatives.
    args = [a for a in TINY_TRAIN if not a.startswith(("optim.epochs=", "data.num_ids="))] + [
        "optim.epochs=2",
        "data.num_ids=2",
        "log.checkpoint_every=1",
        "data.root=shards",
        "model.classifier=sharded",
        "loss.sample_rate=0.75",
    ]

    def train(world: int, out: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), str(world)] if world > 1 else [str(VENV_BIN / "dpm-train")]
        proc = subprocess.run(
            cmd + args + [f"log.output_dir={out}", *extra],
            capture_output=True,
            text=True,
            env=train_env(),
            cwd=work,
            timeout=RUN_TIMEOUT_S,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    # The uninterrupted run also keeps its loader workers across the epoch boundary (data.persistent_workers): the
    # resumed run's fresh loader must then give its second epoch the same batches and drop-path draws.
    train(2, "full", "data.num_workers=2", "data.persistent_workers=true")
    final = torch.load(work / "full" / "model_final.pt", weights_only=True)["model"]["classifier.weight"]
    shards = [
        torch.load(work / "full" / "checkpoints" / "epoch_0002" / "head" / f"rank_{r}.pt", weights_only=False)
        for r in (0, 1)
    ]
    assert final.shape[0] == 8 and torch.equal(final, torch.cat([s["weight"] for s in shards]))
    assert [s["rows"] for s in shards] == [[0, 4], [4, 8]] and shards[0]["iteration"] == 4

    for out in ("resumed", "one_rank"):  # the state after epoch 1, as a crash after its checkpoint leaves it
        shutil.copytree(
            work / "full" / "checkpoints", work / out / "checkpoints", ignore=shutil.ignore_patterns("epoch_0002")
        )
        (work / out / "checkpoints" / "latest").write_text("epoch_0001")
    resumed = train(2, "resumed")
    assert "resumed from epoch_0001 (epoch 1, step 2, world size 2)" in resumed.stdout
    assert_identical(model_weights(work / "resumed"), model_weights(work / "full"))

    one = train(1, "one_rank")
    assert "resharding the prototype head of epoch_0001 from 2 to 1 ranks" in one.stdout
    assert (
        torch.load(work / "one_rank" / "model_final.pt", weights_only=True)["model"]["classifier.weight"].shape
        == final.shape
    )
    assert json.loads((work / "one_rank" / "results.json").read_text())["steps"] == 4
