"""One live run per run folder: a lock file that names its holder and that a crashed run does not leave stuck.

``dpm-train`` (global rank 0) takes ``<log.output_dir>/.dpm-run.lock`` before it reads or writes anything there.
The file is created with ``O_CREAT | O_EXCL`` (atomic on local disks and on NFSv3+/Lustre/GPFS alike) and holds
the holder's host, pid, the pid's start time and the command. While the run lives, a daemon thread touches it
every :data:`HEARTBEAT_S` seconds. A second run finds the file and

- refuses, in one line naming the holder, when the holder is alive: on this host its pid still runs (and is the
  same process: the start time matches, so a recycled pid does not count), on another host its heartbeat is
  younger than :data:`STALE_S`;
- takes the lock over when the holder is dead (a crash, ``kill -9``, a lost node): the stale file is renamed away
  (only one contender can win the rename) and a fresh one created, so a requeued or restarted job resumes
  without anyone deleting files by hand.

The lock is released (the file removed, if it is still ours) when the run ends, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

LOCK_NAME = ".dpm-run.lock"
HEARTBEAT_S = 15.0  # the holder touches the file this often
STALE_S = 120.0  # a holder on another host whose heartbeat is older than this is taken for dead


class RunFolderBusyError(ValueError):
    """Another live run holds the run folder (a user error: one line, exit 2)."""


def _process_start(pid: int) -> float | None:
    """When process ``pid`` of this host started (seconds since the epoch), or None if it does not run."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return -1.0  # it runs, as someone else


def _me() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_started": _process_start(os.getpid()),
        "since": time.time(),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:500],
        "token": uuid.uuid4().hex,  # tells this lock from a later one at the same path (inodes get reused)
        **_attempt(),
    }


def _attempt() -> dict[str, str]:
    """The torchrun job and restart attempt this process belongs to ({} outside torchrun)."""
    job, attempt = os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("TORCHELASTIC_RESTART_COUNT")
    return {"job": job, "attempt": attempt} if job and job != "none" and attempt is not None else {}


def earlier_attempt(holder: dict[str, Any]) -> bool:
    """Whether ``holder`` is an earlier attempt of this torchrun job: its ranks were stopped for this restart, and
    rank 0 may now run on another node, where the old holder's heartbeat would still look fresh."""
    mine = _attempt()
    return bool(mine) and holder.get("job") == mine["job"] and holder.get("attempt") != mine["attempt"]


def holder_is_alive(holder: dict[str, Any], age_s: float, *, stale_s: float = STALE_S) -> bool:
    """Whether the run described by ``holder`` (a lock file's content, ``age_s`` since its last heartbeat) lives."""
    if holder.get("host") != socket.gethostname():
        return age_s < stale_s
    started = _process_start(int(holder.get("pid", -1)))
    if started is None:
        return False
    recorded = holder.get("pid_started")
    return started < 0 or recorded is None or abs(started - float(recorded)) < 1.0


def describe(holder: dict[str, Any], age_s: float) -> str:
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, int | float) else "?"
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {when} "
        f"(`{holder.get('command', '?')}`; last heartbeat {age_s:.0f} s ago)"
    )


def _read(path: str) -> tuple[dict[str, Any], float] | None:
    """(content, seconds since the last heartbeat) of the lock file, or None when there is none."""
    try:
        with open(path) as f:
            st = os.fstat(f.fileno())
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        holder = {}  # being written right now, or damaged: judged by its age alone
    if not isinstance(holder, dict):
        holder = {}
    return holder, max(0.0, time.time() - st.st_mtime)


def _token(path: str) -> str | None:
    found = _read(path)
    return found[0].get("token") if found else None


@dataclass
class RunLock:
    """A held lock; :meth:`release` (or leaving :func:`hold`) gives it up."""

    path: str
    token: str
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                if _token(self.path) == self.token:
                    os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            if _token(self.path) == self.token:
                os.remove(self.path)


def acquire(folder: str, *, stale_s: float = STALE_S) -> RunLock:
    """Take ``folder``'s run lock, taking over a dead holder's; :class:`RunFolderBusyError` names a live one."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            found = _read(path)
            if found is None:
                continue  # released in between: try again
            holder, age = found
            if holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
                alive = False  # this very process: a lock an earlier run of it did not release
            elif earlier_attempt(holder):
                alive = False  # torchrun restarted the job: the previous attempt's rank 0 is stopped
            else:
                alive = holder_is_alive(holder, age, stale_s=stale_s)
            if alive:
                raise RunFolderBusyError(
                    f"run folder {folder} is in use by another live run: {describe(holder, age)}; wait for it to "
                    f"end, stop it, or give this run another log.output_dir (lock file: {path})"
                ) from None
            _take_over(path, holder)
            continue
        me = _me()
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        lock = RunLock(path, me["token"])
        lock._thread = threading.Thread(target=lock._beat, name="dpm-run-lock", daemon=True)
        lock._thread.start()
        return lock
    raise RunFolderBusyError(f"run folder {folder}: could not take its lock {path} (other runs keep taking it)")


def check_free(folder: str) -> None:
    """:class:`RunFolderBusyError` when a live run holds ``folder``'s lock (takes nothing, creates nothing)."""
    path = os.path.join(folder, LOCK_NAME)
    found = _read(path)
    if found is not None and holder_is_alive(*found):
        raise RunFolderBusyError(
            f"run folder {folder} is in use by another live run: {describe(*found)}; wait for it to end, stop it, "
            f"or give this run another log.output_dir (lock file: {path})"
        )


def _take_over(path: str, judged: dict[str, Any]) -> None:
    """Move a dead holder's lock file away; if another contender replaced it meanwhile, put theirs back."""
    moved = f"{path}.stale-{socket.gethostname()}-{os.getpid()}"
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return  # another contender moved it first
    found = _read(moved)
    if found is not None and found[0] != judged:  # not the file we judged dead: a fresh lock taken in between
        with contextlib.suppress(OSError):
            os.link(moved, path)  # fails if yet another lock exists: then that one stands
    with contextlib.suppress(OSError):
        os.remove(moved)


@contextlib.contextmanager
def hold(folder: str, *, enabled: bool = True) -> Iterator[RunLock | None]:
    """``acquire`` for the block (``enabled``: only global rank 0 holds the lock of a multi-rank run). A folder
    the lock created is removed again if the run left it empty (a run refused by a check writes nothing)."""
    created = enabled and not os.path.isdir(folder)
    lock = acquire(folder) if enabled else None
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # only if empty
