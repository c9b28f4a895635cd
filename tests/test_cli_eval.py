"""``dpm-eval`` end to end on the synthetic shards: our export and an official-format file, 1 and 2 ranks;
what it reads from a model file and a run folder, and the one-line errors for files that are not a model.

The user-facing tests run the real command from a working folder outside the repository with relative paths.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dpm_dist.cli.eval import compose_config, main
from tests.conftest import free_port, official_file

VENV_BIN = Path(sys.executable).parent
OVERRIDES = [
    "model=vit_tiny",
    "model.img_size=[64,32]",
    "model.stride=[6,6]",
    "model.patch_size=8",
    "data.img_size=[64,32]",
    "data.num_workers=0",
    "data.eval_batch_size=4",
    "eval.query_chunk=3",
    "eval.num_pictures=2",
    "eval.picture_topk=4",
]
COUNTS = {"eval/num_query", "eval/num_gallery", "eval/num_valid_query"}


def _save_tiny_model(path: Path, overrides: list[str], meta: dict) -> None:
    """A tiny DPM written the way training writes model files (weights + resolved config)."""
    from omegaconf import OmegaConf

    from dpm_dist.model.dpm import build_model
    from dpm_dist.model.files import save_model_file

    cfg = compose_config(overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=8, num_cams=3)
    torch.nn.init.normal_(model.mask_gen.fc.weight, std=0.5)
    save_model_file(model, str(path), dict(meta, config=OmegaConf.to_container(OmegaConf.structured(cfg))))


@pytest.fixture(scope="module")
def export(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    overrides = OVERRIDES + [f"data.root={tiny_shards}"]
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    _save_tiny_model(path, overrides, {"epoch": 7})
    return path, overrides


@pytest.fixture(scope="module")
def run_folder(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished training run's folder: both model files (their config records the absolute data root and a
    non-default eval.distance), the checkpoint folders with the global step of each epoch, results.json."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    stored = OVERRIDES + [f"data.root={tiny_shards}", "eval.distance=cosine", "eval.num_pictures=1"]
    _save_tiny_model(run / "model_best.pt", stored, {"epoch": 2})
    _save_tiny_model(run / "model_final.pt", stored, {"epoch": 3})
    for epoch, step in ((2, 4), (3, 6)):
        (run / "checkpoints" / f"epoch_{epoch:04d}").mkdir(parents=True)
        (run / "checkpoints" / f"epoch_{epoch:04d}" / "meta.json").write_text(
            json.dumps({"epoch": epoch, "step": step})
        )
    (run / "checkpoints" / "latest").write_text("epoch_0003")
    (run / "results.json").write_text(json.dumps({"epochs": 3, "steps": 6}))
    return run


def dpm(command: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The installed console command, run the way a user runs it."""
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **env)
    return subprocess.run(
        [str(VENV_BIN / command), *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=180
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    for misleading in ("Traceback", "weights_only", "mmap"):
        assert misleading not in proc.stderr
    return lines[0]


def tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def single(export, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One in-process ``dpm-eval`` run (world size 1): its output folder and what it printed."""
    path, overrides = export
    out = tmp_path_factory.mktemp("eval") / "ours"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--checkpoint", str(path), "--output-dir", str(out), *overrides]) == 0
    return out, printed.getvalue()


@pytest.mark.slow
def test_dpm_eval_writes_results_tensorboard_and_pictures(export, single, tmp_path):
    path, overrides = export
    out, stdout = single
    json_line, summary = stdout.strip().splitlines()[-2:]
    printed = json.loads(json_line)
    result = json.loads((out / "results.json").read_text())
    assert printed["metrics"] == result["metrics"] and result["world_size"] == 1
    assert result["metrics"]["num_query"] == 10 and result["metrics"]["num_gallery"] == 15
    assert summary.startswith(f"rank-1 {result['metrics']['rank1']:.1%}  mAP {result['metrics']['mAP']:.1%}")
    assert "(10 queries" in summary and "15 gallery images" in summary and str(out / "results.json") in summary
    assert len(result["cmc"]) == 15  # max_rank 50 shortened to the gallery size
    pictures = sorted(result["pictures"])
    assert len(pictures) == 2 * 3 + 1 and "pictures/head_correlation_mean.png" in pictures
    ranked = Image.open(out / next(p for p in pictures if "ranked_" in p))
    assert ranked.width > 2 * ranked.height  # query + 4 gallery items side by side
    tb = tensorboard(out / "tb")
    assert "eval/mAP" in tb.Tags()["scalars"] and not COUNTS & set(tb.Tags()["scalars"])  # counts are no curves
    assert len(tb.Tags()["images"]) == len(pictures) and "pictures/head_correlation_mean" in tb.Tags()["images"]

    # The same weights in the official layout, read directly (no conversion step), give the same numbers.
    official = official_file(path, tmp_path / "transformer_7.pth")
    assert (
        main(
            [
                "--checkpoint",
                str(official),
                "--output-dir",
                str(tmp_path / "official"),
                *overrides,
                "eval.num_pictures=0",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "official" / "results.json").read_text())["metrics"] == result["metrics"]


@pytest.mark.slow
def test_a_run_folder_from_elsewhere_uses_the_stored_data_root_and_writes_next_to_the_model(run_folder, tmp_path):
    elsewhere = tmp_path / "elsewhere"  # no shards/synthetic here: the preset's relative data.root does not exist
    elsewhere.mkdir()
    proc = dpm("dpm-eval", "--checkpoint", str(run_folder), cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert f"{run_folder} is a run folder: evaluating model_best.pt" in proc.stderr
    out = run_folder / "eval" / "model_best"
    result = json.loads((out / "results.json").read_text())
    stored = torch.load(run_folder / "model_best.pt", weights_only=True)["meta"]["config"]
    assert result["data_root"] == stored["data"]["root"] and result["eval"]["distance"] == "cosine"
    assert result["epoch"] == 2 and result["step"] == 4  # training logged this model's eval/* at global step 4
    assert os.listdir(elsewhere) == []  # nothing written into the working folder
    assert proc.stdout.strip().splitlines()[-1].startswith("rank-1 ")
    tb = tensorboard(out / "tb")
    assert [s.step for s in tb.Scalars("eval/mAP")] == [4] and tb.Scalars("eval/mAP")[0].value == pytest.approx(
        result["metrics"]["mAP"]
    )
    assert [i.step for i in tb.Images(tb.Tags()["images"][0])] == [4]


@pytest.mark.slow
def test_command_line_overrides_win_over_the_stored_config(run_folder, tmp_path):
    (tmp_path / "runs").symlink_to(run_folder.parent)
    # eval.distance=masked_cosine is train.yaml's value: named on the command line, it still wins over the file's
    proc = dpm(
        "dpm-eval",
        "--checkpoint",
        "runs/tiny/model_final.pt",
        "--output-dir",
        "out",
        "eval.distance=masked_cosine",
        "eval.num_pictures=0",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["eval"]["distance"] == "masked_cosine" and result["pictures"] == []
    assert result["step"] == 6 and result["checkpoint"] == str(tmp_path / "runs" / "tiny" / "model_final.pt")
    proc = dpm("dpm-eval", "--checkpoint", "runs/tiny/model_final.pt", "data.root=nowhere", cwd=tmp_path)
    assert_one_line_error(proc, "dpm-eval", "`data.root`", str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_a_stored_data_root_that_is_gone_says_where_it_came_from(tmp_path):
    _save_tiny_model(tmp_path / "moved.pt", OVERRIDES + [f"data.root={tmp_path / 'gone'}"], {"epoch": 1})
    proc = dpm("dpm-eval", "--checkpoint", "moved.pt", cwd=tmp_path)
    assert_one_line_error(
        proc, "dpm-eval", "`data.root`", str(tmp_path / "gone"), "stored in", "moved.pt", "data.root=<folder>"
    )


def _not_a_model(kind: str, folder: Path, real: Path) -> str:
    name = f"{kind}.pt"
    if kind == "garbage":
        (folder / name).write_bytes(os.urandom(4096))
    elif kind == "truncated":
        data = real.read_bytes()
        (folder / name).write_bytes(data[: len(data) * 2 // 3])
    elif kind == "pickled_object":
        torch.save({"args": argparse.Namespace(lr=0.1), "w": torch.zeros(2)}, folder / name)
    elif kind == "list":
        torch.save([torch.zeros(2)], folder / name)
    elif kind == "other_state_dict":
        torch.save({"fc.weight": torch.zeros(2, 2)}, folder / name)
    elif kind == "unknown_keys":
        saved = torch.load(real, weights_only=True)
        saved["model"]["extra_head.weight"] = torch.zeros(3)
        torch.save(saved, folder / name)
    return name


@pytest.mark.parametrize(
    "kind, says",
    [
        ("garbage", "not a torch file"),
        ("truncated", "truncated or damaged torch file"),
        ("pickled_object", "not a state dict: the torch file holds a pickled Python object (argparse.Namespace)"),
        ("list", "not a state dict: the torch file holds a list"),
        ("other_state_dict", "not a DPM state dict: no 'backbone.pos_embed' key"),
        ("unknown_keys", "unknown key(s) ['extra_head.weight']"),
    ],
)
@pytest.mark.slow
def test_a_file_that_is_not_a_model_is_one_line_naming_it(export, tmp_path, kind, says):
    name = _not_a_model(kind, tmp_path, export[0])
    proc = dpm("dpm-eval", "--checkpoint", name, cwd=tmp_path)
    assert_one_line_error(proc, "dpm-eval", str(tmp_path / name), says)


@pytest.mark.slow
def test_the_traceback_of_a_user_error_only_with_hydra_full_error(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 100)
    proc = dpm("dpm-eval", "--checkpoint", "garbage.pt", cwd=tmp_path, HYDRA_FULL_ERROR="1")
    assert (
        proc.returncode != 0
        and "Traceback" in proc.stderr
        and "not a torch file (starts with bytes 00 00" in proc.stderr
    )


@pytest.mark.parametrize(
    "folder, says",
    [
        ("empty", "an empty folder without model_best.pt or model_final.pt (not a run folder)"),
        (
            "runs/tiny/checkpoints",
            "a training-state checkpoint folder (DeepSpeed shards), not a model file; pass {run}/model_best.pt or {run}/model_final.pt",
        ),
        (
            "runs/tiny/checkpoints/epoch_0003",
            "a training-state checkpoint folder (DeepSpeed shards), not a model file; pass {run}/model_best.pt",
        ),
        ("runs/young/checkpoints", "the run {young} has no model file yet"),
    ],
)
@pytest.mark.slow
def test_a_folder_that_is_not_a_run_folder_says_what_to_pass(run_folder, tmp_path, folder, says):
    (tmp_path / "empty").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(run_folder)
    (tmp_path / "runs" / "young" / "checkpoints" / "epoch_0001").mkdir(parents=True)
    (tmp_path / "runs" / "young" / "checkpoints" / "epoch_0001" / "meta.json").write_text("{}")
    proc = dpm("dpm-eval", "--checkpoint", folder, cwd=tmp_path)
    line = assert_one_line_error(
        proc,
        "dpm-eval",
        str(tmp_path / folder),
        says.format(run=tmp_path / "runs" / "tiny", young=tmp_path / "runs" / "young"),
    )
    assert "IsADirectoryError" not in line


@pytest.mark.slow
def test_dpm_eval_under_torchrun_gives_the_same_numbers(export, single, tmp_path):
    path, overrides = export
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "-m",
            "dpm_dist.cli.eval",
            "--checkpoint",
            str(path),
            "--output-dir",
            str(tmp_path / "w2"),
            *overrides,
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    one = json.loads((single[0] / "results.json").read_text())
    two = json.loads((tmp_path / "w2" / "results.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["metrics"] == one["metrics"] and two["cmc"] == one["cmc"] and two["pictures"] == one["pictures"]
