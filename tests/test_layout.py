"""The package layout and its import rules, checked on the source (every import, also the lazy ones).

- model/ is pure torch: no process group, no DeepSpeed, no config schema, nothing of data/train/eval/tune/cli;
- data/ imports no model, training, evaluation, search or command-line code;
- only train/engine.py and train/zero_reshard.py import DeepSpeed, only tune/ imports Ray, only cli/ and config.py
  import Hydra;
- deploy/ imports no training, search or command-line code, nor DeepSpeed, Ray or Hydra;
- nothing outside cli/ imports cli/; the top-level modules import none of the subpackages (except the lazy
  ``dpm_dist.load_model`` of ``dpm_dist/__init__.py``);
- the old flat module paths are gone (no compatibility shims).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dpm_dist"
SUBPACKAGES = {"cli", "data", "deploy", "eval", "model", "train", "tune"}
TOP_LEVEL = {"__init__", "config", "dist", "fsio", "loggers", "report"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str = "") -> set[str]:
    """Every module an ``import``/``from ... import`` in the file names, at any depth, made absolute."""
    here = (module or _module_name(path)).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from dpm_dist import dist`
    return found


MODULES = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _offenders(importers: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{mod} imports {name}"
        for mod, names in MODULES.items()
        if mod == importers or mod.startswith(importers + ".")
        for name in sorted(names)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def test_the_rule_checker_sees_lazy_and_relative_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    import deepspeed.comm\n    from ray import tune\n    from ..train import loop\n")
    assert {"deepspeed.comm", "ray", "ray.tune", "dpm_dist.train.loop"} <= _imports(src, "dpm_dist.model.m")


def test_layout_is_one_subpackage_per_stage_each_with_a_docstring():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == TOP_LEVEL, f"top-level modules beyond {sorted(TOP_LEVEL)}: {sorted(top - TOP_LEVEL)}"
    found = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert found == SUBPACKAGES
    for name in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and ("Must not" in doc or "Nothing outside" in doc), (
            f"dpm_dist/{name}/__init__.py: say what it owns and must not import"
        )


def test_model_is_pure_torch():
    assert not _offenders(
        "dpm_dist.model",
        (
            "torch.distributed",
            "deepspeed",
            "ray",
            "hydra",
            "omegaconf",
            "dpm_dist.config",
            "dpm_dist.dist",
            "dpm_dist.data",
            "dpm_dist.train",
            "dpm_dist.eval",
            "dpm_dist.tune",
            "dpm_dist.cli",
        ),
    )


def test_data_imports_no_model_training_or_evaluation_code():
    assert not _offenders(
        "dpm_dist.data",
        ("dpm_dist.model", "dpm_dist.train", "dpm_dist.eval", "dpm_dist.tune", "dpm_dist.cli", "deepspeed", "ray"),
    )


def test_eval_and_train_stay_out_of_each_other_and_of_ray():
    assert not _offenders("dpm_dist.eval", ("dpm_dist.train", "dpm_dist.tune", "dpm_dist.cli", "deepspeed", "ray"))
    assert not _offenders("dpm_dist.train", ("dpm_dist.tune", "dpm_dist.cli", "ray"))


@pytest.mark.parametrize(
    "framework, allowed",
    [
        ("deepspeed", ("dpm_dist.train.engine", "dpm_dist.train.zero_reshard")),
        ("ray", ("dpm_dist.tune",)),
        ("hydra", ("dpm_dist.cli", "dpm_dist.config")),
        ("torch.utils.tensorboard", ("dpm_dist.loggers",)),
    ],
)
def test_each_heavy_framework_is_imported_in_one_place(framework, allowed):
    users = [
        line
        for line in _offenders("dpm_dist", (framework,))
        if not any(line.split()[0] == a or line.split()[0].startswith(a + ".") for a in allowed)
    ]
    assert not users


def test_deploy_imports_no_training_search_or_command_line_code():
    assert not _offenders(
        "dpm_dist.deploy", ("dpm_dist.train", "dpm_dist.tune", "dpm_dist.cli", "deepspeed", "ray", "hydra", "omegaconf")
    )


LAZY_TOP_LEVEL = {"dpm_dist": {"dpm_dist.deploy.loading", "dpm_dist.deploy.loading.load_model"}}  # __getattr__


def test_nothing_imports_the_command_line_and_top_level_modules_import_no_subpackage():
    outside = [line for line in _offenders("dpm_dist", ("dpm_dist.cli",)) if not line.startswith("dpm_dist.cli")]
    assert not outside
    for mod in ("dpm_dist", "dpm_dist.config", "dpm_dist.dist", "dpm_dist.loggers", "dpm_dist.report"):
        found = {n for n in MODULES[mod] if n.split(".")[:2][-1] in SUBPACKAGES and n.startswith("dpm_dist.")}
        assert not found - LAZY_TOP_LEVEL.get(mod, set()), mod


@pytest.mark.slow
def test_load_model_is_public_and_lazy():
    import subprocess
    import sys

    code = (
        "import sys, dpm_dist; heavy = [m for m in ('torch', 'dpm_dist.deploy') if m in sys.modules]; "
        "assert not heavy, heavy; from dpm_dist import load_model; assert load_model.__module__ == 'dpm_dist.deploy.loading'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    "old",
    [
        "cli.main",
        "eval_cli",
        "tune_cli",
        "shards_cli",
        "evaluator",
        "retrieval",
        "engine",
        "losses",
        "loader",
        "weights",
        "convert",
        "visualize",
        "checkpoint",
        "model.create_model",
    ],
)
def test_the_old_flat_module_paths_are_gone(old):
    name = "dpm_dist." + old
    if "." in old:  # a former module that is now a package must not re-export the old names
        pkg, attr = name.rsplit(".", 1)
        assert not hasattr(importlib.import_module(pkg), attr)
    else:
        assert importlib.util.find_spec(name) is None
