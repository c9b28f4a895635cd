"""``dpm-eval`` with a sharded gallery: 2 torchrun ranks give the 1-process numbers, pictures and top-k lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

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
    "log.tensorboard=false",
]


@pytest.fixture(scope="module")
def export(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DPM model file as training writes it (weights + resolved config)."""
    from omegaconf import OmegaConf

    from dpm_dist.cli.common import compose_config
    from dpm_dist.model.dpm import build_model
    from dpm_dist.model.files import save_model_file

    cfg = compose_config(OVERRIDES + [f"data.root={tiny_shards}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=8, num_cams=3)
    torch.nn.init.normal_(model.mask_gen.fc.weight, std=0.5)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_model_file(model, str(path), {"epoch": 7, "config": OmegaConf.to_container(OmegaConf.structured(cfg))})
    return path


def dpm_eval(cwd: Path, export: Path, shards: Path, out: str, *extra: str, ranks: int = 1) -> dict:
    """The real command from ``cwd`` with relative paths; its results.json."""
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(ranks),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
        ]
        if ranks > 1
        else [sys.executable]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [
            *launcher,
            "-m",
            "dpm_dist.cli.eval",
            "--checkpoint",
            os.path.relpath(export, cwd),
            "--output-dir",
            out,
            *OVERRIDES,
            f"data.root={os.path.relpath(shards, cwd)}",
            *extra,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((cwd / out / "results.json").read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_sharded_dpm_eval_on_2_ranks_equals_1_process(export, tiny_shards, tmp_path):
    one = dpm_eval(tmp_path, export, tiny_shards, "one", "eval.topk=6", "eval.topk_format=jsonl")
    two = dpm_eval(
        tmp_path,
        export,
        tiny_shards,
        "two",
        "eval.topk=6",
        "eval.topk_format=jsonl",
        "eval.shard_gallery=true",
        ranks=2,
    )
    assert one["world_size"] == 1 and two["world_size"] == 2 and two["eval"]["shard_gallery"]
    assert two["metrics"] == one["metrics"] and two["cmc"] == one["cmc"] and two["pictures"] == one["pictures"]
    assert len(one["pictures"]) == 2 * 3 + 1
    lists = read_jsonl(tmp_path / "one" / "topk.jsonl")
    # The model's features can move by an ulp with the batch composition (another split over ranks), so
    # the distances are compared to 1e-6; the sharded/gathered lists on the same features are bit-equal
    # (test_eval_scale.py).
    for a, b in zip(read_jsonl(tmp_path / "two" / "topk.jsonl"), lists, strict=True):
        assert a["distance"] == pytest.approx(b["distance"], abs=1e-6)
        assert {**a, "distance": None} == {**b, "distance": None}
    assert len(lists) == 10 and all(len(r["gallery"]) == 6 for r in lists)  # 15 gallery items, <= 3 junk each
    for r in lists:
        assert r["distance"] == sorted(r["distance"]) and r["match"] == [p == r["pid"] for p in r["gallery_pid"]]
        assert not any(p == r["pid"] and c == r["camid"] for p, c in zip(r["gallery_pid"], r["gallery_camid"]))


@pytest.mark.slow
def test_topk_parquet_equals_jsonl_and_follows_the_ranking(export, tiny_shards, tmp_path):
    import pyarrow.parquet as pq

    result = dpm_eval(
        tmp_path, export, tiny_shards, "pq", "eval.topk=20", "eval.shard_gallery=true", "eval.num_pictures=0"
    )
    assert result["topk_file"] == "topk.parquet"
    rows = pq.read_table(tmp_path / "pq" / "topk.parquet").to_pylist()
    assert len(rows) == 10 and all(12 <= len(r["gallery"]) <= 15 for r in rows)  # the kept gallery: <= 3 junk
    # With k >= the gallery, each list is the whole kept gallery; its true matches' positions are their ranks.
    first = [1 + r["match"].index(True) for r in rows if any(r["match"])]
    assert sum(f == 1 for f in first) / len(first) == result["metrics"]["rank1"]


@pytest.mark.slow
def test_sparse_rerank_with_a_sharded_gallery_on_2_ranks_equals_the_dense_one_in_1_process(
    export, tiny_shards, tmp_path
):
    rerank = [
        "eval.rerank=true",
        "eval.rerank_k1=6",
        "eval.rerank_k2=3",
        "eval.topk=5",
        "eval.topk_format=jsonl",
        "eval.num_pictures=0",
    ]
    one = dpm_eval(tmp_path, export, tiny_shards, "dense", *rerank)
    two = dpm_eval(
        tmp_path,
        export,
        tiny_shards,
        "sparse",
        *rerank,
        "eval.rerank_method=sparse",
        "eval.shard_gallery=true",
        ranks=2,
    )
    assert two["eval"]["shard_gallery"] and two["eval"]["rerank_method"] == "sparse"
    assert two["metrics"] == one["metrics"] and two["cmc"] == one["cmc"]
    for a, b in zip(
        read_jsonl(tmp_path / "sparse" / "topk.jsonl"), read_jsonl(tmp_path / "dense" / "topk.jsonl"), strict=True
    ):
        assert a["distance"] == pytest.approx(b["distance"], abs=1e-5)  # re-ranked values: rounding only
        assert {**a, "distance": None} == {**b, "distance": None}
