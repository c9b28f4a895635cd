"""A plain (non-editable) install works: build the wheel, install it into a fresh folder, and run the
commands from a working folder outside the repository with relative paths.

This is what Ray cluster nodes, container images and a package index get; the configs must come from
the installed package, never from the source tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import TINY, TINY_TRAIN

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"$ {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The wheel built from a copy of the sources (only what the wheel is made from) and installed with
    ``pip install --target``: its folder and an environment whose imports resolve there first."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("dpm_dist", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    build = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(base / "dist"), str(src)],
        cwd=base,
        env=env,
    )
    assert "project.license" not in build.stdout + build.stderr, "the build still warns about project.license"
    # every config group is a declared package: no setuptools "Package ... is absent from the packages" warnings
    assert "is absent from the `packages` configuration" not in build.stdout + build.stderr
    wheel = next((base / "dist").glob("dpm_dist-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")}
    assert {"dpm_dist/" + name for name in shipped} <= names, "the wheel lacks configs"
    target = base / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)], cwd=base, env=env)
    env["PYTHONPATH"] = str(target)  # ahead of the editable install of the checkout
    return target, env


@pytest.mark.slow
def test_the_installed_package_is_the_wheel_and_ships_its_configs(installed, tmp_path):
    target, env = installed
    out = _run(
        [
            sys.executable,
            "-c",
            "import dpm_dist, importlib.resources as r; print(dpm_dist.__file__); "
            "print(r.files('dpm_dist.configs').joinpath('experiment', 'tiny.yaml').is_file())",
        ],
        cwd=tmp_path,
        env=env,
    )
    module, found = out.stdout.split()
    assert Path(module).is_relative_to(target) and found == "True"


@pytest.mark.slow
def test_commands_compose_their_configs_from_the_installed_package(installed, tmp_path):
    target, env = installed
    train = _run([str(target / "bin" / "dpm-train"), "--cfg", "job"], cwd=tmp_path, env=env)
    assert "name: tiny_synthetic" in train.stdout
    tune = _run([str(target / "bin" / "dpm-tune"), "--cfg", "job"], cwd=tmp_path, env=env)
    assert "search:" in tune.stdout and "space:" in tune.stdout
    evaluate = _run([str(target / "bin" / "dpm-eval"), "--help"], cwd=tmp_path, env=env)
    assert "--checkpoint" in evaluate.stdout
    own = tmp_path / "mine" / "experiment"
    own.mkdir(parents=True)
    (own / "mine.yaml").write_text("# @package _global_\n# dpm-train --config-dir mine experiment=mine\nname: my_own\n")
    mine = _run(
        [str(target / "bin" / "dpm-train"), "--config-dir", "mine", "experiment=mine", "--cfg", "job"],
        cwd=tmp_path,
        env=env,
    )
    assert "name: my_own" in mine.stdout  # --config-dir adds one's own presets in front of the shipped ones


@pytest.mark.slow
def test_installed_wheel_trains_two_steps_from_another_folder_with_relative_paths(installed, tmp_path):
    target, env = installed
    synth = [str(target / "bin" / "dpm-shards"), "synth", "--out", "shards/tiny"]
    for key, value in TINY.items():
        synth += [f"--{key.replace('_', '-')}", str(value)]
    _run(synth, cwd=tmp_path, env=env)
    train = [
        str(target / "bin" / "dpm-train"),
        *TINY_TRAIN,
        "data.root=shards/tiny",
        "log.output_dir=runs/two_steps",
        "optim.epochs=1",
        "eval.period=1",
    ]
    out = _run(train, cwd=tmp_path, env=env)
    assert (tmp_path / "runs" / "two_steps" / "model_final.pt").is_file(), out.stdout[-2000:]
    assert "mAP" in out.stdout


def test_requires_python_admits_3_11_to_3_13():
    """pyproject's requires-python admits every version the pinned set installs on: pip's resolver, for CPython
    3.11, 3.12 and 3.13 on manylinux x86_64, found a wheel of every pin of constraints.txt but deepspeed and
    antlr4-python3-runtime, pure-Python sdists that build anywhere (README, "Two commands"). A user on Ubuntu 24.04's
    Python 3.12 must not get "requires a different Python"."""
    import tomllib

    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    assert all(v in spec for v in ("3.11", "3.12", "3.13")), spec
