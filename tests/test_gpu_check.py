"""The GPU validation kit's dry run on CPU: `bash benchmarks/gpu_check.sh OUT --dry-run` builds and installs the
project's wheel, runs every step at tiny sizes from a folder outside the checkout and writes the table and the
JSON, with a row for each step and "skipped: no CUDA" for the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("summary", "tests", "train_eager", "train_compile", "eval", "loader", "head")


def _suite_extensions_dir() -> str:
    """Where this suite's other DeepSpeed processes build and find the CPU comm op (torch's own default folder).

    gpu_check.sh's dry run keeps a cache of its own (a hand-run with another ninja on PATH would otherwise
    rebuild the suite's); inside the suite, the same python and ninja make the same build, so sharing the
    suite's skips a rebuild of half a minute or more.
    """
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}_{accelerator}"
    )


@pytest.mark.slow
def test_dry_run_writes_a_row_for_every_step(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=_suite_extensions_dir())
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "out", "--dry-run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    log = (tmp_path / "out" / "gpu_check.log").read_text() if (tmp_path / "out" / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + log[-3000:]
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["dry_run"] and "DRY RUN" in table
    assert report["status"] == dict.fromkeys(STEPS, "ok"), log[-3000:]
    # the installed wheel (configs inside), not the checkout nor its editable install
    installed = report["summary"]["dpm_dist"]
    assert installed.endswith("site/dpm_dist") and not installed.startswith(str(ROOT)), installed
    assert f"imports dpm_dist from {installed}/__init__.py" in log
    assert "composed from dpm_dist.configs" in table
    test_rows = [row for row in report["rows"] if row[0].startswith("1. test ")]
    assert len(test_rows) >= 8 and all(row[2] == "skipped: no CUDA" for row in test_rows)
    for label in ("eager", "torch.compile"):
        for mode in ("exact", "approx", "reference"):
            assert any(
                row[0].startswith(f"2. train {mode}, {label}") and "images/s" in row[1] for row in report["rows"]
            ), (mode, label)
    assert report["train_eager"]["modes"]["exact"]["flops_per_image"] > 0
    assert "images/s with 1 workers" in table and "× training" in table
    assert any(row[0] == "3. evaluation" and "s (mAP" in row[1] for row in report["rows"])
    # the head step: replicated vs Partial FC at 10 %, bf16 products, one rank in one process (the GPU step's path)
    (head,) = [row for row in report["rows"] if row[0].startswith("5. head C = 2,000, bf16, cpu")]
    assert "replicated: " in head[1] and "Partial FC 10%: " in head[1] and "Partial FC/replicated" in head[1], head
    assert report["head"]["precision"] == "bf16" and report["head"]["rows"][0]["sampled"]["s_per_step"] > 0


@pytest.mark.slow
def test_missing_wheels_fail_in_one_line_naming_the_fix(tmp_path):
    """Without --dry-run the kit installs .whl/; a checkout without them stops at once and says what to run."""
    if (ROOT / ".whl").exists():
        pytest.skip(".whl/ exists here (benchmarks/gpu_wheels.sh was run)")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "gpu_wheels.sh" in proc.stderr


def _head_scale():
    """benchmarks/head_scale.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("head_scale", ROOT / "benchmarks" / "head_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_head_scale_bf16_runs_the_products_head_under_autocast():
    """The GPU step's code path on CPU: one rank in this process, no process group. bf16 changes the losses (the
    plain branch's F·Wᵀ runs in bf16) by bf16 rounding only; at one rank the sharded head is the replicated one."""
    hs = _head_scale()
    size = dict(classes=300, dim=32, batch=8, steps=2, rate=0.1)
    loss = {
        (kind, prec): hs.run_steps(kind, **size, precision=prec)[1]
        for kind in ("replicated", "sharded", "sampled")
        for prec in ("fp32", "bf16")
    }
    assert loss["sharded", "fp32"] == pytest.approx(loss["replicated", "fp32"], rel=1e-5)
    assert loss["sampled", "fp32"] != pytest.approx(loss["replicated", "fp32"], rel=1e-3)  # Partial FC: fewer classes
    for kind in ("replicated", "sampled"):
        assert loss[kind, "bf16"] != loss[kind, "fp32"], kind  # autocast took effect
        assert loss[kind, "bf16"] == pytest.approx(loss[kind, "fp32"], rel=2e-2), kind
    seconds, peak = hs.measure_one_device("sampled", **size, device="cpu", precision="bf16")
    assert seconds > 0 and peak is None  # no per-configuration peak memory on CPU in one process
