"""Samples/s of the three DPM update modes (reference, exact, approx), measured side by side in one run.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/train_step.py                     # tiny model + ViT-B (CPU)
    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/train_step.py --models tiny       # tiny only
    .venv/bin/python benchmarks/train_step.py --models vit_b --batch 64 --precision bf16 --steps 20   # on a GPU

Each mode gets its own engine over an identical model; the modes are timed round-robin (one step of
each per round, after warm-up) so machine noise hits them alike. Prints the median seconds per step,
samples/s and the ratios to ``reference``. On CUDA it also prints peak memory and model FLOP
utilisation from the docs/method.md §10.1 cost model (2 × MACs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dpm_dist.config import to_config
from dpm_dist.dist import DistEnv, init_process_group
from dpm_dist.model.dpm import create_model
from dpm_dist.train.engine import DPMEngine

MODELS = {
    "tiny": dict(
        model=dict(embed_dim=64, depth=4, num_heads=4, tap_blocks=(1, 2, 3, 4)),
        img=(128, 64),
        stride=(12, 12),
        batch=32,
    ),
    "vit_b": dict(model=dict(), img=(256, 128), stride=(11, 11), batch=8),
}


def make_engine(name: str, mode: str, batch: int, precision: str, classes: int) -> DPMEngine:
    spec = MODELS[name]
    torch.manual_seed(0)
    model = create_model(num_classes=classes, num_cams=8, img_size=spec["img"], stride=spec["stride"], **spec["model"])
    cfg = to_config(
        {
            "model": {"img_size": list(spec["img"]), "stride": list(spec["stride"])},
            "data": {"img_size": list(spec["img"]), "num_ids": batch // 4, "num_instances": 4},
            "engine": {"update_mode": mode, "precision": precision, "zero_stage": 0},
        }
    )
    engine = DPMEngine.from_config(cfg, DistEnv(), model)
    engine.start_epoch(10)
    return engine


def make_batch(name: str, batch: int, classes: int) -> dict:
    h, w = MODELS[name]["img"]
    return {
        "images": torch.randn(batch, 3, h, w),
        "pids": torch.arange(batch // 4).repeat_interleave(4) % classes,
        "camids": torch.randint(0, 8, (batch,)),
    }


def bench(name: str, batch: int, steps: int, precision: str) -> None:
    classes = 702
    modes = ("reference", "exact", "approx")
    engines = {m: make_engine(name, m, batch, precision, classes) for m in modes}
    data = make_batch(name, batch, classes)
    cuda = torch.cuda.is_available()
    times: dict[str, list[float]] = {m: [] for m in modes}
    peak: dict[str, float] = {}
    for m in modes:  # warm-up
        engines[m].step(data)
    for _ in range(steps):
        for m in modes:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            engines[m].step(data)
            if cuda:
                torch.cuda.synchronize()
                peak[m] = max(peak.get(m, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            times[m].append(time.perf_counter() - t0)
    ref = statistics.median(times["reference"])
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"\n{name}: batch {batch}, {precision}, {steps} timed steps per mode, {device}, threads {torch.get_num_threads()}"
    )
    print(
        f"{'mode':<10} {'s/step':>8} {'samples/s':>10} {'vs reference':>13}"
        + (f" {'peak GiB':>9} {'MFU':>6}" if cuda else "")
    )
    for m in modes:
        med = statistics.median(times[m])
        line = f"{m:<10} {med:8.3f} {batch / med:10.1f} {ref / med:12.2f}x"
        if cuda and name == "vit_b":
            # docs/method.md §10.1-10.3 at stride 11: ViT-B 21.9 + HMG 10.9 GMAC/image forward, backward ≈ 2× forward.
            step1 = 3 * 21.9 + 2 * 10.9  # full fwd/bwd, no HMG weight grads (87.5)
            macs = {"reference": 2 * 3 * 32.8, "exact": step1 + 21.9 + 2 * 10.9, "approx": step1 + 2 * 10.9}[m]
            flops = 2 * macs * 1e9 * batch / med
            line += f" {peak[m]:9.2f} {flops / 989e12:6.1%}"  # H100 SXM dense bf16 peak
        elif cuda:
            line += f" {peak[m]:9.2f} {'-':>6}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "vit_b"], choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=0, help="per-step batch (multiple of 4); 0: the model's default")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    init_process_group(DistEnv())
    for name in args.models:
        bench(name, args.batch or MODELS[name]["batch"], args.steps, args.precision)


if __name__ == "__main__":
    main()
