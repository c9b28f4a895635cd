"""One atomic write for every file the package writes (shards, checkpoints, model files, exports, embeddings).

``atomic_path(dst)`` yields a temporary path in ``dst``'s folder; when the block ends without an exception the
temporary file is fsynced, given the mode a plain ``open()`` would give it (``0o666`` less the umask, so a
teammate can read a shared run's files as the umask allows), renamed over ``dst`` and the folder entry is
fsynced. On any exception the temporary file is removed and ``dst`` is untouched. A reader therefore sees the
old file or the whole new one, never a torn one, and a crash leaves at most a ``.tmp-*`` file behind.

    with atomic_path("run/model_final.pt") as tmp:
        torch.save(state, tmp)

``write_bytes_atomic`` / ``write_text_atomic`` cover the common cases.
"""

from __future__ import annotations

import contextlib
import os
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
def atomic_path(dst: str) -> Iterator[str]:
    """A temporary path beside ``dst``; renamed over ``dst`` (fsynced, umask mode) when the block succeeds."""
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
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_bytes_atomic(dst: str, data: bytes) -> None:
    with atomic_path(dst) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text_atomic(dst: str, text: str) -> None:
    with atomic_path(dst) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
