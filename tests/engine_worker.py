"""Worker for the engine tests: runs a few DPM iterations in every update mode on this process's rank.

Run by tests/test_engine.py in-process (world size 1) and under ``torchrun --nproc-per-node 2``.
Writes ``<out>/<mode>_zero<k>.pt`` (rank 0's final state dict) for each requested configuration.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from dpm_dist.config import to_config
from dpm_dist.dist import DistEnv, init_process_group
from dpm_dist.model.dpm import create_model

TINY = dict(
    backbone="vit_base_patch16_224",
    embed_dim=32,
    depth=4,
    num_heads=4,
    tap_blocks=(1, 2, 3, 4),
    drop_path=0.0,
    img_size=(64, 32),
    patch_size=8,
    stride=(6, 6),
    num_classes=6,
    num_cams=3,
)


def make_cfg(mode: str, zero: int, *, gather_triplet: bool = False, precision: str = "fp32"):
    return to_config(
        {
            "model": {"img_size": [64, 32], "stride": [6, 6], "patch_size": 8, "drop_path": 0.0},
            "data": {"img_size": [64, 32], "num_ids": 3, "num_instances": 2},
            "optim": {"epochs": 4, "warmup_epochs": 1, "base_lr": 0.05},
            "engine": {
                "update_mode": mode,
                "zero_stage": zero,
                "precision": precision,
                "gather_triplet": gather_triplet,
            },
            "loss": {"hem_ref_batch": 6},
        }
    )


def batches(env: DistEnv, num: int, per_rank: int = 6) -> list[dict]:
    """P×K batches of random images, identical across runs; rank r takes its own slice."""
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(num):
        images = torch.randn(per_rank * env.world_size, 3, 64, 32, generator=g)
        pids = torch.arange(3 * env.world_size).repeat_interleave(2)
        camids = torch.randint(0, 3, (per_rank * env.world_size,), generator=g)
        sl = slice(env.rank * per_rank, (env.rank + 1) * per_rank)
        out.append({"images": images[sl], "pids": pids[sl], "camids": camids[sl]})
    return out


def fresh_model():
    torch.manual_seed(0)
    model = create_model(**TINY)
    # Move the HMG away from its zero init so that step 2 has gradients into every HMG layer.
    torch.nn.init.normal_(model.mask_gen.fc.weight, std=0.05)
    return model


def run(mode: str, zero: int, env: DistEnv, steps: int = 3, **kw) -> dict[str, torch.Tensor]:
    from dpm_dist.train.engine import DPMEngine

    engine = DPMEngine.from_config(make_cfg(mode, zero, **kw), env, fresh_model())
    engine.start_epoch(2)
    for batch in batches(env, steps):
        engine.step(batch)
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", nargs="+", required=True, help="mode:zero[:gather]")
    args = parser.parse_args(argv)
    env = DistEnv.from_env()
    init_process_group(env)
    for spec in args.runs:
        parts = spec.split(":")
        state = run(parts[0], int(parts[1]), env, gather_triplet=len(parts) > 2)
        if env.is_main:
            torch.save(state, os.path.join(args.out, spec.replace(":", "_") + ".pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
