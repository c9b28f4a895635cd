"""The training loop in this process: ``dpm_dist.train.loop.train(cfg, env)`` on one rank (gloo over an
in-memory store, as ``dpm-train`` on one process) for 3 steps of the tiny ViT on the tiny synthetic shards.

Every step's losses (read from the TensorBoard events the loop writes) and the final metrics (its
``results.json``) are pinned to the values today's code produces, with a tight tolerance: a change to the numerics (the model, the
losses, the two-step update, the sampler, the transforms, the schedule) cannot pass silently. If a change is
meant to move them, say why in the commit and update the numbers below from the failure message.

It uses only the public ``train()`` and the files a run writes, so refactoring the loop's internals keeps
it green. One thread, deterministic algorithms (``engine.deterministic=true``), no DataLoader workers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_TRAIN

STEPS = 3
# the first 3 steps: 3 epochs of 1 step (warm-up, then the schedule), evaluated after the last
OVERRIDES = [*TINY_TRAIN, "optim.epochs=3", "optim.steps_per_epoch=1", "eval.period=3"]
LOSS_KEYS = ("train/loss", "train/loss_id", "train/loss_mask_id", "train/loss_hem", "train/loss_triplet")
REL = 1e-6  # TensorBoard keeps float32 scalars: a few units in their last place

# Pinned from today's code (update only with a reason: see the module docstring).
EXPECTED_LOSSES = {
    "train/loss": [17.12828826904297, 15.711462020874023, 17.75004005432129],
    "train/loss_id": [2.1050870418548584, 2.9484457969665527, 2.625643491744995],
    "train/loss_mask_id": [17.480690002441406, 21.77611541748047, 19.1391544342041],
    "train/loss_hem": [13.257711410522461, 16.35214614868164, 13.039740562438965],
    "train/loss_triplet": [6.009629249572754, 1.7139662504196167, 5.5636677742004395],
}
EXPECTED_METRICS = {
    "mAP": 0.2299274799274799,
    "mINP": 0.20601398601398602,
    "rank1": 0.0,
    "rank5": 1.0,
    "rank10": 1.0,
    "num_query": 10.0,
    "num_gallery": 15.0,
    "num_valid_query": 10.0,
}


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def trained(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """``train()`` once in this process; the global state it touches (threads, determinism) restored after."""
    from dpm_dist.cli.common import compose_config
    from dpm_dist.dist import DistEnv, init_process_group
    from dpm_dist.train.loop import train

    out = tmp_path_factory.mktemp("inprocess") / "run"
    cfg = compose_config([*OVERRIDES, f"data.root={tiny_shards}", f"log.output_dir={out}"])
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    try:
        env = DistEnv()
        init_process_group(env)  # a world of one over an in-memory store (once per process)
        train(cfg, env)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return out, json.loads((out / "results.json").read_text())["results"]


def test_three_steps_write_a_finished_run(trained):
    out, results = trained
    assert (out / "model_final.pt").is_file() and (out / "results.json").is_file()
    scalars = _scalars(out / "tb")
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, STEPS + 1))
    assert results and all(math.isfinite(v) for v in results.values())


def test_per_step_losses_are_pinned(trained):
    out, _ = trained
    scalars = _scalars(out / "tb")
    got = {key: [value for _, value in scalars[key]] for key in LOSS_KEYS}
    assert got.keys() == EXPECTED_LOSSES.keys()
    for key, expected in EXPECTED_LOSSES.items():
        assert got[key] == pytest.approx(expected, rel=REL), f"losses changed: {got!r}"


def test_final_metrics_are_pinned(trained):
    _, results = trained
    assert results == pytest.approx(EXPECTED_METRICS, rel=REL), f"metrics changed: {results!r}"
