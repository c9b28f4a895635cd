"""The GPU fast paths, each a named option off by default, checked against the faithful path on CPU:
``engine.compile`` (torch.compile of the ViT blocks and the HMG), ``optim.fused`` (fused SGD/AdamW through
DeepSpeed) and ``data.pin_memory``. tests/test_gpu.py checks the same on CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dpm_dist.dist import DistEnv, init_process_group

sys.path.insert(0, str(Path(__file__).parent))
import engine_worker as W


@pytest.fixture(scope="module")
def env() -> DistEnv:
    init_process_group(DistEnv())
    return DistEnv()


def _train(env: DistEnv, mode: str, zero: int, steps: int = 2, **fields) -> tuple[dict[str, torch.Tensor], object]:
    from dpm_dist.train.engine import DPMEngine

    cfg = W.make_cfg(mode, zero)
    for dotted, value in fields.items():
        section, name = dotted.split("__")
        setattr(getattr(cfg, section), name, value)
    engine = DPMEngine.from_config(cfg, env, W.fresh_model())
    engine.start_epoch(2)
    for batch in W.batches(env, steps):
        engine.step(batch)
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}, engine


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()  # in-place compile: no `_orig_mod.` prefixes in checkpoints
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("mode", ["exact", "reference"])
@pytest.mark.slow
def test_compiled_step_equals_the_eager_step(env, mode):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, _ = _train(env, mode, 0)
    compiled, engine = _train(env, mode, 0, engine__compile=True, engine__compile_backend="aot_eager")
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])  # the blocks and the HMG did compile
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert hasattr(engine.model.backbone.blocks[0], "_compiled_call_impl")
    assert not getattr(engine.model.backbone.blocks[-1], "_compiled_call_impl", None)  # the HEM hook's block
    assert _max_diff(compiled, eager) <= 1e-6


@pytest.mark.parametrize("zero", [0, 1, 2])
@pytest.mark.slow
def test_fused_sgd_is_accepted_by_deepspeed_and_gives_the_same_update(env, zero):
    plain, _ = _train(env, "exact", zero)
    fused, engine = _train(env, "exact", zero, optim__fused=True)
    assert all(group["fused"] for group in engine.opt_main.param_groups + engine.opt_mask.param_groups)
    assert _max_diff(fused, plain) <= 1e-6


def test_fused_adamw_is_accepted_by_deepspeed(env):
    """Adam turns rounding noise into full ±lr steps wherever the true gradient is zero (the conv biases before
    the HMG's BNs, the key biases of attention), so fused and foreach AdamW agree only where gradients are real."""
    plain, _ = _train(env, "exact", 1, steps=1, optim__name="adamw")  # one step: the noise has not fed back yet
    fused, engine = _train(env, "exact", 1, steps=1, optim__name="adamw", optim__fused=True)
    assert all(group["fused"] for group in engine.opt_main.param_groups)
    for name in ("classifier.weight", "backbone.blocks.0.mlp.fc1.weight"):  # step 1's, from the initial weights
        assert torch.allclose(fused[name], plain[name], atol=1e-6), name


def test_pinned_loader_yields_the_same_batches(tiny_shards):
    from dpm_dist.config import DataConfig
    from dpm_dist.data.loader import build_train_loader

    common = dict(
        root=str(tiny_shards), dataset="synthetic", num_ids=4, num_instances=2, num_workers=1, img_size=[32, 16]
    )
    with pytest.warns(UserWarning, match="pin_memory") if not torch.cuda.is_available() else _no_warning():
        pinned = next(iter(build_train_loader(DataConfig(**common, pin_memory=True), DistEnv(), epoch=1, seed=0)))
    plain = next(iter(build_train_loader(DataConfig(**common), DistEnv(), epoch=1, seed=0)))
    assert torch.equal(pinned["images"], plain["images"]) and pinned["keys"] == plain["keys"]
    assert pinned["images"].is_pinned() == torch.cuda.is_available()


class _no_warning:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_an_engine_after_the_process_group_was_ended_and_started_again(env):
    """``dist.destroy`` ends the group through DeepSpeed's comm, which drops the groups DeepSpeed cached on it: a
    later engine in the same process (tests, notebooks, several commands in one process) steps on the new group
    (with torch's destroy alone it failed: "Group ... is not registered"). Leaves a group up, as the fixture did."""
    from dpm_dist.dist import destroy

    before, _ = _train(env, "exact", 1, steps=1)
    destroy()
    init_process_group(DistEnv())
    after, _ = _train(env, "exact", 1, steps=1)
    assert _max_diff(after, before) == 0.0
