"""Recovery from faults with the real command (issue 13): a killed rank restarted by torchrun and then the
whole job killed (``kill -9``) and run again, damaged checkpoints (truncated, garbage, a missing rank file, a
crash in the middle of a save) and a full disk.

Each ends as the uninterrupted reference run of ``conftest.py`` (2 ranks, ZeRO-1, 3 epochs × 2 steps) ends,
bit for bit, or stops with one line that names the folder; the damaged cases resume copies of the reference
run's own checkpoints, so each costs one epoch of training (garbage in a rank file and the crash in a save
share one such launch).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import (
    ROOT,
    RUN_TIMEOUT_S,
    TINY_TRAIN,
    VENV_BIN,
    assert_identical,
    fault_env,
    kill_tree,
    model_weights,
    relative_workdir,
    run_ranks,
    train_env,
)

ZERO_RANK_1 = "main/zero_pp_rank_1_mp_rank_00_optim_states.pt"


def _launch(*extra: str) -> list[str]:
    """``bash launch/torchrun.sh 2`` on the tiny model, relative paths: the reference run's command."""
    return [
        "bash",
        str(ROOT / "launch" / "torchrun.sh"),
        "2",
        *TINY_TRAIN,
        "data.root=shards",
        "log.output_dir=run",
        "engine.zero_stage=1",
        *extra,
    ]


def _env(faults: str = "", **extra: str) -> dict[str, str]:
    """The launcher's environment; ``faults``: test-side faults (``fault_env``) with their parameters in ``extra``."""
    env = dict(fault_env(faults) if faults else train_env(), PATH=f"{VENV_BIN}:{os.environ['PATH']}", **extra)
    env.pop("PYTHON", None)
    return env


def _resumable_copy(uninterrupted: Path, work: Path) -> Path:
    """The reference run as it stood after its last save, before its final files: the same command resumes it."""
    run = work / "run"
    shutil.copytree(uninterrupted, run, symlinks=True)
    for name in ("results.json", "model_final.pt", "model_best.pt"):
        (run / name).unlink(missing_ok=True)
    return run


def _damage(folder: Path, how: str) -> str:
    """Damage one rank's file of a checkpoint folder as a failing disk or a crashed copy would; the expected problem."""
    target = folder / ZERO_RANK_1
    size = target.stat().st_size
    if how == "truncate":
        with open(target, "r+b") as f:
            f.truncate(size // 2)
        return f"{ZERO_RANK_1} has {size // 2} bytes, the manifest says {size}"
    if how == "garbage":  # the same size: only the checksum sees it
        with open(target, "r+b") as f:
            f.seek(size // 3)
            f.write(os.urandom(4096))
        return f"{ZERO_RANK_1} does not match its sha256 (damaged)"
    if how == "missing":
        (folder / "rng" / "rank_1.pt").unlink()
        return "rng/rank_1.pt is missing"
    (folder / "manifest.json").unlink()  # "unfinished"
    return "no manifest.json (its save did not finish)"


def _find(env, root: str):
    from dpm_dist.train import checkpoint

    try:
        meta = checkpoint.find_resumable(root, env)
        return meta and meta["tag"]
    except ValueError as err:
        return f"error: {err}"


DAMAGES = ("truncate", "garbage", "missing", "unfinished")


def _find_each(env, roots: list[str]) -> list:
    return [_find(env, root) for root in roots]


def _unverifiable(ckpts: Path) -> tuple[str, str]:
    """Damage both checkpoint folders; their expected problems."""
    return _damage(ckpts / "epoch_0003", "garbage"), _damage(ckpts / "epoch_0002", "missing")


def _legacy(ckpts: Path) -> None:
    """Make every folder look written before manifests existed: no manifest.json, no checkpoint_format in meta.json."""
    for folder in ckpts.glob("epoch_*"):
        (folder / "manifest.json").unlink()
        meta = json.loads((folder / "meta.json").read_text())
        meta.pop("checkpoint_format")
        (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.slow
def test_a_damaged_checkpoint_is_named_and_the_previous_one_is_found(uninterrupted, tmp_path, how, caplog):
    ckpts = _resumable_copy(uninterrupted, tmp_path) / "checkpoints"
    assert run_ranks(_find, 1, tmp_path / "w0", str(ckpts)) == ["epoch_0003"]
    problem = _damage(ckpts / "epoch_0003", how)
    with caplog.at_level("WARNING", logger="dpm_dist"):
        assert run_ranks(_find, 1, tmp_path / "w1", str(ckpts)) == ["epoch_0002"]
    assert f"skipping epoch_0003: {problem}; resuming from epoch_0002" in caplog.text


@pytest.mark.slow
def test_every_rank_gets_the_same_answer_for_damaged_unverifiable_and_legacy_folders(uninterrupted, tmp_path):
    """The search is collective and 3 ranks share out the hashing: each kind of damage, a folder where nothing
    verifies and one from before manifests give every rank the answer of one process (one spawn of the ranks)."""
    roots, expected = [], []
    for how in DAMAGES:
        ckpts = _resumable_copy(uninterrupted, tmp_path / how) / "checkpoints"
        _damage(ckpts / "epoch_0003", how)
        roots.append(str(ckpts))
        expected.append("epoch_0002")
    ckpts = _resumable_copy(uninterrupted, tmp_path / "unverifiable") / "checkpoints"
    _unverifiable(ckpts)
    roots.append(str(ckpts))
    expected.append(run_ranks(_find, 1, tmp_path / "w1", str(ckpts))[0])
    assert expected[-1].startswith(f"error: no checkpoint in {ckpts} verifies"), expected[-1]
    ckpts = _resumable_copy(uninterrupted, tmp_path / "legacy") / "checkpoints"
    _legacy(ckpts)
    roots.append(str(ckpts))
    expected.append("epoch_0003")
    assert run_ranks(_find_each, 3, tmp_path / "w3", roots) == [expected] * 3


@pytest.mark.slow
def test_when_no_checkpoint_verifies_the_command_lists_what_was_found(uninterrupted, tiny_shards, tmp_path):
    work = relative_workdir(tmp_path / "work", tiny_shards)
    ckpts = _resumable_copy(uninterrupted, work) / "checkpoints"
    first, second = _unverifiable(ckpts)
    proc = subprocess.run(
        [str(VENV_BIN / "dpm-train"), *TINY_TRAIN, "data.root=shards", "log.output_dir=run"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=work,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"dpm-train: error: no checkpoint in {ckpts} verifies (epoch_0003: {first}; epoch_0002: {second}); move the folder "
        "away (or set a new log.output_dir) to start over"
    )


@pytest.fixture(scope="module")
def garbage_then_crash_in_save(
    uninterrupted: Path, tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str, subprocess.CompletedProcess]:
    """One launch that both tests below read: the reference run's copy with garbage in a rank file of epoch_0003
    (and ``latest`` set back to epoch_0002, so that the save below visibly does not move it), resumed by the
    reference command, which trains epoch 3 and is killed in the middle of its save (fault ``save_crash``,
    tests/faults/fault_save_crash.py: after the main engine's files, the whole model's weights and buffers, before
    the mask engine's).

    Returns the run folder, the damage's expected problem and the launch. Read-only: the crash test reruns a copy.
    """
    work = relative_workdir(tmp_path_factory.mktemp("garbage_crash") / "work", tiny_shards)
    run = _resumable_copy(uninterrupted, work)
    problem = _damage(run / "checkpoints" / "epoch_0003", "garbage")
    (run / "checkpoints" / "latest").write_text("epoch_0002")
    proc = subprocess.run(
        _launch(),
        capture_output=True,
        text=True,
        env=_env("save_crash", DPM_FAULT_SAVE_CRASH_EPOCH="3", MAX_RESTARTS="0"),
        cwd=work,
        timeout=RUN_TIMEOUT_S,
    )
    return run, problem, proc


@pytest.mark.slow
def test_garbage_in_a_rank_file_resumes_from_the_previous_checkpoint_to_the_same_weights(
    garbage_then_crash_in_save, uninterrupted
):
    run, problem, proc = garbage_then_crash_in_save
    out = proc.stdout + proc.stderr
    assert f"skipping epoch_0003: {problem}; resuming from epoch_0002" in out, out[-5000:]
    assert "resumed from epoch_0002 (epoch 2, step 4, world size 2)" in proc.stdout
    # What it trained in epoch 3, as its save wrote it before the kill: the reference's weights, bit for bit.
    saved = torch.load(run / "checkpoints" / "epoch_0003" / "main" / "mp_rank_00_model_states.pt", weights_only=False)
    assert_identical(saved["module"], model_weights(uninterrupted))


@pytest.mark.slow
def test_a_crash_in_the_middle_of_a_save_keeps_latest_and_the_rerun_ends_with_the_same_weights(
    garbage_then_crash_in_save, uninterrupted, tiny_shards, tmp_path
):
    crashed_run, _, crashed = garbage_then_crash_in_save
    assert crashed.returncode != 0, crashed.stdout[-3000:]
    work = relative_workdir(tmp_path / "work", tiny_shards)
    run = work / "run"
    shutil.copytree(crashed_run, run, symlinks=True)
    ckpts = run / "checkpoints"
    assert (ckpts / "epoch_0003" / "main").is_dir() and not (ckpts / "epoch_0003" / "manifest.json").exists()
    assert (ckpts / "latest").read_text() == "epoch_0002"  # a folder is a checkpoint only once its manifest is written

    # (restarts off: no preflight process; the reference run, the killed rank and the mistake tests start with them on)
    proc = subprocess.run(
        _launch(), capture_output=True, text=True, env=_env(MAX_RESTARTS="0"), cwd=work, timeout=RUN_TIMEOUT_S
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "skipping epoch_0003: no manifest.json (its save did not finish); resuming from epoch_0002" in out
    assert_identical(model_weights(run), model_weights(uninterrupted))
    assert (ckpts / "latest").read_text() == "epoch_0003" and (ckpts / "epoch_0003" / "manifest.json").is_file()


def _worker(parent: psutil.Process, local_rank: str) -> psutil.Process:
    for proc in parent.children(recursive=True):
        try:
            if proc.environ().get("LOCAL_RANK") == local_rank and "dpm_dist.cli.train" in " ".join(proc.cmdline()):
                return proc
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} under {parent.pid}")


def _wait_for(proc: subprocess.Popen, log_path: Path, ready: Callable[[str], bool], deadline: float) -> None:
    while not ready(log_path.read_text()):
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)


def _tb_steps(tb: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_a_killed_rank_is_restarted_by_torchrun_then_after_kill_9_the_same_command_ends_with_the_same_weights(
    uninterrupted, tiny_shards, tmp_path
):
    """Two faults in one run of the reference command. Rank 1 SIGKILLed in epoch 2: torchrun restarts both ranks,
    which resume from epoch_0001. Once they have checkpointed epoch 2 and logged a step of epoch 3, the whole job
    (torchrun and both ranks) is SIGKILLed: the same command again resumes and ends with the reference's weights,
    bit for bit (so the restarted ranks' epoch 2 was the reference's too), each step in TensorBoard once."""
    work = relative_workdir(tmp_path / "work", tiny_shards)
    log_path, run = work / "run.log", work / "run"
    latest = run / "checkpoints" / "latest"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_launch(), stdout=log, stderr=subprocess.STDOUT, env=_env(MAX_RESTARTS="2"), cwd=work)
        deadline = time.time() + RUN_TIMEOUT_S
        try:  # epoch 1 is checkpointed and epoch 2 has started
            _wait_for(
                proc,
                log_path,
                lambda text: bool(latest.is_file() and latest.read_text().strip()) and "[step 3 " in text,
                deadline,
            )
            _worker(psutil.Process(proc.pid), "1").kill()
            killed = time.time()
            _wait_for(proc, log_path, lambda text: "resumed from" in text, deadline)
            resumed = time.time() - killed
            _wait_for(
                proc,
                log_path,
                lambda text: (
                    latest.read_text().strip() == "epoch_0002"
                    and "[step 5 " in text.partition("start     resumed from")[2]
                ),
                deadline,
            )
        finally:
            kill_tree(proc.pid)  # kill -9 of the job: torchrun and both ranks
            proc.wait(timeout=60)
    text = log_path.read_text()
    starts = [line for line in text.splitlines() if "start     resumed from" in line]
    assert len(starts) == 1 and "resumed from epoch_0001 (epoch 1, step 2, world size 2)" in starts[0], text[-3000:]
    before = text[: text.index(starts[0])]
    lost = max(int(n) for n in re.findall(r"\[step (\d+) ", before)) - 2
    print(
        f"\n[restart] SIGKILL of rank 1 -> training resumed {resumed:.1f} s later from epoch_0001 ({lost} steps redone)"
    )
    tag = latest.read_text().strip()
    assert tag in ("epoch_0002", "epoch_0003") and not (run / "results.json").exists()

    # (restarts off: no preflight process; the reference run and the mistake test start with them on)
    again = subprocess.run(
        _launch(), capture_output=True, text=True, env=_env(MAX_RESTARTS="0"), cwd=work, timeout=RUN_TIMEOUT_S
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    epoch = int(tag[-4:])
    assert f"resumed from {tag} (epoch {epoch}, step {2 * epoch}, world size 2)" in again.stdout
    assert_identical(model_weights(run), model_weights(uninterrupted))  # every parameter and buffer, bit for bit
    # (The in-training metrics are not compared: after 6 steps the tiny model's features lie within a
    # few ulps of each other, so the kernel path of a freshly loaded vs a trained-in-place parameter
    # can swap near-ties; dpm-eval of the two model files gave identical metrics when this was written.)
    assert latest.read_text().strip() == "epoch_0003" and json.loads((run / "results.json").read_text())["steps"] == 6
    steps = _tb_steps(run / "tb")  # each resume purged what the killed ranks logged past its checkpoint
    assert steps["train/loss"] == [1, 2, 3, 4, 5, 6]
    assert not {name: s for name, s in steps.items() if len(s) != len(set(s))}


@contextlib.contextmanager
def _small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder`` (root only): a real full disk, ENOSPC and all."""
    folder.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_names_the_folder(tiny_shards, tmp_path):
    with _small_disk(tmp_path / "disk", "14m") as disk:
        (tmp_path / "shards").symlink_to(tiny_shards)
        args = [str(VENV_BIN / "dpm-train"), *TINY_TRAIN, "data.root=shards", "optim.epochs=2", "eval.period=2"]
        # One checkpoint of the tiny model (one rank, ZeRO-0) takes 8.9 MiB: the first fits, the second does not.
        proc = subprocess.run(
            [*args, "log.output_dir=disk/run"],
            capture_output=True,
            text=True,
            env=_env(),
            cwd=tmp_path,
            timeout=RUN_TIMEOUT_S,
        )
        ckpts = disk / "run" / "checkpoints"
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(
            f"dpm-train: error: saving checkpoint {ckpts / 'epoch_0002'} failed: No space left on device ("
        ), line
        assert "MiB free of 14 MiB); epoch_0001 is intact and still the latest; free space and re-run" in line, line
        assert (ckpts / "latest").read_text() == "epoch_0001" and not (ckpts / "epoch_0002").exists()

        shutil.copytree(disk / "run", tmp_path / "bigger")  # the same run on a disk with room
        again = subprocess.run(
            [*args, "log.output_dir=bigger"],
            capture_output=True,
            text=True,
            env=_env(),
            cwd=tmp_path,
            timeout=RUN_TIMEOUT_S,
        )
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resumed from epoch_0001 (epoch 1, step 2, world size 1)" in again.stdout


@pytest.mark.slow
def test_a_full_disk_while_writing_a_model_file_replaces_nothing(tmp_path):
    import torch

    from dpm_dist.model.files import save_model_file

    with _small_disk(tmp_path / "disk", "1m") as disk:
        (disk / "model_final.pt").write_bytes(b"previous")
        with pytest.raises(
            OSError,
            match=r"writing the model file .*model_final.pt failed: No space left on device "
            r"\(0\.\d MiB free of 1 MiB\); no file was replaced",
        ):
            save_model_file(torch.nn.Linear(1024, 1024), str(disk / "model_final.pt"), {})  # 4 MiB of weights
        assert (disk / "model_final.pt").read_bytes() == b"previous" and os.listdir(disk) == ["model_final.pt"]


@pytest.mark.slow
def test_a_mistake_in_the_run_is_not_restarted_over_and_over(tiny_shards, tmp_path):
    """A non-finite streak (a bad value, not a machine fault) under restarts: the first attempt stops with its
    line, the restarted ranks stop at once with the same line instead of replaying the epoch."""
    work = relative_workdir(tmp_path / "work", tiny_shards)
    proc = subprocess.run(
        _launch("engine.max_nonfinite_steps=2"),
        capture_output=True,
        text=True,
        env=_env("nonfinite", MAX_RESTARTS="2", DPM_FAULT_NONFINITE_STEPS="3,4"),
        cwd=work,
        timeout=RUN_TIMEOUT_S,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    first = (
        "step 4: 2 steps in a row skipped for non-finite values (loss, loss_id, loss_mask_id, loss_hem, loss_triplet; "
        "engine.max_nonfinite_steps=2); last good checkpoint: epoch_0001"
    )
    assert f"dpm-train: error: {first}" in proc.stderr, out[-3000:]
    assert proc.stderr.count("(stopped again at once: a restart would only repeat it)") == 2 * 2  # 2 restarts x 2 ranks
    assert out.count("[step 4 ") == 1 and out.count("start     resumed from") == 0  # no epoch was replayed


@pytest.mark.slow
def test_a_checkpoint_from_before_manifests_still_resumes(uninterrupted, tmp_path, caplog):
    """Folders written before manifests existed (no manifest.json, no checkpoint_format in meta.json): the one
    ``latest`` names resumes, unverified, with a warning; an upgrade does not strand a run."""
    ckpts = _resumable_copy(uninterrupted, tmp_path) / "checkpoints"
    _legacy(ckpts)
    with caplog.at_level("WARNING", logger="dpm_dist"):
        assert run_ranks(_find, 1, tmp_path / "w1", str(ckpts)) == ["epoch_0003"]
    assert "epoch_0003 was written before checkpoints had manifests: resuming from it unverified" in caplog.text
    # on several ranks: test_every_rank_gets_the_same_answer_for_damaged_unverifiable_and_legacy_folders
