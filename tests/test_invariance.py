"""World-size invariance (``engine.invariant``, ``data.global_num_ids``; docs/training.md, "World-size invariance").

The slow check: the same global batch (P = 6 identities × K = 2) on 1, 2 and 3 gloo ranks, ZeRO 0 and 2, the
replicated and the sharded head, drop-path and every augmentation on (flip, pad + crop, erasing, colour jitter),
SGD, fp32, 5 steps: every tensor of the model (the BN running statistics included), the optimiser state and the
logged losses agree with one rank's to ‖Δ‖/‖w‖ ≤ 1e-5 (‖w‖ floored at 1e-3). One torchrun launch per world size
runs the four variants (tests/invariance_worker.py).

The same check with the switch off (``--switch off``, today's per-rank draws and BatchNorm) fails by far: the
optimiser state differs by up to 164 % of a tensor's norm (``mask_gen.layers.4.1.bias``' momentum at 3 ranks),
the weights by up to 132 % (``mask_gen.fc.weight``) and a logged loss by 59 %; with it, at most 6.5e-6, 5.6e-6 and
8.5e-6 (the triplet term: its distances cancel when features are close; measured 2026-12-07).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpm_dist.config import for_world_size, to_config
from dpm_dist.dist import DistEnv
from dpm_dist.model.dpm import create_model
from tests.conftest import ROOT, TINY, TINY_TRAIN, relative_workdir, run_ranks, train_env

sys.path.insert(0, str(Path(__file__).parent))
import engine_worker as W
import invariance_worker as IW

REL, FLOOR = 1e-5, 1e-3
VARIANTS = ("zero0:replicated", "zero2:replicated", "zero0:sharded", "zero2:sharded")
# The final LayerNorm's bias feeds only the BNNeck (which subtracts the batch mean) and the triplet distances
# (differences of features): its gradient is exactly 0, and its momentum holds rounding noise only (‖m‖ ~ 3e-6).
ZERO_GRADIENT = ("backbone.norm.bias",)


# ---- fast: the config, the global order, the sample-keyed draws -----------------------------------------------


def test_global_num_ids_is_shared_by_the_ranks_or_refused_in_one_line():
    cfg = to_config({"data": {"global_num_ids": 12, "num_instances": 2}})
    assert [for_world_size(cfg, w).data.num_ids for w in (1, 2, 3, 4, 6)] == [12, 6, 4, 3, 2]
    assert for_world_size(for_world_size(cfg, 3), 3).data.num_ids == 4  # idempotent
    with pytest.raises(ValueError) as err:
        for_world_size(cfg, 5)
    assert str(err.value).startswith("config field `data.global_num_ids`: 12 identities per global batch cannot")
    assert "\n" not in str(err.value)
    unset = to_config({"data": {"num_ids": 5}})
    assert for_world_size(unset, 3).data.num_ids == 5  # data.num_ids per rank, as before
    one_each = for_world_size(to_config({"data": {"global_num_ids": 4}, "engine": {"invariant": "on"}}), 4)
    assert one_each.data.num_ids == 1 and one_each.engine.gather_triplet  # negatives come from the other ranks
    with pytest.raises(ValueError, match="config field `data.global_num_ids`: 4 identities over 4 ranks leave 1"):
        for_world_size(to_config({"data": {"global_num_ids": 4}}), 4)


def test_one_switch_turns_the_invariant_mode_on():
    auto = to_config({"engine": {"invariant": "auto", "gather_triplet": False}})
    assert for_world_size(auto, 1).engine.invariant == "off" and not for_world_size(auto, 1).engine.gather_triplet
    two = for_world_size(auto, 2).engine
    assert (two.invariant, two.gather_triplet, two.hem_global_batch) == ("on", True, True)
    assert to_config({"engine": {"invariant": True}}).engine.invariant == "on"  # engine.invariant=true
    assert to_config({"engine": {"invariant": "false"}}).engine.invariant == "off"
    with pytest.raises(ValueError, match="config field `engine.invariant`: unknown value 'sometimes'"):
        to_config({"engine": {"invariant": "sometimes"}})


def test_the_paper_presets_state_the_global_batch_and_go_invariant_on_several_ranks():
    from dpm_dist.cli.common import compose_config

    cfg = to_config(compose_config(["experiment=occluded_duke"]))
    assert (cfg.data.global_num_ids, cfg.data.num_instances, cfg.engine.invariant) == (16, 4, "auto")
    one = for_world_size(cfg, 1)
    assert (one.data.num_ids, one.engine.invariant, one.engine.gather_triplet) == (16, "off", False)  # today's run
    assert [for_world_size(cfg, w).data.num_ids for w in (2, 4, 8, 16)] == [8, 4, 2, 1]


def _epoch(shards: Path, world: int, rank: int, sample_keyed: bool, global_ids: int = 6) -> list[dict]:
    from dpm_dist.data.loader import TrainLoader

    cfg = to_config(
        {
            "data": {
                "root": str(shards),
                "global_num_ids": global_ids,
                "num_instances": 2,
                "num_workers": 0,
                "img_size": [32, 16],
                "padding": 4,
                "color_jitter": True,
            },
            "model": {"img_size": [32, 16], "patch_size": 8, "stride": [8, 8]},
        }
    ).data
    loader = TrainLoader(cfg, DistEnv(rank=rank, world_size=world), seed=3, persistent=False, sample_keyed=sample_keyed)
    return list(loader.epoch(2))


@pytest.mark.parametrize("world", [2, 3])
def test_every_world_size_trains_the_same_global_batches_with_the_same_augmentation(tiny_shards, world):
    """The exact sampler's global P×K order, each sample's augmentation and its draw seed do not depend on the
    world size (the ranks' batches, in rank order, are one rank's batch) once they are keyed by the sample."""
    one = _epoch(tiny_shards, 1, 0, True)
    ranks = [_epoch(tiny_shards, world, r, True) for r in range(world)]
    assert len(one) >= 2 and all(len(r) == len(one) for r in ranks)
    for step, batch in enumerate(one):
        parts = [r[step] for r in ranks]
        assert [key for p in parts for key in p["keys"]] == batch["keys"]
        assert torch.equal(torch.cat([p["images"] for p in parts]), batch["images"])
        assert torch.equal(torch.cat([p["sample_seeds"] for p in parts]), batch["sample_seeds"])
    # Without the switch the ranks share the global order but each augments with its own per-rank seeds.
    rank_keyed = torch.cat([_epoch(tiny_shards, world, r, False)[0]["images"] for r in range(world)])
    assert not torch.equal(rank_keyed, one[0]["images"])


def test_one_rank_draws_what_it_always_drew(tiny_shards):
    """On one rank the sample-keyed seeds are today's per-rank seeds: the same images, bit for bit."""
    keyed, today = _epoch(tiny_shards, 1, 0, True), _epoch(tiny_shards, 1, 0, False)
    for a, b in zip(keyed, today, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
        assert torch.equal(a["sample_seeds"], b["sample_seeds"])


def test_a_keyed_drop_path_mask_belongs_to_the_sample_not_to_the_batch():
    import timm

    from dpm_dist.train.invariant import KeyedDropPath, key_drop_paths

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=(32, 16),
        patch_size=8,
        embed_dim=16,
        depth=4,
        num_heads=2,
        drop_path_rate=0.5,
    )
    draws = key_drop_paths(vit.blocks)
    assert draws is not None and draws.num_places == 6  # blocks 1-3 (block 0's rate is 0: an Identity), 2 branches
    assert sum(isinstance(m, KeyedDropPath) for m in vit.modules()) == 6
    vit.train()
    x, seeds = torch.randn(5, 3, 32, 16), torch.tensor([11, 22, 33, 44, 55])
    with draws.keyed(seeds, 1, torch.device("cpu")):
        whole = vit(x)
    with draws.keyed(seeds[[3, 1]], 1, torch.device("cpu")):
        part = vit(x[[3, 1]])
    torch.testing.assert_close(part, whole[[3, 1]], rtol=1e-6, atol=1e-6)
    with draws.keyed(seeds, 2, torch.device("cpu")):  # another pass (step 2's forward): other draws
        assert not torch.allclose(vit(x), whole)
    with pytest.raises(RuntimeError, match="sample seeds"):
        vit(x)
    u = torch.cat([draws.for_samples(torch.arange(2000), 1)])
    assert abs(float((u < 0.5).float().mean()) - 0.5) < 0.02  # uniform draws


@pytest.mark.slow
def test_dpm_train_names_a_global_batch_the_ranks_cannot_share(tiny_shards, tmp_path):
    """What each of 3 torchrun ranks sees (``WORLD_SIZE=3``): one line naming the field, exit 2, before any process
    group is joined (a rank waiting for its peers would hang here)."""
    work = relative_workdir(tmp_path / "user", tiny_shards)
    env = dict(train_env(), WORLD_SIZE="3", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="3")
    cmd = ["dpm-train", *TINY_TRAIN, "data.root=shards", "log.output_dir=run", "data.global_num_ids=4"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "`data.global_num_ids`: 4 identities per global batch cannot be shared equally by 3 ranks" in lines[0]


def test_the_invariant_mode_on_one_rank_is_the_default_but_for_the_drop_path_draws():
    """One rank, ``engine.invariant=on``: the global BatchNorm is torch's, the gather and the metrics' mean are no-ops,
    so without drop-path the run is the default's bit for bit; with it only the (keyed) masks differ."""
    import dataclasses

    from dpm_dist.dist import init_process_group
    from dpm_dist.train.engine import DPMEngine

    init_process_group(DistEnv())  # a world of one over an in-memory store (once per process), as dpm-train

    def run(invariant: str, drop_path: float) -> dict:
        cfg = W.make_cfg("exact", 0)
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, invariant=invariant))
        torch.manual_seed(0)
        model = create_model(**dict(W.TINY, drop_path=drop_path))
        torch.nn.init.normal_(model.mask_gen.fc.weight, std=0.05)  # as W.fresh_model
        engine = DPMEngine.from_config(cfg, DistEnv(), model)
        engine.start_epoch(2)
        for i, batch in enumerate(W.batches(DistEnv(), 3)):
            engine.step(dict(batch, sample_seeds=torch.arange(6) + 6 * i))
        return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain, keyed = run("off", 0.0), run("on", 0.0)
        assert all(torch.equal(plain[k], keyed[k]) for k in plain)
        drop_plain, drop_keyed = run("off", 0.3), run("on", 0.3)
        assert not all(torch.equal(drop_plain[k], drop_keyed[k]) for k in drop_plain)
    finally:
        torch.set_num_threads(threads)


# ---- global BatchNorm on gloo -------------------------------------------------------------------------------


def _bn_case(env: DistEnv) -> dict:
    """Forward, backward and running statistics of a BN over each rank's slice of one global batch."""
    from dpm_dist.train.invariant import GlobalBatchNorm, global_batchnorm

    torch.manual_seed(0)
    x = torch.randn(12, 5, 3, 2) * 3 + 2
    w = torch.randn(5)
    net = global_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(5)))
    assert isinstance(net[0], GlobalBatchNorm)
    with torch.no_grad():
        net[0].weight.copy_(w)
    n = 12 // env.world_size
    mine = x[env.rank * n : (env.rank + 1) * n].clone().requires_grad_(True)
    out = net(mine)
    weights = torch.arange(x.numel()).view_as(x).float().sin()  # a loss over the global batch, summed over ranks
    (out * weights[env.rank * n : (env.rank + 1) * n]).sum().backward()
    return {"out": out.detach(), "grad": mine.grad, "weight_grad": net[0].weight.grad, **net.state_dict()}


@pytest.mark.slow
def test_global_batchnorm_on_gloo_is_batchnorm_of_the_global_batch(tmp_path):
    one = run_ranks(_bn_case, 1, tmp_path / "one")[0]
    three = run_ranks(_bn_case, 2, tmp_path / "two")
    torch.testing.assert_close(torch.cat([r["out"] for r in three]), one["out"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["grad"] for r in three]), one["grad"], rtol=1e-5, atol=1e-5)
    # weight gradients are local sums, which the data-parallel average over ranks turns into one rank's / R
    torch.testing.assert_close(sum(r["weight_grad"] for r in three), one["weight_grad"], rtol=1e-5, atol=1e-5)
    for key in ("0.running_mean", "0.running_var", "0.num_batches_tracked"):
        for r in three:
            torch.testing.assert_close(r[key], one[key], rtol=1e-6, atol=1e-6)


# ---- slow: 5 steps on 1, 2 and 3 ranks ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """One torchrun launch per world size, each training the four variants; ``{world: folder}``."""
    from dpm_dist.data.synth import write_synthetic_shards

    root = tmp_path_factory.mktemp("invariance")
    shards = write_synthetic_shards(str(root / "shards"), **dict(TINY, num_ids=16))  # 8 global batches an epoch
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = {}
    for world in (1, 2, 3):
        out[world] = root / f"world{world}"
        out[world].mkdir()
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(world),
            "--master-port",
            "0",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            "127.0.0.1:0",
            str(ROOT / "tests" / "invariance_worker.py"),
            "--out",
            str(out[world]),
            "--shards",
            shards,
            *VARIANTS,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(FLOOR))


def drift(got: dict, ref: dict) -> dict[str, float]:
    """‖Δ‖/max(‖w‖, 1e-3) of every model and optimiser tensor, and the largest relative difference of a logged loss."""
    out = {}
    for part in ("state", "optim"):
        assert got[part].keys() == ref[part].keys(), part
        for name, value in ref[part].items():
            if part == "optim" and name in ZERO_GRADIENT:
                continue
            out[f"{part}:{name}"] = _rel(got[part][name], value)
    losses = [
        abs(g[k] - r[k]) / max(abs(r[k]), FLOOR)
        for g, r in zip(got["metrics"], ref["metrics"], strict=True)
        for k in r
        if k.startswith("loss")
    ]
    out["logged losses"] = max(losses)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_same_global_batch_trains_the_same_model_on_1_2_and_3_ranks(runs, variant, world):
    name = variant.replace(":", "_") + ".pt"
    ref = torch.load(runs[1] / name, weights_only=False)
    got = torch.load(runs[world] / name, weights_only=False)
    assert ref["world_size"] == 1 and got["world_size"] == world
    assert len(got["metrics"]) == IW.STEPS and all(math.isfinite(m["loss"]) for m in got["metrics"])
    assert any(k.endswith("running_var") for k in got["state"]) and "classifier.weight" in got["optim"]
    found = drift(got, ref)
    worst = sorted(found.items(), key=lambda kv: -kv[1])[:5]
    assert worst[0][1] <= REL, f"{variant} on {world} ranks drifts from one rank's: {worst}"
    for name in ZERO_GRADIENT:  # rounding noise around 0, far below the floor
        assert float(got["optim"][name].norm()) < FLOOR and float(ref["optim"][name].norm()) < FLOOR
