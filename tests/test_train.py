"""``dpm-train`` end to end on CPU (gloo): 2-rank ZeRO-1 and 2-"node" ZeRO-2 runs, resume on another number of
ranks, and fail-fast configuration errors (``kill -9`` + the same command to the same weights: test_recovery.py,
after a killed rank's restart in the same run).

Every run is the real command (``dpm-train`` / ``torchrun -m dpm_dist.cli.train``) on the tiny synthetic
shards of ``conftest.py`` with the tiny ViT at 64×32 px; each takes tens of seconds on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    RUN_TIMEOUT_S,
    TINY_TRAIN,
    VENV_BIN,
    assert_identical,
    free_port,
    model_weights,
    relative_workdir,
    train_env,
)

ROOT = Path(__file__).resolve().parents[1]

TINY = TINY_TRAIN


def _overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.root={shards}", f"log.output_dir={out}", *extra]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=train_env(), cwd=cwd, timeout=RUN_TIMEOUT_S)
    with open(cwd / "runs.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_launch_script_runs_where_the_user_stands(uninterrupted):
    # launch/torchrun.sh used to cd into the repository: `shards` and the run folder resolved there.
    assert (uninterrupted / "results.json").is_file() and uninterrupted.parent.name == "work"
    assert not (ROOT / "uninterrupted").exists()
    meta = json.loads((uninterrupted / "checkpoints" / "epoch_0003" / "meta.json").read_text())
    assert meta["config"]["data"]["root"] == str(uninterrupted.parent / "shards")


# What the libraries printed in a tiny run before log.level (2 ranks: 13 lines): DeepSpeed's op probes and
# shared-memory op build (stdout), torch's CUDA_HOME warning, DeepSpeed's deprecated gather, a stray bar.
NOISE = (
    "gcc ",
    "-laio",
    "built successfully",
    "No CUDA runtime is found",
    "all_gather_into_tensor",
    "0it [",
    "final: {",
)


@pytest.mark.slow
def test_start_up_summary_then_quiet_logs_then_where_everything_is(uninterrupted):
    text = (uninterrupted.parent / "reference.log").read_text()
    stdout = text.split("----- stderr -----")[0]
    for line in (
        "dpm-train tiny_synthetic\n",
        f"  data      synthetic: {uninterrupted.parent / 'shards'} (48 images, 8 identities, 3 cameras; sampler exact)\n",
        "  batch     4 ids x 2 images x 2 ranks = 16 images per step\n",
        "  schedule  3 epochs x 2 steps, evaluated every 3 epochs and at the end\n",
        "  engine    fp32, ZeRO-1, update mode exact\n",
        f"  output    {uninterrupted}\n",
        "  start     new run\n",
    ):
        assert line in stdout, (line, stdout[:3000])
    assert stdout.index("  start     new run") < stdout.index("[step 1 ")  # the block comes first
    for noise in NOISE:
        assert noise not in text, (noise, text[-4000:])
    tail = stdout[stdout.index('{"results"') :]
    assert "rank-1 " in tail and "(10 queries, 15 gallery images)" in tail
    assert (
        f"written to {uninterrupted}: model_final.pt, model_best.pt, results.json, config.yaml, checkpoints/ (latest epoch_0003)"
        in tail
    )
    assert f"TensorBoard: tensorboard --logdir {uninterrupted / 'tb'}" in tail


@pytest.mark.slow
def test_two_rank_zero1_run_trains_evaluates_and_writes_everything(uninterrupted):
    results = json.loads((uninterrupted / "results.json").read_text())
    assert results["epochs"] == 3 and results["steps"] == 6
    assert set(results["results"]) >= {"mAP", "rank1", "mINP"} and 0.0 <= results["results"]["mAP"] <= 1.0
    ckpts = uninterrupted / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "epoch_0003"
    meta = json.loads((ckpts / "epoch_0003" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 6 and meta["config"]["engine"]["zero_stage"] == 1
    assert sorted(p.name for p in (ckpts / "epoch_0003" / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    for engine in ("main", "mask"):  # every rank wrote its ZeRO shard of both engines
        assert len(list((ckpts / "epoch_0003" / engine).glob("zero_pp_rank_*_optim_states.pt"))) == 2
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("epoch_")) == [
        "epoch_0002",
        "epoch_0003",
    ]  # keep_last 2
    assert (uninterrupted / "config.yaml").is_file() and (uninterrupted / "model_best.pt").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(uninterrupted / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/loss_id",
        "train/loss_mask_id",
        "train/loss_hem",
        "train/loss_triplet",
        "train/loss_step2",
        "lr/main_weight",
        "lr/main_bias",
        "lr/mask_weight",
        "perf/samples_per_sec",
        "perf/data_time",
        "eval/mAP",
        "eval/rank1",
    ):
        assert tag in tags, (tag, sorted(tags))
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert not [t for t in tags if "num_" in t], sorted(tags)  # counts are neither scalars nor hparam metrics


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_resuming_a_finished_run_with_another_config_is_refused_and_changes_nothing(
    uninterrupted, tiny_shards, tmp_path
):
    work = relative_workdir(tmp_path / "work", tiny_shards)
    shutil.copytree(uninterrupted, work / "run")
    before = _snapshot(work / "run")
    args = [str(VENV_BIN / "dpm-train"), *TINY, "data.root=shards", "log.output_dir=run", "engine.zero_stage=1"]
    proc = subprocess.run(
        args + ["loss.alpha=0.3", "loss.margin=0.2"],
        capture_output=True,
        text=True,
        env=train_env(),
        cwd=work,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("dpm-train: error: log.output_dir "), proc.stderr
    for part in (
        "loss.alpha: 0.5 in the checkpoint, 0.3 now",
        "loss.margin: 0.5 in the checkpoint, 0.2 now",
        "use a new log.output_dir",
        "log.allow_config_change=[loss.alpha,loss.margin]",
    ):
        assert part in error[0], error[0]
    assert _snapshot(work / "run") == before
    # The same command again: finished, nothing trained, no file touched (config.yaml, model files, tb/...).
    again = _run(args, cwd=work)
    assert f"{work / 'run'} is finished (epoch_0003, epoch 3 of 3): nothing to train, no file changed" in again.stdout
    assert "rank-1 " in again.stdout
    assert _snapshot(work / "run") == before


@pytest.mark.slow
def test_resume_two_ranks_on_one_rank_reshards_the_zero_state(uninterrupted, tiny_shards, tmp_path):
    out = tmp_path / "one_rank"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    args = [str(VENV_BIN / "dpm-train"), *_overrides(tiny_shards, out, "engine.zero_stage=1")]
    # Same epoch count: nothing left to train, so the exported weights are exactly what was loaded.
    first = _run(args, cwd=tmp_path)
    assert "resharding the ZeRO-1 optimiser state of epoch_0003 from 2 to 1 ranks" in first.stdout
    assert "resumed from epoch_0003 (epoch 3, step 6, world size 2)" in first.stdout
    assert_identical(model_weights(out), model_weights(uninterrupted))
    # One more epoch on one rank continues from the loaded optimiser state, with a deliberate change of α
    # that everything the run writes records.
    more = _run(
        args + ["optim.epochs=4", "eval.period=4", "loss.alpha=0.3", "log.allow_config_change=[loss.alpha]"],
        cwd=tmp_path,
    )
    assert "resumed from epoch_0003" in more.stdout
    meta = json.loads((out / "checkpoints" / "epoch_0004" / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["step"] == 8
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 8
    expected = {
        "loss.alpha": [0.5, 0.3],
        "optim.epochs": [3, 4],
        "eval.period": [3, 4],
        "data.root": [str(uninterrupted.parent / "shards"), str(tiny_shards)],
    }  # the reference ran on a symlink
    for record in (
        meta["config_changes"],
        results["config_changes"],
        torch.load(out / "model_final.pt")["meta"]["config_changes"],
    ):
        assert record == [{"after_epoch": 3, "changes": expected}], record
    assert "# from epoch 4: loss.alpha 0.5 -> 0.3" in (out / "config.yaml").read_text()


@pytest.mark.slow
def test_ctrl_c_says_what_was_saved_and_how_to_resume(tiny_shards, tmp_path):
    """Deterministic (issue 25 item 5): Ctrl-C is recorded and acted on at the next step boundary, so it is never
    lost (it used to be swallowed by a DataLoader iterator's __del__ at an epoch boundary, the run going on to the
    end); two quick Ctrl-C's as a terminal sends them (the whole process group, DataLoader workers too) print no
    worker traceback."""
    import signal

    work = relative_workdir(tmp_path / "work", tiny_shards)
    args = [
        str(VENV_BIN / "dpm-train"),
        *TINY,
        "data.root=shards",
        "log.output_dir=run",
        "optim.epochs=40",
        "eval.period=40",
        "log.progress=true",
        "data.num_workers=2",
    ]
    log_path = tmp_path / "out.log"
    with open(log_path, "w") as log:  # stdout and stderr in one stream, as on a terminal
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=train_env(), cwd=work, start_new_session=True
        )
        deadline = time.time() + RUN_TIMEOUT_S
        try:
            while "[step 3 " not in log_path.read_text():  # the first epoch's checkpoint is written
                assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(timeout=120) == 130, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    tag = (work / "run" / "checkpoints" / "latest").read_text().strip()
    last = text.strip().splitlines()[-1]
    epoch = int(tag.split("_")[1])
    ckpts = work / "run" / "checkpoints"
    resume = "re-run the same command to resume from it"
    assert last == (  # in the middle of an epoch: a step checkpoint written at that step, nothing to train again
        f"dpm-train: interrupted (SIGINT) after step {2 * epoch - 1} (epoch {epoch}, step 1 of 2); the latest "
        f"checkpoint is {tag} (epoch {epoch}, step 1 of 2), written at this stop, in {ckpts}; {resume} (no step is "
        "trained again)"
        if tag.startswith("step_")
        else f"dpm-train: interrupted (SIGINT) after epoch {epoch}, step {2 * epoch}; the latest checkpoint is {tag} "
        f"(epoch {epoch} of 40) in {ckpts}; {resume}"
    ), text[-2000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    # The bar (redrawn with \r) and the [step N] lines never share a line; no stray "0it" bar.
    segments = [s for s in re.split(r"[\r\n]", text) if "[step " in s]
    assert segments and not [s for s in segments if "it/s" in s or "%|" in s], segments[:5]
    assert "0it [" not in text


@pytest.mark.slow
def test_skipped_corrupt_samples_are_counted_and_reported_at_the_end(tmp_path):
    """3 ids × 2 images (every P=3×K=2 batch holds every image), one a cut-off JPEG: with
    data.skip_corrupt=true each step skips it, and the run says how many it skipped in all."""
    from dpm_dist.data.shards import write_dataset
    from dpm_dist.data.synth import SynthSpec, synth_samples

    samples = list(
        synth_samples(
            SynthSpec(
                seed=0,
                num_ids=3,
                num_test_ids=2,
                images_per_id=2,
                query_per_id=1,
                gallery_per_id=2,
                height=32,
                width=16,
            )
        )
    )
    bad = next(i for i, s in enumerate(samples) if s.role == "train")
    samples[bad] = samples[bad].__class__(**{**vars(samples[bad]), "jpg": samples[bad].jpg[:200]})
    work = tmp_path / "work"
    write_dataset(samples, str(work / "shards"), dataset="synthetic", max_count=3)
    args = [
        str(VENV_BIN / "dpm-train"),
        *TINY,
        "data.root=shards",
        "log.output_dir=run",
        "data.num_ids=3",
        "data.skip_corrupt=true",
        "optim.epochs=3",  # one step per epoch: the bad image is drawn 3 times
        "eval.period=3",
    ]
    proc = subprocess.run(args, capture_output=True, text=True, env=train_env(), cwd=work, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    steps = json.loads((work / "run" / "results.json").read_text())["steps"]
    assert json.loads((work / "run" / "results.json").read_text())["num_skipped_corrupt"] == steps
    # One bad image, drawn at every step: one distinct sample, seen `steps` times (issue 25 item 15).
    assert steps == 3
    summary = json.loads((work / "run" / "results.json").read_text())
    assert summary["num_skipped_corrupt_samples"] == 1 and len(summary["skipped_corrupt_keys"]) == 1
    assert f"skipped 1 corrupt training sample, {steps} times in all (each time a batch drew one;" in proc.stdout


@pytest.mark.slow
def test_help_lists_only_the_groups_dpm_train_uses(tmp_path):
    proc = subprocess.run(
        [str(VENV_BIN / "dpm-train"), "--help"],
        capture_output=True,
        text=True,
        env=train_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "experiment: " in proc.stdout and "engine: fp32" in proc.stdout and "model: vit_base, vit_tiny" in proc.stdout
    )
    assert "tune:" not in proc.stdout and "tiny_asha" not in proc.stdout


@pytest.mark.slow
def test_dataset_must_match_the_shards(tiny_shards, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [str(VENV_BIN / "dpm-train"), *_overrides(tiny_shards, out), "data.dataset=occluded_duke"],
        capture_output=True,
        text=True,
        env=train_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        f"dpm-train: error: config field `data.dataset`: 'occluded_duke', but the shards in {tiny_shards} were written as "
        "'synthetic' (index.json); set data.dataset=synthetic, or data.dataset=generic for any shards"
    ) in proc.stderr
    assert not (out / "checkpoints").exists()


def _can_make_netns() -> str:
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    name = f"dpmprobe{uuid.uuid4().hex[:6]}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ""


@pytest.mark.slow
def test_two_nodes_in_network_namespaces_train_with_zero2(tiny_shards, tmp_path):
    why = _can_make_netns()
    if why:
        pytest.skip(why)
    out, logs = tmp_path / "two_node", tmp_path / "logs"
    env = dict(train_env(), PYTHON=sys.executable, LOG_DIR=str(logs), RDZV_PORT=str(free_port()))
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "launch" / "two_node_netns.sh"),
            "1",
            "-m",
            "dpm_dist.cli.train",
            *_overrides(tiny_shards, out, "engine.zero_stage=2", "optim.epochs=1", "eval.period=1"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=RUN_TIMEOUT_S,
    )
    node_logs = {p.name: p.read_text() for p in logs.glob("node*.log")}
    assert proc.returncode == 0, proc.stderr[-2000:] + "".join(v[-3000:] for v in node_logs.values())
    meta = json.loads(
        (out / "checkpoints" / "epoch_0001" / "meta.json").read_text()
    )  # one epoch: the count does not matter
    assert meta["world_size"] == 2 and meta["config"]["engine"]["zero_stage"] == 2
    assert json.loads((out / "results.json").read_text())["steps"] == 2
    assert '"results"' in node_logs["node0.log"]  # rank 0 (node 0) printed the metrics and the TensorBoard folder


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.alpha=1.5", "config field `loss.alpha`: must be in [0, 1], got 1.5"),
        (
            "model.pretrained=/nonexistent/jx_vit_base_p16_224-80ecf9dd.pth",
            "config field `model.pretrained`: weights file not found: /nonexistent/jx_vit_base_p16_224-80ecf9dd.pth",
        ),
    ],
)
@pytest.mark.slow
def test_bad_config_fails_fast_naming_the_field(tiny_shards, tmp_path, override, message):
    out = tmp_path / "run"
    proc = subprocess.run(
        [str(VENV_BIN / "dpm-train"), *_overrides(tiny_shards, out), override],
        capture_output=True,
        text=True,
        env=train_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert not (out / "checkpoints").exists()  # failed before any work


@pytest.mark.slow
def test_deepspeed_launcher_with_a_hostfile_and_no_ssh(tiny_shards, tmp_path):
    work = relative_workdir(tmp_path / "work", tiny_shards)
    (work / "hostfile").write_text("localhost slots=2\n")  # ./hostfile: the default
    env = dict(
        train_env(),
        DS_NO_SSH="1",
        NODE_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PATH=f"{VENV_BIN}:{os.environ['PATH']}",
    )
    env.pop("DEEPSPEED", None)
    leftovers = f"deepspeed_allreduce_buffer_{os.getuid()}_*_{env['MASTER_PORT']}_*"  # DeepSpeed's shm workspaces
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "launch" / "deepspeed.sh"),
            *TINY,
            "data.root=shards",
            "log.output_dir=ds",
            "engine.zero_stage=1",
            "optim.epochs=1",
            "eval.period=1",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = json.loads((work / "ds" / "checkpoints" / "epoch_0001" / "meta.json").read_text())
    assert meta["world_size"] == 2 and json.loads((work / "ds" / "results.json").read_text())["steps"] == 2
    assert "Cosine annealing scheduler will have no effect" not in proc.stdout + proc.stderr  # timm, at optim.epochs=1
    # DeepSpeed's launcher sets LOCAL_SIZE, so its CPU backend mapped a 66 MiB workspace per rank; none is left behind
    assert not list(Path("/dev/shm").glob(leftovers)), sorted(p.name for p in Path("/dev/shm").glob(leftovers))


@pytest.mark.slow
def test_deepspeed_launcher_without_a_hostfile_names_the_example(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "deepspeed.sh"), "experiment=tiny"],
        capture_output=True,
        text=True,
        env=train_env(),
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f'deepspeed.sh: error: hostfile hostfile not found (one line per node, "host slots=N"): copy '
        f"{ROOT}/launch/hostfile.example to ./hostfile and edit it, or pass its path first"
    )
