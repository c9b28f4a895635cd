"""Checkpoint save and verify time (both engines, RNG, meta, the sha256 manifest), side by side in one run.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/checkpoint_io.py                    # tiny model + ViT-B, /tmp
    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/checkpoint_io.py --models tiny --dir /mnt/nfs/scratch

One process, ZeRO-0, SGD with momentum (the paper's optimiser), fp32: the checkpoint holds the weights and
momentum of both engines. Each model is saved ``--repeats`` times; printed: bytes, the median seconds of the
whole save, of the manifest alone (hash + fsync of every file) and of a verification (read + hash), and
their rates. The manifest's share of the save is the cost of crash safety; the verification is what a
resume adds. On R ranks both are shared out over the ranks by file size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

from dpm_dist.config import to_config
from dpm_dist.dist import DistEnv, init_process_group
from dpm_dist.model.dpm import create_model
from dpm_dist.train import checkpoint
from dpm_dist.train.engine import DPMEngine

MODELS = {
    "tiny": dict(
        model=dict(embed_dim=64, depth=4, num_heads=4, tap_blocks=(1, 2, 3, 4)),
        img=(128, 64),
        stride=(12, 12),
        classes=702,
    ),
    "vit_b": dict(model=dict(), img=(256, 128), stride=(11, 11), classes=702),  # Occluded-Duke's 702 identities
}


def make_engine(name: str, env: DistEnv) -> DPMEngine:
    spec = MODELS[name]
    torch.manual_seed(0)
    model = create_model(
        num_classes=spec["classes"], num_cams=8, img_size=spec["img"], stride=spec["stride"], **spec["model"]
    )
    cfg = to_config(
        {
            "model": {"img_size": list(spec["img"]), "stride": list(spec["stride"])},
            "data": {"img_size": list(spec["img"]), "num_ids": 4, "num_instances": 4},
            "engine": {"zero_stage": 0},
        }
    )
    engine = DPMEngine.from_config(cfg, env, model)
    for opt in (engine.opt_main, engine.opt_mask):  # momentum buffers exist after a first step: make them now
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return engine


def measure(name: str, root: str, repeats: int, env: DistEnv) -> dict[str, float]:
    engine = make_engine(name, env)
    saves, manifests, verifies, size = [], [], [], 0
    for i in range(repeats):
        t0 = time.perf_counter()
        folder = checkpoint.save(engine, root, epoch=i + 1, step=i + 1, env=env, meta={}, keep_last=1, is_best=False)
        saves.append(time.perf_counter() - t0)
        size = sum(f["size"] for f in checkpoint._read_manifest(folder)[0]["files"].values())
        t0 = time.perf_counter()
        checkpoint.write_manifest(folder, env)  # the manifest step alone, again (files in the page cache)
        manifests.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert checkpoint.verify(folder, env) == []
        verifies.append(time.perf_counter() - t0)
    save, manifest, verify = (statistics.median(v) for v in (saves, manifests, verifies))
    return {"bytes": size, "save_s": save, "manifest_s": manifest, "verify_s": verify}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder under /tmp)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = DistEnv.from_env()
    init_process_group(env)
    print(
        f"{'model':6} {'MB':>8} {'save s':>8} {'manifest s':>10} {'share':>6} {'verify s':>9} {'save MB/s':>10} "
        f"{'verify MB/s':>11}"
    )
    for name in args.models:
        root = tempfile.mkdtemp(prefix=f"ckpt-{name}-", dir=args.dir)
        try:
            r = measure(name, root, args.repeats, env)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        mb = r["bytes"] / 1e6
        print(
            f"{name:6} {mb:8.1f} {r['save_s']:8.2f} {r['manifest_s']:10.2f} {r['manifest_s'] / r['save_s']:6.0%} "
            f"{r['verify_s']:9.2f} {mb / r['save_s']:10.0f} {mb / r['verify_s']:11.0f}",
            flush=True,
        )


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
