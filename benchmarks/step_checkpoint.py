"""The cost of a step checkpoint (``log.checkpoint_every_steps``): seconds and bytes, measured for the tiny model and
extrapolated to ViT-B, side by side with the training step it interrupts.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/step_checkpoint.py                 # tiny measured, ViT-B extrapolated
    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/step_checkpoint.py --measure-vit-b # ViT-B saved too (~1.4 GB, RAM)

One process, ZeRO-0, fp32, /tmp (``--dir``). A step checkpoint is the same folder as an epoch checkpoint (both
DeepSpeed engines with their optimiser state, RNG, meta with the position in the epoch, the sha256 manifest), so
what it holds follows from the parameter counts: both engines' modules (the main engine's module is the whole model,
the HMG engine's the HMG) and the optimiser's fp32 state of every trained parameter (SGD momentum: 1 tensor, AdamW:
2), 4 bytes a value: ``4 * (P + P_hmg + states * P)`` (:func:`formula_bytes`). Measured here for SGD with momentum
(the paper's optimiser) and AdamW after a real training step (so the optimiser state exists), with the formula
beside it; for ViT-B the formula gives the bytes, and the save time is those bytes over a write rate
(``--write-mb-s``; default the ViT-B rate benchmarks/checkpoint_io.py measured on an idle machine here).
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

MODELS = {  # as benchmarks/checkpoint_io.py
    "tiny": dict(
        model=dict(embed_dim=64, depth=4, num_heads=4, tap_blocks=(1, 2, 3, 4)), img=(128, 64), stride=(12, 12)
    ),
    "vit_b": dict(model=dict(), img=(256, 128), stride=(11, 11)),
}
CLASSES = 702  # Occluded-Duke's training identities
VIT_B_WRITE_MB_S = 224.0  # benchmarks/checkpoint_io.py, ViT-B save on /tmp of the 2-core machine (docs/training.md)


STATES = {"sgd": 1, "adamw": 2}  # fp32 optimiser tensors per trained parameter


def formula_bytes(params: int, hmg_params: int, optim: str) -> int:
    """A ZeRO-0 fp32 checkpoint's tensor bytes: both engines' modules and the optimiser state (file headers aside)."""
    return 4 * (params + hmg_params + STATES[optim] * params)


def counts(name: str) -> tuple[int, int]:
    """(parameters of the DPM model, of its HMG) without allocating them."""
    spec = MODELS[name]
    with torch.device("meta"):
        model = create_model(
            num_classes=CLASSES, num_cams=8, img_size=spec["img"], stride=spec["stride"], **spec["model"]
        )
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.mask_parameters())


def build(name: str, optim: str, env: DistEnv, batch: int) -> tuple[DPMEngine, int, dict[str, torch.Tensor]]:
    """The engine, its parameter count, and a batch for one training step."""
    spec = MODELS[name]
    torch.manual_seed(0)
    model = create_model(num_classes=CLASSES, num_cams=8, img_size=spec["img"], stride=spec["stride"], **spec["model"])
    params = sum(p.numel() for p in model.parameters())
    cfg = to_config(
        {
            "model": {"img_size": list(spec["img"]), "stride": list(spec["stride"])},
            "data": {"img_size": list(spec["img"]), "num_ids": batch // 4, "num_instances": 4},
            "engine": {"zero_stage": 0},
            "optim": {"name": optim},
        }
    )
    engine = DPMEngine.from_config(cfg, env, model)
    images = torch.randn(batch, 3, *spec["img"])
    data = {"images": images, "pids": torch.arange(batch) // 4, "camids": torch.zeros(batch, dtype=torch.long)}
    return engine, params, data


def measure(name: str, optim: str, root: str, repeats: int, env: DistEnv, batch: int) -> dict[str, float]:
    engine, params, data = build(name, optim, env, batch)
    steps = []
    for _ in range(repeats + 1):  # the first creates the optimiser state
        t0 = time.perf_counter()
        engine.step(data)
        steps.append(time.perf_counter() - t0)
    saves, verifies, size = [], [], 0
    for i in range(repeats):
        meta = {"epoch_step": i + 1, "epoch_steps": repeats + 1, "epoch_samples": (i + 1) * batch}
        t0 = time.perf_counter()
        folder = checkpoint.save(
            engine, root, epoch=1, step=i + 1, env=env, meta=meta, keep_last=1, keep_last_steps=1, is_best=False
        )
        saves.append(time.perf_counter() - t0)
        size = sum(f["size"] for f in checkpoint._read_manifest(folder)[0]["files"].values())
        t0 = time.perf_counter()
        assert checkpoint.verify(folder, env) == []
        verifies.append(time.perf_counter() - t0)
    return {
        "params": params,
        "bytes": size,
        "save_s": statistics.median(saves),
        "verify_s": statistics.median(verifies),
        "step_s": statistics.median(steps[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder under /tmp)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="images per training step (tiny model)")
    parser.add_argument("--write-mb-s", type=float, default=VIT_B_WRITE_MB_S, help="ViT-B extrapolation: write rate")
    parser.add_argument("--measure-vit-b", action="store_true", help="also save ViT-B for real (slow, ~1.4 GB each)")
    args = parser.parse_args()
    env = DistEnv.from_env()
    init_process_group(env)
    print(
        f"{'model':6} {'optim':6} {'params':>11} {'MB':>8} {'formula MB':>10} {'save s':>8} {'verify s':>9} "
        f"{'step s':>7} {'save/step':>9}  how"
    )
    for optim in ("sgd", "adamw"):
        for name in ["tiny", "vit_b"] if args.measure_vit_b else ["tiny"]:
            root = tempfile.mkdtemp(prefix=f"stepckpt-{name}-", dir=args.dir)
            try:
                r = measure(name, optim, root, args.repeats, env, args.batch if name == "tiny" else 8)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            formula = formula_bytes(*counts(name), optim) / 1e6
            print(
                f"{name:6} {optim:6} {r['params']:11,d} {r['bytes'] / 1e6:8.1f} {formula:10.1f} {r['save_s']:8.2f} "
                f"{r['verify_s']:9.2f} {r['step_s']:7.2f} {r['save_s'] / r['step_s']:9.2f}  measured",
                flush=True,
            )
        params, hmg = counts("vit_b")
        mb = formula_bytes(params, hmg, optim) / 1e6
        print(
            f"{'vit_b':6} {optim:6} {params:11,d} {'':>8} {mb:10.1f} {mb / args.write_mb_s:8.2f} {'':>9} {'':>7} "
            f"{'':>9}  extrapolated: the formula, saved at {args.write_mb_s:g} MB/s",
            flush=True,
        )


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
