"""dpm_dist.fsio: the one atomic write (mode from the umask, no leftovers, whole replacement, folder created)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpm_dist.fsio import TMP_PREFIX, atomic_path, write_bytes_atomic, write_text_atomic


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_the_written_file_has_the_mode_open_would_give_it(tmp_path: Path, mask: int, mode: int) -> None:
    dst = tmp_path / "a.bin"
    with umask(mask):
        write_bytes_atomic(str(dst), b"x")
        with open(tmp_path / "plain.bin", "wb"):
            pass
    assert stat.S_IMODE(dst.stat().st_mode) == mode == stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode)


def test_an_exception_in_the_block_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    dst = tmp_path / "a.txt"
    dst.write_text("old")
    with pytest.raises(ZeroDivisionError), atomic_path(str(dst)) as tmp:
        Path(tmp).write_text("half of the new")
        1 / 0  # noqa: B018
    assert dst.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_the_content_is_replaced_whole(tmp_path: Path) -> None:
    dst = tmp_path / "a.txt"
    write_text_atomic(str(dst), "a much longer first version\n")
    write_text_atomic(str(dst), "short ü\n")
    assert dst.read_bytes() == "short ü\n".encode() and os.listdir(tmp_path) == ["a.txt"]


def test_the_folder_is_created_and_the_temporary_file_sits_beside_the_target(tmp_path: Path) -> None:
    dst = tmp_path / "new" / "deeper" / "model.pt"
    with atomic_path(str(dst)) as tmp:
        assert os.path.dirname(tmp) == str(dst.parent) and os.path.basename(tmp).startswith(TMP_PREFIX)
        assert tmp.endswith(".pt")  # writers that pick a format from the suffix (torch.jit, parquet) see the same one
        Path(tmp).write_bytes(b"weights")
    assert dst.read_bytes() == b"weights" and os.listdir(dst.parent) == ["model.pt"]


def test_a_write_failure_names_the_file_when_asked_and_replaces_nothing(tmp_path: Path) -> None:
    dst = tmp_path / "model.pt"
    dst.write_bytes(b"previous")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(OSError, match=r"writing the model file .*model\.pt failed: No space left on device \(.* MiB"):
        with atomic_path(str(dst), what="the model file"):
            raise full
    with pytest.raises(OSError) as plain, atomic_path(str(dst)):
        raise full
    assert plain.value is full  # without ``what`` the error passes through unchanged
    assert dst.read_bytes() == b"previous" and os.listdir(tmp_path) == ["model.pt"]
