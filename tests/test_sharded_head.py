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
import engine_worker as W  # noqa: E402

NUM_CLASSES = 11  # uneven at 2 (6 + 5) and 3 ranks (4 + 4 + 3); W.batches labels 0..3·world−1
STEPS = 5
CASES = [("exact", 0), ("exact", 1), ("exact", 2), ("approx", 1), ("reference", 0)]
TERMS_LOCAL = ("loss_hem", "loss_triplet")  # per rank in both heads
TERMS_GLOBAL = ("loss_id", "loss_mask_id", "acc", "loss_step2")  # sharded: the mean over ranks of the replicated


def test_prototype_rows_cover_every_class_once():
    for classes, world in [(11, 2), (11, 3), (12, 4), (5, 5), (1_000_000, 3)]:
        rows = [prototype_rows(classes, r, world) for r in range(world)]
        assert rows[0][0] == 0 and rows[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
        sizes = [stop - start for start, stop in rows]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="3 classes cannot be sharded over 4 ranks"):
        prototype_rows(3, 0, 4)


def test_config_and_engine_refuse_what_the_sharded_head_does_not_cover():
    with pytest.raises(ValueError, match="model.classifier"):
        to_config({"model": {"classifier": "shards"}})
    from dpm_dist.train.sharded_head import ShardedHead

    for field, value in [("precision", "fp16"), ("gradient_clipping", 1.0)]:
        cfg = _cfg("exact", 0, "sharded")
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, **{field: value}))
        with pytest.raises(ValueError, match=f"engine.{field}"):
            ShardedHead(_model(), cfg, DistEnv())


def _cfg(mode: str, zero: int, classifier: str):
    # W.make_cfg's lr 0.05 makes 5 steps of this tiny model chaotic: a 2e-7 relative change of W's init alone then
    # moves the HMG weights by 5e-4 relative. At 1e-3 the runs stay within fp32 rounding of each other.
    cfg = W.make_cfg(mode, zero)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, classifier=classifier),
                               optim=dataclasses.replace(cfg.optim, base_lr=1e-3))


def _model():
    torch.manual_seed(0)
    model = create_model(**dict(W.TINY, num_classes=NUM_CLASSES))
    torch.nn.init.normal_(model.mask_gen.fc.weight, std=0.05)  # as W.fresh_model: step 2 reaches every HMG layer
    return model


def _run(env: DistEnv, mode: str, zero: int, classifier: str) -> dict:
    """STEPS iterations; the per-rank gradients of the first one (each backward, in order); final weights."""
    from dpm_dist.train.engine import DPMEngine

    model = _model()
    engine = DPMEngine(model, _cfg(mode, zero, classifier), env)
    named = {n: p for n, p in engine.model.named_parameters() if p.requires_grad}  # not the frozen BNNeck bias
    if engine.head is not None:
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
    if engine.head is not None:
        state["classifier.weight"] = engine.head.weight.detach().clone()
        assert not any(p is engine.head.weight for p in engine.model.parameters())  # DeepSpeed never saw the shard
    return {"metrics": metrics, "grads": grads, "state": state, "rows": prototype_rows(NUM_CLASSES, env.rank, env.world_size)}


def cases(env: DistEnv) -> dict:
    # What a launcher sets and DeepSpeed reads (run_ranks' spawned workers only join the process group).
    os.environ.update(RANK=str(env.rank), LOCAL_RANK=str(env.rank), WORLD_SIZE=str(env.world_size),
                      LOCAL_WORLD_SIZE=str(env.world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT="1")  # group exists already
    return {(mode, zero, classifier): _run(env, mode, zero, classifier)
            for mode, zero in CASES for classifier in ("replicated", "sharded")}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| relative to the tensor's largest magnitude, floored at 1e-2: a tensor whose true gradient is 0
    (a conv bias before a BN, the final LN bias before the BNNeck) holds rounding noise only."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-2))


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def ranks(request, tmp_path_factory) -> list[dict]:
    return run_ranks(cases, request.param, tmp_path_factory.mktemp("sharded") / "ranks")


@pytest.mark.parametrize("mode,zero", CASES)
def test_sharded_head_equals_replicated(ranks, mode, zero):
    rep = [r[(mode, zero, "replicated")] for r in ranks]
    sh = [r[(mode, zero, "sharded")] for r in ranks]
    world = len(ranks)
    terms = 0.0
    for step in range(STEPS):  # the loss terms of every step
        for term in TERMS_LOCAL + TERMS_GLOBAL[:3 if mode == "reference" else 4]:  # reference: loss_step2 is the total
            for r in range(world):
                want = rep[r]["metrics"][step][term] if term in TERMS_LOCAL else sum(x["metrics"][step][term] for x in rep) / world
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
        want = [sum(x["grads"]["classifier.weight"][i] for x in rep)[start:stop] / world for i in range(len(rep[r]["grads"]["classifier.weight"]))]
        got = sh[r]["grads"]["classifier.weight"]
        assert len(got) == len(want)
        worst["classifier.weight"] = max([worst.get("classifier.weight", 0.0)] + [_rel(g, w) for g, w in zip(got, want)])
    w_full = torch.cat([s["state"]["classifier.weight"] for s in sh])
    weights = {}
    for r in range(world):  # the weights after STEPS iterations
        for name, want in rep[r]["state"].items():
            got = w_full if name == "classifier.weight" else sh[r]["state"][name]
            if want.is_floating_point():
                weights[name] = max(weights.get(name, 0.0), _rel(got, want))
            else:
                assert torch.equal(got, want), name
    print(f"{world} ranks {mode} ZeRO-{zero}: max relative difference of the weights after {STEPS} steps "
          f"{max(weights.values()):.2e}, of the first gradients {max(worst.values()):.2e}, of the loss terms {terms:.2e}")
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
    rows = [(torch.randn(4, 32, generator=g, dtype=torch.float64), torch.rand(4, 32, generator=g, dtype=torch.float64),
             torch.randint(0, NUM_CLASSES, (4,), generator=g)) for _ in range(env.world_size)]
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
    out = {"loss_id": terms["loss_id"].detach(), "loss_mask_id": terms["loss_mask_id"].detach(), "acc": terms["acc"],
           "d_feat": feat.grad.clone(), "d_mask": mask.grad.clone(), "d_w": weight.grad.clone()}
    mask.grad = None
    step2.backward()
    return dict(out, step2=step2.detach(), d_mask2=mask.grad.clone())


def pair(env: DistEnv) -> tuple[dict, dict]:
    return _terms(env, False), _terms(env, True)


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
        torch.testing.assert_close(sh["d_w"], (sum(o[0]["d_w"] for o in out) / world)[start:stop], rtol=1e-12, atol=1e-12)
