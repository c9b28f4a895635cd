"""Messages that say what happened (issue 25 items 8, 11, 12): the real commands, from a folder outside the
repository, with relative paths; exit code and output checked."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import train_env

ROOT = Path(__file__).resolve().parents[1]


def deepspeed_sh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = train_env()
    env.pop("DS_NO_SSH", None)
    return subprocess.run(
        ["bash", str(ROOT / "launch" / "deepspeed.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


@pytest.mark.slow
def test_deepspeed_launcher_names_the_hostfile_problem_in_one_line(tmp_path):
    shutil.copy(ROOT / "launch" / "hostfile.example", tmp_path / "hostfile")  # as the docs say, not yet edited
    proc = deepspeed_sh("experiment=tiny", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepspeed.sh: error: hostfile hostfile: "), proc.stderr
    assert "node-0" in lines[0] and "(a placeholder of hostfile.example: put your nodes' names)" in lines[0], lines[0]
    assert "DS_NO_SSH=1" in lines[0]  # the way without ssh
    for text, says in (
        ("a slots=2\nb slots8\n", 'line "b slots8" is not "host slots=N"'),
        ("a slots=2\na slots=2\n", "host a is named twice"),
        ("# nothing yet\n", 'names no host (one line per node, "host slots=N")'),
    ):
        (tmp_path / "mine").write_text(text)
        proc = deepspeed_sh("mine", "experiment=tiny", cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.strip() == f"deepspeed.sh: error: hostfile mine: {says}", (
            proc.stderr
        )
