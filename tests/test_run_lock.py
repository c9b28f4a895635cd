"""The run-folder lock: a live holder is refused by name, a dead one (crash, kill -9, lost node) is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpm_dist.train.run_lock import LOCK_NAME, STALE_S, RunFolderBusyError, acquire, hold

HOLDER = """
import sys, time
from dpm_dist.train.run_lock import acquire
acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def _lock_file(folder: Path, **content: object) -> Path:
    path = folder / LOCK_NAME
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


@pytest.mark.slow
def test_a_live_run_is_refused_by_name_and_its_lock_taken_over_after_kill_9(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusyError) as info:
            acquire(str(run))
        message = str(info.value)
        assert f"pid {proc.pid} on {socket.gethostname()}" in message and "log.output_dir" in message
        assert "\n" not in message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock = acquire(str(run))  # the holder died without releasing: taken over
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_NAME).exists()
    assert [p.name for p in run.iterdir()] == []  # no stale copies left behind


def test_a_recycled_pid_does_not_keep_a_dead_runs_lock(tmp_path: Path) -> None:
    # this host, a pid that runs (our parent) but started at another time than the lock records
    _lock_file(tmp_path, host=socket.gethostname(), pid=os.getppid(), pid_started=1.0, since=time.time())
    acquire(str(tmp_path)).release()


def test_another_hosts_lock_lives_while_its_heartbeat_is_fresh(tmp_path: Path) -> None:
    path = _lock_file(tmp_path, host="node-7", pid=4242, pid_started=1.0, since=time.time(), command="dpm-train")
    with pytest.raises(RunFolderBusyError, match=r"pid 4242 on node-7 since .* \(`dpm-train`; last heartbeat"):
        acquire(str(tmp_path))
    old = time.time() - STALE_S - 5
    os.utime(path, (old, old))  # the node was lost: no heartbeat for longer than STALE_S
    with hold(str(tmp_path)) as lock:
        assert lock is not None and json.loads(path.read_text())["host"] == socket.gethostname()
    assert not path.exists()


def test_a_half_written_lock_is_judged_by_its_age(tmp_path: Path) -> None:
    path = tmp_path / LOCK_NAME
    path.write_text("{")
    with pytest.raises(RunFolderBusyError):
        acquire(str(tmp_path))
    old = time.time() - STALE_S - 5
    os.utime(path, (old, old))
    acquire(str(tmp_path)).release()


def test_the_heartbeat_keeps_the_lock_fresh_and_release_leaves_others_locks(tmp_path: Path, monkeypatch) -> None:
    import dpm_dist.train.run_lock as run_lock

    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = acquire(str(tmp_path))
    path = tmp_path / LOCK_NAME
    old = time.time() - 1000
    os.utime(path, (old, old))
    deadline = time.time() + 10
    while path.stat().st_mtime < old + 500 and time.time() < deadline:
        time.sleep(0.05)
    assert path.stat().st_mtime > old + 500, "the heartbeat did not touch the lock"
    path.unlink()
    other = _lock_file(tmp_path, host="node-7", pid=1, since=time.time())
    lock.release()  # not ours any more: left alone
    assert other.exists()


def test_disabled_hold_takes_nothing(tmp_path: Path) -> None:
    with hold(str(tmp_path / "run"), enabled=False) as lock:
        assert lock is None
    assert not (tmp_path / "run").exists()


def test_a_folder_the_lock_created_is_removed_if_the_run_left_it_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError), hold(str(tmp_path / "refused")):
        raise ValueError("a check refused the run")
    assert not (tmp_path / "refused").exists()
    with hold(str(tmp_path / "ran")):
        (tmp_path / "ran" / "config.yaml").write_text("x")
    assert [p.name for p in (tmp_path / "ran").iterdir()] == ["config.yaml"]
    (tmp_path / "kept").mkdir()
    with hold(str(tmp_path / "kept")):
        pass
    assert (tmp_path / "kept").is_dir()  # it existed before: left alone


def test_a_restart_of_the_same_torchrun_job_takes_the_lock_of_its_earlier_attempt(tmp_path: Path, monkeypatch) -> None:
    """Rank 0 of a restarted multi-node job may land on another node, where the old holder looks fresh."""
    _lock_file(tmp_path, host="node-7", pid=1, since=time.time(), job="dpm42", attempt="0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "other")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(RunFolderBusyError):
        acquire(str(tmp_path))  # another job: refused
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "dpm42")
    lock = acquire(str(tmp_path))
    assert json.loads((tmp_path / LOCK_NAME).read_text())["attempt"] == "1"
    lock.release()
