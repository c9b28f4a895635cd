"""Step checkpoints and exact mid-epoch resume (issue 22 item 4; issue 25's stop signal that loses nothing), with the
real command: ``bash launch/torchrun.sh N`` on the tiny model from a folder outside the repository, relative paths.

* A stop signal in the middle of an epoch (2 gloo ranks) writes a step checkpoint at the step where every rank
  stops; the same command resumes from it and ends with the uninterrupted reference run's weights, bit for bit, each
  step in TensorBoard once.
* A run killed (``kill -9`` of every rank) in the middle of an epoch resumes from its newest step checkpoint on 1 and
  on 3 ranks, in the world-size-invariant mode, and ends where the uninterrupted 2-rank run does (‖Δ‖/‖w‖ ≤ 1e-5).
* Elastic continuation (root: network namespaces): ``NNODES=1:2`` with c10d and restarts, one node cut in the
  middle of an epoch: the other re-rendezvous, resumes from the newest step checkpoint on a world of 1 and finishes.
* In process (fast): the order of checkpoint tags, what pruning keeps, the exact sampler's position on another
  world size (the batches after the samples already trained, in the same global order), and the stream sampler's
  replay on the same world size.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    ROOT,
    RUN_TIMEOUT_S,
    TINY_TRAIN,
    VENV_BIN,
    assert_identical,
    fault_env,
    free_port,
    model_weights,
    relative_workdir,
    train_env,
)

STOP_TAG = "step_0002_000001"  # epoch 2, after its step 1 of 2: global step 3 of the 3 × 2 steps


def _launch(nproc: int, *extra: str) -> list[str]:
    """``bash launch/torchrun.sh N`` with the reference run's arguments (conftest ``uninterrupted``) and ``extra``."""
    return [
        "bash",
        str(ROOT / "launch" / "torchrun.sh"),
        str(nproc),
        *TINY_TRAIN,
        "data.root=shards",
        "log.output_dir=run",
        "engine.zero_stage=1",
        *extra,
    ]


def _env(faults: str = "", **extra: str) -> dict[str, str]:
    # (restarts off: no preflight process, and a killed rank ends the job)
    env = dict(fault_env(faults) if faults else train_env(), PATH=f"{VENV_BIN}:{os.environ['PATH']}", MAX_RESTARTS="0")
    env.pop("PYTHON", None)
    return dict(env, **extra)


def _run(cmd: list[str], work: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work, timeout=RUN_TIMEOUT_S)


def _copy(run: Path, work: Path, shards: Path) -> Path:
    """A working folder holding a copy of ``run`` (fixtures stay read-only)."""
    work = relative_workdir(work, shards)
    shutil.copytree(run, work / "run", symlinks=True)
    return work


def _tb_steps(tb: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _each_step_once(run: Path, steps: int) -> None:
    found = _tb_steps(run / "tb")
    assert found["train/loss"] == list(range(1, steps + 1)), found["train/loss"]
    assert not {name: s for name, s in found.items() if len(s) != len(set(s))}


# ---- a stop signal in the middle of an epoch: a step checkpoint, and a resume that loses nothing ------------------


@pytest.fixture(scope="module")
def stopped(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The reference command stopped by SIGUSR1 (Slurm's ``--signal``) that rank 0 receives during step 3, the first
    step of epoch 2 (fault ``signal_at``). Read-only."""
    work = relative_workdir(tmp_path_factory.mktemp("stopped") / "work", tiny_shards)
    proc = _run(_launch(2), work, _env("signal_at", DPM_FAULT_SIGNAL_STEP="3", DPM_FAULT_SIGNAL="USR1"))
    return work / "run", proc


@pytest.mark.slow
def test_a_stop_mid_epoch_writes_a_step_checkpoint_and_the_resume_ends_bit_identical(
    stopped, uninterrupted, tiny_shards, tmp_path
):
    run, proc = stopped
    assert proc.returncode == 138, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpts = run / "checkpoints"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"dpm-train: stopped by SIGUSR1 after step 3 (epoch 2, step 1 of 2); the latest checkpoint is {STOP_TAG} "
        f"(epoch 2, step 1 of 2), written at this stop, in {ckpts.resolve()}; re-run the same command to resume from "
        "it (no step is trained again)"
    )
    assert (ckpts / "latest").read_text() == STOP_TAG and (ckpts / STOP_TAG / "manifest.json").is_file()
    meta = json.loads((ckpts / STOP_TAG / "meta.json").read_text())
    assert (meta["epoch"], meta["step"], meta["epoch_step"], meta["epoch_steps"], meta["epoch_samples"]) == (
        2,
        3,
        1,
        2,
        16,
    )
    assert {"rng", "main", "mask"} <= {p.name for p in (ckpts / STOP_TAG).iterdir()}

    work = _copy(run, tmp_path / "work", tiny_shards)
    again = _run(_launch(2), work, _env())
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {STOP_TAG} (epoch 2, step 1 of 2; step 3, world size 2)" in again.stdout
    assert "[step 3 " not in again.stdout and "[step 4 " in again.stdout  # nothing trained twice
    assert_identical(model_weights(work / "run"), model_weights(uninterrupted))  # every parameter and buffer
    _each_step_once(work / "run", 6)
    # the step checkpoint is older than the epoch checkpoints written since: pruned
    assert sorted(p.name for p in (work / "run" / "checkpoints").iterdir()) == [
        "best",
        "epoch_0002",
        "epoch_0003",
        "latest",
    ]


# ---- killed mid-epoch, resumed on another world size (world-size-invariant mode) ----------------------------------

# The same global batch (6 identities × 2 images) on 1, 2 and 3 ranks, every random draw keyed by the sample; SGD,
# the paper's optimiser (the tiny preset's AdamW turns rounding-level differences of near-zero gradients into
# lr-sized updates: 128 % of a LayerNorm bias after 6 steps between 1 and 2 ranks, against 5e-6 with SGD).
INVARIANT = ["engine.invariant=on", "data.global_num_ids=6", "optim.name=sgd"]
KILLED_TAG = STOP_TAG


def _invariant_mode_exists() -> bool:
    from dpm_dist.config import DataConfig, EngineConfig

    return "global_num_ids" in DataConfig.__dataclass_fields__ and "invariant" in EngineConfig.__dataclass_fields__


@pytest.fixture(scope="module")
def invariant_reference(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 2-rank run in the invariant mode. Read-only."""
    if not _invariant_mode_exists():
        pytest.skip("the world-size-invariant mode (engine.invariant, data.global_num_ids) is not in this build")
    ref = relative_workdir(tmp_path_factory.mktemp("invariant_ref") / "work", tiny_shards)
    proc = _run(_launch(2, *INVARIANT), ref, _env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return ref / "run"


@pytest.fixture(scope="module")
def invariant_runs(
    invariant_reference: Path, tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """The uninterrupted 2-rank run in the invariant mode, and the same command with a step checkpoint after every
    step, every rank killed (SIGKILL) as it was about to take step 4 (fault ``signal_at``). Read-only."""
    killed = relative_workdir(tmp_path_factory.mktemp("invariant_killed") / "work", tiny_shards)
    proc = _run(
        _launch(2, *INVARIANT, "log.checkpoint_every_steps=1"),
        killed,
        _env("signal_at", DPM_FAULT_SIGNAL_STEP="4", DPM_FAULT_SIGNAL="KILL"),
    )
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert (killed / "run" / "checkpoints" / "latest").read_text() == KILLED_TAG, proc.stdout[-3000:]
    return invariant_reference, killed / "run"


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    """Every tensor: ‖a − b‖ / max(‖b‖, 1e-3) ≤ ``tol`` (the floor for tensors that stay about 0)."""
    assert a.keys() == b.keys()
    worst = {
        k: float((a[k].double() - b[k].double()).norm() / max(float(b[k].double().norm()), 1e-3))
        for k in a
        if a[k].is_floating_point()
    }
    bad = {k: v for k, v in worst.items() if v > tol}
    assert not bad, f"{len(bad)} tensors differ by more than {tol}: {sorted(bad.items(), key=lambda kv: -kv[1])[:3]}"
    ints = [k for k in a if not a[k].is_floating_point() and not torch.equal(a[k], b[k])]
    assert not ints, ints


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 3])
def test_killed_mid_epoch_resumes_on_another_world_size_to_the_same_model(invariant_runs, tiny_shards, tmp_path, world):
    reference, killed = invariant_runs
    work = _copy(killed, tmp_path / "work", tiny_shards)
    proc = _run(_launch(world, *INVARIANT, "log.checkpoint_every_steps=1"), work, _env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {KILLED_TAG} (epoch 2, step 1 of 2; step 3, world size 2)" in proc.stdout
    assert "resharding the ZeRO-1 optimiser state of " + KILLED_TAG in proc.stdout
    assert "trained again" not in proc.stdout + proc.stderr  # the global batch is the same: an exact position
    _assert_close(model_weights(work / "run"), model_weights(reference))
    _each_step_once(work / "run", 6)
    assert json.loads((work / "run" / "results.json").read_text())["steps"] == 6


# ---- in process ------------------------------------------------------------------------------------------------


def test_checkpoint_tags_are_ordered_by_epoch_then_step_and_pruning_keeps_the_newest(tmp_path):
    from dpm_dist.train import checkpoint

    root = tmp_path / "checkpoints"
    tags = ["epoch_0001", "step_0002_000001", "step_0002_000003", "epoch_0002", "step_0003_000001", "step_0003_000002"]
    for tag in tags:
        (root / tag).mkdir(parents=True)
        (root / tag / "meta.json").write_text("{}")
        (root / tag / "manifest.json").write_text("{}")
    (root / "step_0003_000003").mkdir()  # a save that did not finish
    assert checkpoint._checkpoint_folders(str(root)) == ["step_0003_000003", *tags[::-1]]
    assert checkpoint.tag_key("step_0002_000003") < checkpoint.tag_key("epoch_0002") < checkpoint.tag_key("step_0003_1")
    assert checkpoint.tag_key("epoch_x") is None and checkpoint.tag_key("latest") is None
    (root / "latest").write_text("step_0003_000002")
    (root / "best").write_text("epoch_0001")
    checkpoint._prune(str(root), keep_last=1, keep_last_steps=1)
    # the newest epoch and step checkpoints, best and latest; the step checkpoints of epoch 2 are older than epoch_0002
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["epoch_0001", "epoch_0002", "step_0003_000002"]


def _global_order(cfg, world: int, epoch: int, start: int = 0) -> list[str]:
    """The keys of ``epoch``'s samples on ``world`` ranks from its batch ``start`` on, in the global order: step by
    step, each step's batches in rank order."""
    from dpm_dist.data.loader import TrainLoader
    from dpm_dist.dist import DistEnv

    per_rank = [
        [b["keys"] for b in TrainLoader(cfg, DistEnv(rank=r, world_size=world), seed=5).epoch(epoch, start)]
        for r in range(world)
    ]
    return [key for step in zip(*per_rank, strict=True) for batch in step for key in batch]


def test_the_exact_sampler_resumes_at_the_same_place_of_the_global_order_on_another_world_size(tiny_shards):
    """2 ranks of 2×2 images stopped after 2 steps (16 samples of the epoch's global order): 1 rank goes on with the
    samples after them in the same order; 3 ranks' global batch (12) does not divide 16, so they go back to its step
    boundary (12) and train the last 4 again."""
    from dpm_dist.config import DataConfig
    from dpm_dist.data.sampling import resume_position

    cfg = DataConfig(
        dataset="generic", root=str(tiny_shards), num_ids=2, num_instances=2, num_workers=0, img_size=[16, 8]
    )
    two = _global_order(cfg, 2, epoch=3)
    done = 2 * 2 * cfg.batch_size
    for world, again in ((1, 0), (3, 4)):
        start, redo = resume_position(done, cfg.batch_size, world)
        assert (start, redo) == (done // (cfg.batch_size * world), again)
        rest = _global_order(cfg, world, epoch=3, start=start)
        assert rest == two[done - redo : done - redo + len(rest)] and rest, world


# ---- elastic continuation: a lost node, the survivor finishes by itself (issue 22 item 5) -------------------------

NODE_TIMEOUT_S = 20  # engine.collective_timeout_s of the two-"node" run


@contextlib.contextmanager
def _two_netns_nodes(tag: str, subnet: str) -> Iterator[None]:
    """Two network namespaces joined by a veth pair, as launch/two_node_netns.sh makes them (root only)."""
    run = functools.partial(subprocess.run, check=True, capture_output=True)
    try:
        for i in (0, 1):
            run(["ip", "netns", "add", f"{tag}n{i}"])
        run(["ip", "link", "add", f"{tag}v0", "type", "veth", "peer", "name", f"{tag}v1"])
        for i in (0, 1):
            run(["ip", "link", "set", f"{tag}v{i}", "netns", f"{tag}n{i}"])
            run(["ip", "-n", f"{tag}n{i}", "addr", "add", f"{subnet}.{i + 1}/24", "dev", f"{tag}v{i}"])
            run(["ip", "-n", f"{tag}n{i}", "link", "set", f"{tag}v{i}", "up"])
            run(["ip", "-n", f"{tag}n{i}", "link", "set", "lo", "up"])
        yield
    finally:
        for i in (0, 1):
            _kill_netns(f"{tag}n{i}")
            subprocess.run(["ip", "netns", "del", f"{tag}n{i}"], capture_output=True)


def _kill_netns(netns: str) -> None:
    """SIGKILL every process in ``netns`` (what a scheduler does with a node it lost)."""
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


@pytest.mark.slow
def test_a_lost_node_the_survivor_re_rendezvous_and_finishes_from_the_newest_step_checkpoint(
    tiny_shards, tmp_path, request
):
    """``NNODES=1:2`` with the c10d rendezvous and restarts, one rank per netns "node", a step checkpoint after every
    step. Node 1's rank freezes as it is about to take step 4 (fault ``signal_at``, SIGSTOP), its link is cut and its
    processes killed; node 0's rank fails its collective after the timeout, its torchrun re-rendezvous without node 1
    and restarts it on a world of 1, which resumes from step_0002_000001 (resharding ZeRO-1) and finishes the run.
    In the world-size-invariant mode (when the build has it) the final weights equal the uninterrupted 2-rank run's."""
    from tests.test_train import _can_make_netns

    why = _can_make_netns()
    if why:
        pytest.skip(why)
    invariant = INVARIANT if _invariant_mode_exists() else []
    tag, subnet = f"dr{uuid.uuid4().hex[:6]}", f"10.203.{random.randint(20, 220)}"
    work = relative_workdir(tmp_path / "work", tiny_shards)
    args = [*invariant, "log.checkpoint_every_steps=1", f"engine.collective_timeout_s={NODE_TIMEOUT_S}"]
    env = _env(
        "signal_at",
        DPM_FAULT_SIGNAL_STEP="4",
        DPM_FAULT_SIGNAL="STOP",
        MAX_RESTARTS="2",
        NNODES="1:2",
        RDZV_ENDPOINT=f"{subnet}.1:{free_port()}",
        RDZV_ID=tag,
        RDZV_LAST_CALL_TIMEOUT="5",
        MASTER_ADDR=f"{subnet}.1",
    )
    latest = work / "run" / "checkpoints" / "latest"
    with _two_netns_nodes(tag, subnet):
        procs, logs = [], [tmp_path / f"node{i}.log" for i in (0, 1)]
        for i in (0, 1):
            node = ["ip", "netns", "exec", f"{tag}n{i}", "env", f"GLOO_SOCKET_IFNAME={tag}v{i}"]
            with open(logs[i], "w") as log:
                procs.append(
                    subprocess.Popen(
                        [
                            *node,
                            f"LOCAL_ADDR={subnet}.{i + 1}",
                            f"RDZV_IS_HOST={str(i == 0).lower()}",
                            *_launch(1, *args),
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=work,
                    )
                )
        deadline = time.time() + RUN_TIMEOUT_S
        try:
            while not (latest.is_file() and latest.read_text() == STOP_TAG):  # node 1 then freezes before step 4
                assert procs[0].poll() is None and time.time() < deadline, logs[0].read_text()[-3000:]
                time.sleep(0.05)
            subprocess.run(["ip", "-n", f"{tag}n1", "link", "set", f"{tag}v1", "down"], check=True)
            _kill_netns(f"{tag}n1")
            cut = time.time()
            rc = procs[0].wait(timeout=RUN_TIMEOUT_S)
            finished = time.time() - cut
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=60)
    node0 = logs[0].read_text()
    print(f"\n[elastic] node 1 cut after {STOP_TAG}: node 0 finished the run alone {finished:.0f} s later")
    assert rc == 0, node0[-5000:]
    assert f"resumed from {STOP_TAG} (epoch 2, step 1 of 2; step 3, world size 2)" in node0, node0[-5000:]
    assert "resharding the ZeRO-1 optimiser state of " + STOP_TAG + " from 2 to 1 ranks" in node0
    run = work / "run"
    assert json.loads((run / "results.json").read_text())["steps"] == 6
    _each_step_once(run, 6)
    if invariant:
        _assert_close(model_weights(run), model_weights(request.getfixturevalue("invariant_reference")))


def test_the_stream_sampler_resumes_inside_an_epoch_with_the_batches_it_had(tiny_shards):
    """Same world size and workers: the epoch's stream read again from its start, its first batches dropped, so the
    batches after the position are the ones the uninterrupted epoch had; ``replay=False`` (another world size) starts
    the stream over and yields only the remaining count."""
    from dpm_dist.config import DataConfig
    from dpm_dist.data.loader import TrainLoader
    from dpm_dist.dist import DistEnv

    cfg = DataConfig(
        dataset="generic",
        root=str(tiny_shards),
        sampler="stream",
        batches_per_epoch=5,
        num_ids=2,
        num_instances=2,
        num_workers=0,
        img_size=[16, 8],
    )
    env = DistEnv(rank=1, world_size=2)

    def keys(start: int = 0, replay: bool = True) -> list[list[str]]:
        return [b["keys"] for b in TrainLoader(cfg, env, seed=5).epoch(2, start, replay=replay)]

    whole = keys()
    assert len(whole) == 5
    assert keys(3) == whole[3:]
    assert keys(3, replay=False) == whole[:2]


def test_a_position_another_global_batch_does_not_divide_resumes_at_the_step_boundary_before_it(caplog):
    from dpm_dist.dist import DistEnv
    from dpm_dist.train.loop import _resume_start
    from dpm_dist.train.state import RunState

    state = RunState({}, [], [], epoch=2, step=3, epoch_step=2, epoch_steps=3, epoch_samples=16)
    with caplog.at_level("WARNING", logger="dpm_dist"):
        assert _resume_start(4, DistEnv(rank=0, world_size=3), state) == 1
    assert state.epoch_samples == 12  # what the next step checkpoint counts from
    assert "resuming epoch 2 at its step 2 of this world size: the 16 samples trained before the stop are not a " in (
        caplog.text
    )
    assert "global batches of 12; the last 4 of them are trained again" in caplog.text
    state = RunState({}, [], [], epoch=2, step=3, epoch_step=2, epoch_steps=3, epoch_samples=16)
    assert _resume_start(8, DistEnv(rank=0, world_size=1), state) == 2 and state.epoch_samples == 16


def test_a_change_made_when_resuming_from_a_step_checkpoint_is_recorded_from_its_next_step(tmp_path):
    from dpm_dist.config import DPMConfig
    from dpm_dist.train.loop import resolved_config, resume_plan, write_config

    cfg = DPMConfig()
    cfg.log.output_dir = str(tmp_path)
    cfg.log.allow_config_change = ["loss.alpha"]
    before = resolved_config(cfg)
    cfg.loss.alpha = 0.3
    saved = {"config": before, "epoch": 2, "step": 7, "epoch_step": 1, "epoch_steps": 6, "tag": "step_0002_000001"}
    history = resume_plan(cfg, resolved_config(cfg), saved)
    assert history == [{"after_epoch": 1, "after_step": 7, "changes": {"loss.alpha": [0.5, 0.3]}}]
    write_config(str(tmp_path), resolved_config(cfg), history)
    assert "# from step 8 (epoch 2): loss.alpha 0.5 -> 0.3" in (tmp_path / "config.yaml").read_text()
    epoch_end = dict(saved, tag="epoch_0002", epoch_step=6)  # a step checkpoint at its epoch's end: the epoch's
    assert resume_plan(cfg, resolved_config(cfg), epoch_end)[0]["after_epoch"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "nnodes,rdzv,message",
    [
        (
            "1:2",
            "",
            "NNODES=1:2 is a range of nodes: it needs the c10d rendezvous (set RDZV_ENDPOINT=host:port, the same on every node)",
        ),
        ("2:1", "127.0.0.1:29400", "NNODES=2:1: expected a node count (2) or a range MIN:MAX with MIN <= MAX (1:4)"),
        ("two", "", "NNODES=two: expected a node count (2) or a range MIN:MAX (1:4)"),
    ],
)
def test_a_node_range_needs_c10d_and_a_valid_range(tmp_path, nnodes, rdzv, message):
    env = dict(_env(), NNODES=nnodes, RDZV_ENDPOINT=rdzv)
    proc = _run(["bash", str(ROOT / "launch" / "torchrun.sh"), "1", "optim.epochs=1"], tmp_path, env)
    assert proc.returncode == 2 and proc.stderr.strip() == f"torchrun.sh: error: {message}", proc.stderr
    assert not proc.stdout
