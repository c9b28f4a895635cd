"""Mistakes a user makes on the command line, and failures inside DataLoader workers: one line naming the culprit
(field, shard), exit 2, no traceback and none of Hydra's advice. Real commands, run from a folder outside the
repository with relative paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dpm_dist.cli.common import run_guarded, worker_message
from dpm_dist.data.loader import build_eval_loader
from dpm_dist.data.shards import read_manifest
from dpm_dist.data.storage import StorageError
from dpm_dist.dist import DistEnv
from tests.test_cli_eval import OVERRIDES, _save_tiny_model, dpm
from tests.test_loader import data_cfg


@pytest.fixture
def shards_copy(tiny_shards: Path, tmp_path: Path) -> Path:
    root = tmp_path / "work" / "shards"
    shutil.copytree(tiny_shards, root)
    return root


def test_an_error_in_a_dataloader_worker_is_reported_by_its_own_message(shards_copy: Path, capsys) -> None:
    name = read_manifest(str(shards_copy))["splits"]["gallery"]["shards"][0]["name"]
    (shards_copy / name).unlink()
    loader = build_eval_loader(data_cfg(str(shards_copy), num_workers=2), DistEnv(), "gallery")
    with pytest.raises(SystemExit) as info:
        run_guarded("dpm-eval", lambda: list(loader))
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith("dpm-eval: error: ") and f"{name} does not exist" in err, err
    assert "DataLoader worker" not in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    with pytest.raises(StorageError) as raised:  # the exception torch re-raises still carries the traceback
        list(build_eval_loader(data_cfg(str(shards_copy), num_workers=2), DistEnv(), "gallery"))
    assert "in DataLoader worker process" in str(raised.value)
    assert f"{name} does not exist" in worker_message(str(raised.value))
    assert "Traceback" not in worker_message(str(raised.value))


@pytest.mark.slow
def test_dpm_eval_names_a_missing_gallery_shard_read_by_a_worker(shards_copy: Path) -> None:
    work = shards_copy.parent
    _save_tiny_model(work / "model.pt", [*OVERRIDES, "data.root=shards"], {"epoch": 1})
    name = read_manifest(str(shards_copy))["splits"]["gallery"]["shards"][0]["name"]
    (shards_copy / name).unlink()
    proc = dpm("dpm-eval", "--checkpoint", "model.pt", "data.root=shards", "data.num_workers=2", cwd=work)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("dpm-eval: error: ") and f"{name} does not exist" in lines[-1], proc.stderr[-2000:]
    assert "DataLoader worker" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("eval.distanse=cosine", "unknown config field `eval.distanse` (did you mean `eval.distance`?)"),
        ("eval.max_rank=abc", "config field `eval.max_rank` (expects int): Value 'abc'"),
    ],
)
def test_dpm_eval_bad_overrides_are_one_line_naming_the_field(shards_copy: Path, override: str, expected: str) -> None:
    work = shards_copy.parent
    _save_tiny_model(work / "model.pt", [*OVERRIDES, "data.root=shards"], {"epoch": 1})
    proc = dpm("dpm-eval", "--checkpoint", "model.pt", "data.root=shards", override, cwd=work)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dpm-eval: error: {expected}"), proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            ["dpm-train", "+optim.base_lrr=0.1", "+loss.alpah=0.9"],
            "dpm-train: error: unknown config field `loss.alpah` (did you mean `loss.alpha`?); "
            "`optim.base_lrr` (did you mean `optim.base_lr`?)",
        ),
        (
            ["dpm-train", "optim.base_lrr=0.1"],
            "dpm-train: error: unknown config field `optim.base_lrr` (did you mean `optim.base_lr`?)",
        ),
        (
            ["dpm-train", "data.root=shards", "optim.epochs=abc"],
            "dpm-train: error: config field `optim.epochs` (expects int): Value 'abc'",
        ),
        (
            ["dpm-tune", "search.num_sampless=2"],
            "dpm-tune: error: unknown config field `search.num_sampless` (did you mean `search.num_samples`?)",
        ),
        (["dpm-tune", "tune=nope"], "dpm-tune: error: Could not find 'tune/nope' (available: "),
    ],
)
def test_train_and_tune_refuse_unknown_keys_and_bad_types_in_one_line(tmp_path: Path, command, expected) -> None:
    proc = dpm(command[0], *command[1:], cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr[-2000:]
    assert "To append to your config use" not in proc.stdout + proc.stderr
    assert not any(tmp_path.iterdir()), "a refused command wrote into the working folder"


@pytest.mark.slow
def test_a_file_url_data_root_is_checked_as_the_folder_it_names(tmp_path: Path) -> None:
    """``data.root=file:///...`` is a local folder: missing, or without index.json, it is named as the config field
    before anything starts (it used to pass the check and fail later naming index.json, not the field)."""
    (tmp_path / "empty").mkdir()
    cases = {
        f"file://{tmp_path / 'nowhere'}": f"no such folder: file://{tmp_path / 'nowhere'} (make shards with",
        f"file://{tmp_path / 'empty'}": f"file://{tmp_path / 'empty'} holds no index.json (not a shard folder; "
        f"see `dpm-shards verify {tmp_path / 'empty'}`)",
    }
    for root, expected in cases.items():
        proc = dpm("dpm-train", f"data.root={root}", "log.output_dir=run", cwd=tmp_path)
        assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"dpm-train: error: config field `data.root`: {expected}"), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing written
