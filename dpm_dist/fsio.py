"""One atomic write for every file the package writes (shards, checkpoints, model files, exports, embeddings).

``atomic_path(dst)`` yields a temporary path in ``dst``'s folder; when the block ends without an exception the
temporary file is fsynced, given the mode a plain ``open()`` would give it (``0o666`` less the umask, so a
teammate can read a shared run's files as the umask allows), renamed over ``dst`` and the folder entry is
fsynced. On any exception the temporary file is removed and ``dst`` is untouched. A reader therefore sees the
old file or the whole new one, never a torn one, and a crash leaves at most a ``.tmp-*`` file behind.

    with atomic_path("run/model_final.pt") as tmp:
        torch.save(state, tmp)

``write_bytes_atomic`` / ``write_text_atomic`` cover the common cases; ``describe_write_failure`` says why a
write failed and how much space was left, for errors that name the file (a full disk is the usual cause).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

TMP_PREFIX = ".tmp-"  # every temporary file starts with this, so a folder listing can skip them


def umask_mode(base: int = 0o666) -> int:
    """``base`` less the process umask: the mode ``open()`` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def fsync_path(path: str) -> None:
    """fsync a file or a folder by path (a folder's fsync makes a rename in it durable; not every OS allows it)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # folders cannot be fsynced on some file systems; the rename itself is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dst: str, *, what: str | None = None) -> Iterator[str]:
    """A temporary path beside ``dst``; renamed over ``dst`` (fsynced, umask mode) when the block succeeds.

    ``what`` (e.g. ``"the model file"``): a write failure (:func:`is_write_failure`) is raised as an OSError
    naming the file, why and the free space, measured before the temporary file is removed.
    """
    folder = os.path.dirname(os.path.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=os.path.splitext(dst)[1])
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        fsync_path(tmp)
        os.replace(tmp, dst)
        fsync_path(folder)
    except (OSError, RuntimeError) as err:
        if what is None or not is_write_failure(err):
            raise
        why = describe_write_failure(err, folder)
        raise OSError(f"writing {what} {dst} failed: {why}; no file was replaced") from err
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_bytes_atomic(dst: str, data: bytes) -> None:
    with atomic_path(dst) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text_atomic(dst: str, text: str) -> None:
    with atomic_path(dst) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def is_write_failure(err: BaseException) -> bool:
    """OSError, or torch.save's RuntimeError from its zip writer (which does not raise OSError on a full disk)."""
    return isinstance(err, OSError) or (
        isinstance(err, RuntimeError)
        and any(s in str(err) for s in ("inline_container", "PytorchStreamWriter", "file write failed"))
    )


def describe_write_failure(err: BaseException, folder: str) -> str:
    """Why a write into ``folder`` failed and the free space at that moment (call it before removing partial
    files), e.g. ``No space left on device (0.0 MiB free of 14 MiB)``."""
    probe = folder
    while probe and not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    try:
        usage = shutil.disk_usage(probe or ".")
    except OSError:
        usage = None
    free = f"{usage.free / 2**20:,.1f} MiB free of {usage.total / 2**20:,.0f} MiB" if usage else "free space unknown"
    if isinstance(err, OSError) and err.strerror:
        why = err.strerror
    elif usage and usage.free < 2**20:
        why = "No space left on device"
    else:
        why = f"write failed ({str(err).splitlines()[0]})"
    return f"{why} ({free})"
