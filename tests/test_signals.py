"""Issue 25 items 4 and 5, as a user meets them: one live run per run folder, and stop signals (Ctrl-C, SIGTERM,
Slurm's SIGUSR1) that stop ``dpm-train`` at a step boundary with one line saying what is saved, the documented
exit status (128 + the signal's number), and a re-run that resumes. In the middle of an epoch the stop writes a step
checkpoint at that step, so the re-run trains nothing twice. Real commands, from a folder outside the repository,
relative paths."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, RUN_TIMEOUT_S, TINY_TRAIN, VENV_BIN, kill_tree, relative_workdir, train_env

pytestmark = pytest.mark.slow

LONG = ["data.root=shards", "log.output_dir=run", "optim.epochs=40", "eval.period=40"]


def _start(cmd: list[str], work: Path, log_path: Path) -> subprocess.Popen:
    env = dict(train_env(), PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    env.pop("PYTHON", None)
    with open(log_path, "w") as log:  # stdout and stderr in one stream, as on a terminal
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)


def _wait_for(proc: subprocess.Popen, log_path: Path, text: str) -> None:
    deadline = time.time() + RUN_TIMEOUT_S
    while text not in log_path.read_text():
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)


def _stopped_line(text: str, work: Path, how: str) -> str:
    """The run's last line: what stopped it, after which step, the checkpoint it left (in the middle of an epoch: a
    step checkpoint written at that step, so nothing is trained again) and how to resume; returns that checkpoint."""
    last = text.strip().splitlines()[-1]
    ckpts = re.escape(str(work / "run" / "checkpoints"))
    resume = "re-run the same command to resume from it"
    found = re.fullmatch(
        rf"dpm-train: {re.escape(how)} after (?:"
        rf"step (\d+) \(epoch (\d+), step 1 of 2\); the latest checkpoint is (step_(\d{{4}})_000001) \(epoch (\d+), "
        rf"step 1 of 2\), written at this stop, in {ckpts}; {resume} \(no step is trained again\)"
        rf"|epoch (\d+), step (\d+); the latest checkpoint is (epoch_(\d{{4}})) \(epoch (\d+) of 40\) in {ckpts}; {resume})",
        last,
    )
    assert found, text[-3000:]
    if found[1]:  # during an epoch: after its first step
        step, epoch, tag = int(found[1]), int(found[2]), found[3]
        assert step == 2 * epoch - 1 and int(found[4]) == int(found[5]) == epoch, last
    else:  # at an epoch's end: that epoch's checkpoint
        epoch, step, tag = int(found[6]), int(found[7]), found[8]
        assert step == 2 * epoch and int(found[9]) == int(found[10]) == epoch, last
    assert (work / "run" / "checkpoints" / "latest").read_text().strip() == tag
    assert (work / "run" / "checkpoints" / tag / "manifest.json").is_file()
    return tag


def test_second_run_in_a_folder_is_refused_then_sigterm_saves_and_a_rerun_resumes(tiny_shards, tmp_path):
    work = relative_workdir(tmp_path / "work", tiny_shards)
    cmd = [str(VENV_BIN / "dpm-train"), *TINY_TRAIN, *LONG]
    first = _start(cmd, work, tmp_path / "first.log")
    try:
        _wait_for(first, tmp_path / "first.log", "[step 3 ")  # epoch 1's checkpoint is written
        second = subprocess.run(cmd, capture_output=True, text=True, env=train_env(), cwd=work, timeout=RUN_TIMEOUT_S)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"dpm-train: error: run folder {work / 'run'} is in use by another live run: "
        ), err
        assert f"pid {first.pid} on {socket.gethostname()}" in err[0], err
        assert "[step" not in second.stdout and "resumed" not in second.stdout

        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 143, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            kill_tree(first.pid)
    text = (tmp_path / "first.log").read_text()
    assert "Traceback" not in text
    tag = _stopped_line(text, work, "stopped by SIGTERM")
    assert len(list((work / "run" / "tb").glob("events.out.tfevents.*"))) == 1  # the refused run opened none
    assert not (work / "run" / ".dpm-run.lock").exists()  # released on the way out

    step = json.loads((work / "run" / "checkpoints" / tag / "meta.json").read_text())["step"]
    again = subprocess.run(cmd, capture_output=True, text=True, env=train_env(), cwd=work, timeout=RUN_TIMEOUT_S)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {tag}" in again.stdout
    assert f"[step {step} " not in again.stdout and f"[step {step + 1} " in again.stdout  # nothing trained twice
    assert (work / "run" / "results.json").is_file()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_torchrun_sh_two_ranks_stop_in_one_line(tiny_shards, tmp_path, signum):
    work = relative_workdir(tmp_path / "work", tiny_shards)
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), "2", *TINY_TRAIN, *LONG]
    log_path = tmp_path / "out.log"
    proc = _start(cmd, work, log_path)
    try:
        _wait_for(proc, log_path, "[step 3 ")
        if signum == signal.SIGINT:  # Ctrl-C: the terminal signals the whole foreground process group, twice
            os.killpg(proc.pid, signum)
            time.sleep(0.2)
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)  # a scheduler signals the launcher
        assert proc.wait(timeout=180) == 128 + signum, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    text = log_path.read_text()
    assert "Traceback" not in text and "SignalException" not in text and "ChildFailedError" not in text, text[-3000:]
    how = "interrupted (SIGINT)" if signum == signal.SIGINT else "stopped by SIGTERM"
    _stopped_line(text, work, how)
    assert text.count(how) == 1, text[-3000:]  # rank 0 only


def test_after_kill_9_the_next_run_takes_the_lock_over_resumes_and_sigusr1_stops_it(tiny_shards, tmp_path):
    work = relative_workdir(tmp_path / "work", tiny_shards)
    cmd = [str(VENV_BIN / "dpm-train"), *TINY_TRAIN, *LONG]
    first = _start(cmd, work, tmp_path / "first.log")
    try:
        _wait_for(first, tmp_path / "first.log", "[step 3 ")
    finally:
        kill_tree(first.pid)  # kill -9: the lock file stays, naming a dead pid
    assert (work / "run" / ".dpm-run.lock").is_file()
    tag = (work / "run" / "checkpoints" / "latest").read_text().strip()
    second = _start(cmd, work, tmp_path / "second.log")
    try:
        _wait_for(second, tmp_path / "second.log", "[step ")
        second.send_signal(signal.SIGUSR1)  # Slurm's --signal
        assert second.wait(timeout=120) == 138, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        if second.poll() is None:
            kill_tree(second.pid)
    text = (tmp_path / "second.log").read_text()
    assert f"resumed from {tag}" in text and "Traceback" not in text, text[-3000:]
    _stopped_line(text, work, "stopped by SIGUSR1")
    assert not (work / "run" / ".dpm-run.lock").exists()
