"""Non-finite losses (issue 13, item 4): a NaN/Inf loss term or gradient norm skips the step on every rank,
changes no weight, momentum or BN statistic, is counted, and a streak of them stops ``dpm-train`` with one line.

Engine level: a real corrupt input (a batch of NaN images on one rank) and a real overflow (an inf gradient,
an fp16 loss scale too large to fit); end to end: ``dpm-train`` with NaN images injected from outside
(``tests/faults/fault_nonfinite.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    RUN_TIMEOUT_S,
    TINY_TRAIN,
    VENV_BIN,
    fault_env,
    model_weights,
    relative_workdir,
    run_ranks,
    train_env,
)

sys.path.insert(0, str(Path(__file__).parent))
import engine_worker as W

NAN = float("nan")


@pytest.fixture(scope="module")
def single_process():
    from dpm_dist.dist import DistEnv, init_process_group

    init_process_group(DistEnv())
    return DistEnv()


def _snapshot(engine) -> dict[str, torch.Tensor]:
    """Every weight and buffer of the model, and every tensor the optimisers hold (ZeRO-1/2: the flat fp32
    partitions and their momentum)."""
    out = {f"model.{k}": v.detach().clone() for k, v in engine.model.state_dict().items()}
    for tag, opt in (("main", engine.opt_main), ("mask", engine.opt_mask)):
        for g, group in enumerate(opt.param_groups):
            for i, p in enumerate(group["params"]):
                out[f"{tag}.{g}.{i}.param"] = p.detach().clone()
                for key, value in opt.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        out[f"{tag}.{g}.{i}.{key}"] = value.detach().clone()
    return out


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def _engine(env, precision: str, zero: int):
    from dpm_dist.train.engine import DPMEngine

    engine = DPMEngine.from_config(W.make_cfg("exact", zero, precision=precision), env, W.fresh_model())
    engine.start_epoch(2)
    _set_scale(engine, 2.0**10)  # fp16: the tiny model's gradients overflow at the default 2^16
    return engine


def _set_scale(engine, scale: float) -> None:
    for _, scaler in engine._scalers():
        scaler.load_state_dict(dict(scaler.state_dict(), scale=scale))


def nan_batch_run(env, precision: str, zero: int) -> dict:
    """Clean step, then a step whose batch is NaN images on rank 0 only, then a clean step; and a run that
    never saw the NaN batch."""
    clean, bad, after = W.batches(env, 3)
    if env.rank == 0:
        bad = dict(bad, images=bad["images"] * NAN)
    engine = _engine(env, precision, zero)
    engine.step(clean)
    before, scale = _snapshot(engine), engine.loss_scale()
    metrics = engine.step(bad)
    result = {
        "changed": _differ(before, _snapshot(engine)),
        "skip": engine.last_skip,
        "skipped": engine.skipped_steps,
        "streak": engine.nonfinite_streak,
        "loss": metrics["loss"],
        "scales": (scale, engine.loss_scale()),
    }
    engine.step(after)
    result.update(final=_snapshot(engine), streak_after=engine.nonfinite_streak, skip_after=engine.last_skip)
    reference = _engine(env, precision, zero)
    reference.step(clean)
    reference.step(after)
    result["reference"] = _snapshot(reference)
    return result


def inf_grad_run(env, precision: str, zero: int) -> dict:
    """Finite losses everywhere, but rank ``world - 1`` gets an inf gradient: the gradient check skips the step."""
    clean, nxt = W.batches(env, 2)
    engine = _engine(env, precision, zero)
    engine.step(clean)
    before = _snapshot(engine)
    hook = None
    if env.rank == env.world_size - 1:
        hook = engine.model.classifier.weight.register_hook(lambda g: g * float("inf"))
    metrics = engine.step(nxt)
    if hook is not None:
        hook.remove()
    return {"changed": _differ(before, _snapshot(engine)), "skip": engine.last_skip, "loss": metrics["loss"]}


def nan_step2_run(env, precision: str, zero: int) -> dict:
    """Step 1 finite, but rank ``world - 1``'s HMG output in step 2 (its second call of the iteration) is NaN:
    step 1 stays applied, the HMG update and step 2's BN statistics are skipped on every rank."""
    clean, nxt = W.batches(env, 2)
    engine = _engine(env, precision, zero)
    engine.step(clean)
    before = _snapshot(engine)
    calls = []

    def poison(module, inputs, output):
        calls.append(1)
        return output * NAN if len(calls) == 2 and env.rank == env.world_size - 1 else output

    hook = engine.model.mask_gen.register_forward_hook(poison)
    metrics = engine.step(nxt)
    hook.remove()
    changed = _differ(before, _snapshot(engine))
    return {
        "changed": changed,
        "skip": engine.last_skip,
        "loss_step2": metrics["loss_step2"],
        "finite": all(
            bool(torch.isfinite(v).all()) for v in engine.model.state_dict().values() if v.is_floating_point()
        ),
    }


def _assert_nan_batch_skipped(results: list[dict]) -> None:
    for rank, r in enumerate(results):
        assert r["skip"] and "loss" in r["skip"] and "loss_id" in r["skip"], (rank, r["skip"])  # every rank skipped
        assert r["changed"] == [], (rank, r["changed"][:5])  # weights, momentum, BN statistics: bit-identical
        assert (r["skipped"], r["streak"], r["streak_after"], r["skip_after"]) == (1, 1, 0, ())
        assert not _differ(r["final"], r["reference"]), _differ(r["final"], r["reference"])[:5]
    assert results[0]["loss"] != results[0]["loss"]  # rank 0's loss was NaN: the input really was corrupt


@pytest.mark.parametrize("precision,zero", [("fp32", 0), ("bf16", 1)])
def test_nan_batch_is_skipped_and_changes_nothing_one_process(single_process, precision, zero, tmp_path):
    _assert_nan_batch_skipped(run_ranks(nan_batch_run, 1, tmp_path / "ranks", precision, zero))


def two_rank_cases(env) -> dict:
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
        "nan_fp32_zero2": nan_batch_run(env, "fp32", 2),
        "nan_bf16_zero0": nan_batch_run(env, "bf16", 0),
        "grad_fp32_zero0": inf_grad_run(env, "fp32", 0),
        "grad_bf16_zero2": inf_grad_run(env, "bf16", 2),
        "step2_fp32_zero0": nan_step2_run(env, "fp32", 0),
    }


@pytest.mark.slow
def test_one_rank_nan_batch_or_inf_gradient_skips_on_both_ranks(tmp_path):
    results = run_ranks(two_rank_cases, 2, tmp_path / "ranks")
    _assert_nan_batch_skipped([r["nan_fp32_zero2"] for r in results])
    _assert_nan_batch_skipped([r["nan_bf16_zero0"] for r in results])
    for case in ("grad_fp32_zero0", "grad_bf16_zero2"):
        for rank, r in enumerate(results):
            assert r[case]["skip"] == ("gradient norm (main)",), (case, rank, r[case]["skip"])
            assert r[case]["changed"] == [] and r[case]["loss"] == r[case]["loss"], (case, rank, r[case]["changed"][:5])
    for rank, r in enumerate(results):
        step2 = r["step2_fp32_zero0"]
        assert step2["skip"] == ("loss_step2",) and step2["finite"], (rank, step2["skip"])
        hmg = [
            k
            for k in step2["changed"]
            if k.startswith("mask.") or (k.startswith("model.mask_gen.") and not _is_bn_stat(k))
        ]
        assert step2["changed"] and not hmg, hmg  # step 1 applied (BN statistics of its forward too), no HMG update
    assert results[1]["step2_fp32_zero0"]["loss_step2"] != results[1]["step2_fp32_zero0"]["loss_step2"]  # NaN there


def _is_bn_stat(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


@pytest.mark.parametrize("zero", [0, 1])
@pytest.mark.slow
def test_fp16_overflow_is_the_loss_scalers_skip_and_back_off_counted(single_process, zero):
    """A loss scale too large for fp16 (2^60): GradScaler skips both updates and halves its scale (at ZeRO-1
    too, where DeepSpeed's own norm check used to skip without a back-off); each skip counts in the streak."""
    engine = _engine(single_process, "fp16", zero)
    first, second, third = W.batches(single_process, 3)
    engine.step(first)
    assert engine.last_skip == ()
    _set_scale(engine, 2.0**60)
    before = _snapshot(engine)
    engine.step(second)
    assert engine.last_skip == (
        "fp16 gradient overflow (main: loss scale 1.15292e+18 -> 5.76461e+17)",
        "fp16 gradient overflow (mask: loss scale 1.15292e+18 -> 5.76461e+17)",
    )
    changed = [
        k for k in _differ(before, _snapshot(engine)) if not _is_bn_stat(k)
    ]  # AMP: a finite forward's BN stats stay
    assert changed == [], changed[:5]
    engine.step(second)
    assert (engine.skipped_steps, engine.nonfinite_streak, engine.loss_scale()) == (2, 2, 2.0**58)
    _set_scale(engine, 2.0**10)
    engine.step(third)
    assert (engine.last_skip, engine.nonfinite_streak, engine.skipped_steps) == ((), 0, 2)
    assert [k for k in _differ(before, _snapshot(engine)) if not _is_bn_stat(k)]  # a clean step does train


@pytest.mark.slow
def test_fp16_nan_batch_is_skipped_and_keeps_the_loss_scale(single_process):
    r = nan_batch_run(single_process, "fp16", 0)
    _assert_nan_batch_skipped([r])
    assert r["scales"] == (2.0**10, 2.0**10)  # a NaN input is no overflow: GradScaler's back-off is undone


# ---- dpm-train end to end ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dpm_train_skips_and_counts_a_nan_step_and_stops_a_streak_naming_the_last_checkpoint(tiny_shards, tmp_path):
    """Steps 1, 3 and 4 get NaN images (the fault ``nonfinite``): step 1 is skipped and counted into the epoch-1
    checkpoint, steps 3-4 are a streak of engine.max_nonfinite_steps=2: one line, exit 2. The same command
    without the fault resumes from epoch 1 and finishes, the count carried on."""
    work = relative_workdir(tmp_path / "work", tiny_shards)
    args = [
        str(VENV_BIN / "dpm-train"),
        *TINY_TRAIN,
        "data.root=shards",
        "log.output_dir=run",
        "engine.max_nonfinite_steps=2",
    ]
    proc = subprocess.run(
        args,
        capture_output=True,
        text=True,
        env=fault_env("nonfinite", DPM_FAULT_NONFINITE_STEPS="1,3,4"),
        cwd=work,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    ckpts = work / "run" / "checkpoints"
    assert proc.stderr.strip().splitlines()[-1] == (
        "dpm-train: error: step 4: 2 steps in a row skipped for non-finite values (loss, loss_id, loss_mask_id, loss_hem, "
        f"loss_triplet; engine.max_nonfinite_steps=2); last good checkpoint: epoch_0001 (epoch 1, step 2) in {ckpts}"
    )
    assert "step 1: update skipped for non-finite loss, loss_id" in proc.stdout

    proc = subprocess.run(args, capture_output=True, text=True, env=train_env(), cwd=work, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resumed from epoch_0001" in proc.stdout and "update skipped" not in proc.stdout
    assert "skipped 1 training step with non-finite losses or gradients" in proc.stdout
    summary = json.loads((work / "run" / "results.json").read_text())
    assert (summary["num_skipped_steps"], summary["steps"]) == (1, 6)
    weights = model_weights(work / "run")
    assert all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(work / "run" / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/skipped_steps")] == [(step, 1.0) for step in range(1, 7)]
