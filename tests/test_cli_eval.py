"""``dpm-eval`` end to end on the synthetic shards: our export and an official-format file, 1 and 2 ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dpm_dist.cli.eval import compose_config, main

OVERRIDES = ["model=vit_tiny", "model.img_size=[64,32]", "model.stride=[6,6]", "model.patch_size=8",
             "data.img_size=[64,32]", "data.num_workers=0", "data.eval_batch_size=4", "eval.query_chunk=3",
             "eval.num_pictures=2", "eval.picture_topk=4"]


@pytest.fixture(scope="module")
def export(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A tiny DPM written the way training writes model files (weights + resolved config)."""
    from omegaconf import OmegaConf

    from dpm_dist.model.files import save_model_file
    from dpm_dist.model.dpm import build_model

    overrides = OVERRIDES + [f"data.root={tiny_shards}"]
    cfg = compose_config(overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=8, num_cams=3)
    torch.nn.init.normal_(model.mask_gen.fc.weight, std=0.5)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_model_file(model, str(path), {"epoch": 7, "config": OmegaConf.to_container(OmegaConf.structured(cfg))})
    return path, overrides


def official_file(ours: Path, dst: Path) -> Path:
    """The same weights under the official key names (base.*, base.ConvLayer.*, base.attfc.*)."""
    state = torch.load(ours, weights_only=True)["model"]
    renamed = {}
    for key, value in state.items():
        key = key.replace("mask_gen.layers.", "base.ConvLayer.").replace("mask_gen.fc.", "base.attfc.")
        renamed[key.replace("backbone.", "base.", 1) if key.startswith("backbone.") else key] = value
    torch.save(renamed, dst)
    return dst


@pytest.fixture(scope="module")
def single(export, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One in-process ``dpm-eval`` run (world size 1): its output folder and what it printed."""
    path, overrides = export
    out = tmp_path_factory.mktemp("eval") / "ours"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--checkpoint", str(path), "--output-dir", str(out), *overrides]) == 0
    return out, printed.getvalue()


def test_dpm_eval_writes_results_tensorboard_and_pictures(export, single, tmp_path):
    path, overrides = export
    out, stdout = single
    printed = json.loads(stdout.strip().splitlines()[-1])
    result = json.loads((out / "results.json").read_text())
    assert printed["metrics"] == result["metrics"] and result["world_size"] == 1
    assert result["metrics"]["num_query"] == 10 and result["metrics"]["num_gallery"] == 15
    assert len(result["cmc"]) == 15  # max_rank 50 shortened to the gallery size
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tb"))
    pictures = sorted(result["pictures"])
    assert len(pictures) == 2 * 3 + 1 and "pictures/head_correlation_mean.png" in pictures
    ranked = Image.open(out / [p for p in pictures if "ranked_" in p][0])
    assert ranked.width > 2 * ranked.height  # query + 4 gallery items side by side

    # The same weights in the official layout, read directly (no conversion step), give the same numbers.
    official = official_file(path, tmp_path / "transformer_7.pth")
    assert main(["--checkpoint", str(official), "--output-dir", str(tmp_path / "official"), *overrides,
                 "eval.num_pictures=0"]) == 0
    assert json.loads((tmp_path / "official" / "results.json").read_text())["metrics"] == result["metrics"]


@pytest.mark.slow
def test_dpm_eval_under_torchrun_gives_the_same_numbers(export, single, tmp_path):
    path, overrides = export
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                    "--master-port", str(port), "-m", "dpm_dist.cli.eval", "--checkpoint", str(path),
                    "--output-dir", str(tmp_path / "w2"), *overrides], check=True, env=env, capture_output=True, timeout=120)
    one = json.loads((single[0] / "results.json").read_text())
    two = json.loads((tmp_path / "w2" / "results.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["metrics"] == one["metrics"] and two["cmc"] == one["cmc"] and two["pictures"] == one["pictures"]
