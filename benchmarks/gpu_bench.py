"""The measurements of benchmarks/gpu_check.sh: training throughput, evaluation time, loader images/s.

Each function returns a JSON-able dict and, for training, rewrites its part file after every mode, so a
step stopped by its ``timeout`` still leaves the modes it finished. ``dry=True`` runs the same code on
tiny sizes (CPU).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

MODES = ("exact", "approx", "reference")
CLASSES, CAMS = 702, 8  # Occluded-Duke's training identities and cameras
VIT_B = dict(model=dict(), img=(256, 128), stride=(11, 11), patch=16, batch=64, precision="bf16", warmup=3, steps=20)
# The dry run: the CPU test model (tests/engine_worker.py) in fp32 (bf16 autocast is emulated, slowly, on most CPUs).
TINY = dict(
    model=dict(embed_dim=32, depth=4, num_heads=4, tap_blocks=(1, 2, 3, 4), patch_size=8),
    img=(64, 32),
    stride=(6, 6),
    patch=8,
    batch=4,
    precision="fp32",
    warmup=1,
    steps=2,
)
PEAKS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak of the SXM parts (vendor spec)


def peak_flops(device_name: str) -> tuple[float | None, str]:
    for key, value in PEAKS.items():
        if key in device_name:
            return value, f"{value / 1e12:.0f} TFLOP/s: {key} SXM dense bf16 spec"
    return None, "no peak known for this device"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _engine(spec: dict[str, Any], mode: str, *, compile: bool, backend: str):
    from dpm_dist.config import to_config
    from dpm_dist.dist import DistEnv
    from dpm_dist.model.dpm import create_model
    from dpm_dist.train.engine import DPMEngine

    torch.manual_seed(0)
    model = create_model(
        num_classes=CLASSES, num_cams=CAMS, img_size=spec["img"], stride=spec["stride"], **spec["model"]
    )
    cfg = to_config(
        {
            "model": {"img_size": list(spec["img"]), "stride": list(spec["stride"]), "patch_size": spec["patch"]},
            "data": {
                "img_size": list(spec["img"]),
                "num_ids": spec["batch"] // 2 if spec["batch"] < 8 else spec["batch"] // 4,
                "num_instances": 2 if spec["batch"] < 8 else 4,
            },
            "engine": {
                "update_mode": mode,
                "precision": spec["precision"],
                "zero_stage": 0,
                "compile": compile,
                "compile_backend": backend,
            },
        }
    )
    engine = DPMEngine.from_config(cfg, DistEnv(), model)
    engine.start_epoch(10)
    return engine, cfg.data.num_instances


def _batch(spec: dict[str, Any], k: int, device: torch.device) -> dict[str, torch.Tensor]:
    n, (h, w) = spec["batch"], spec["img"]
    g = torch.Generator().manual_seed(0)
    return {
        "images": torch.randn(n, 3, h, w, generator=g).to(device),
        "pids": (torch.arange(n // k).repeat_interleave(k) % CLASSES).to(device),
        "camids": torch.randint(0, CAMS, (n,), generator=g).to(device),
    }


def count_flops(engine: Any, batch: dict[str, torch.Tensor]) -> float:
    """FLOPs of one whole iteration (both steps, forward + backward), counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        engine.step(batch)
    return float(counter.get_total_flops())


def train(*, dry: bool, compile: bool, part: str) -> dict[str, Any]:
    """images/s, peak memory and FLOPs per image of each update mode, one engine at a time."""
    from dpm_dist.dist import DistEnv, init_process_group

    spec = TINY if dry else VIT_B
    init_process_group(DistEnv())
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backend = "aot_eager" if dry and compile else "inductor"
    out: dict[str, Any] = {
        "model": "tiny ViT (32-d, 4 blocks, patch 8)" if dry else "ViT-B/16",
        "img": list(spec["img"]),
        "stride": list(spec["stride"]),
        "batch": spec["batch"],
        "precision": spec["precision"],
        "compile": compile,
        "compile_backend": backend if compile else None,
        "steps": spec["steps"],
        "warmup": spec["warmup"],
        "modes": {},
    }
    for mode in MODES:
        engine, k = _engine(spec, mode, compile=compile, backend=backend)
        batch = _batch(spec, k, device)
        start = time.perf_counter()
        for _ in range(spec["warmup"]):  # torch.compile compiles here
            engine.step(batch)
        _sync()
        row: dict[str, Any] = {"warmup_s": time.perf_counter() - start}
        if not compile:  # a dispatch mode would only see the compiled graph's boundaries
            row["flops_per_image"] = count_flops(engine, batch) / spec["batch"]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(spec["steps"]):
            _sync()
            t0 = time.perf_counter()
            engine.step(batch)
            _sync()
            times.append(time.perf_counter() - t0)
        row["s_per_step"] = statistics.median(times)
        row["images_per_s"] = spec["batch"] / row["s_per_step"]
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        out["modes"][mode] = row
        del engine, batch
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        write(part, out)
    return out


def evaluation(*, dry: bool) -> dict[str, Any]:
    """Masked retrieval + CMC/mAP/mINP at Occluded-Duke size on the device (features already there)."""
    from dpm_dist.eval.retrieval import evaluate_features

    nq, ng, dim, ids = (200, 1000, 64, 100) if dry else (2210, 17661, 768, 1110)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(ids, dim, generator=g)
    q_pids, g_pids = torch.randint(0, ids, (nq,), generator=g), torch.randint(0, ids, (ng,), generator=g)
    qf = centres[q_pids] + 3.0 * torch.randn(nq, dim, generator=g)
    gf = centres[g_pids] + 3.0 * torch.randn(ng, dim, generator=g)
    qm = torch.sigmoid(2.0 * torch.randn(nq, dim, generator=g))
    cams = torch.randint(0, 8, (nq + ng,), generator=g)
    args = [t.to(device) for t in (qf, gf, q_pids, g_pids, cams[:nq], cams[nq:])]
    qm = qm.to(device)

    def once() -> tuple[float, dict[str, float]]:
        _sync()
        t0 = time.perf_counter()
        metrics = evaluate_features(*args, q_mask=qm).as_dict()
        _sync()
        return time.perf_counter() - t0, metrics

    once()  # warm-up: kernels, allocator
    runs = [once() for _ in range(3)]
    return {
        "num_query": nq,
        "num_gallery": ng,
        "dim": dim,
        "dtype": "float32",
        "device": str(device),
        "seconds": min(t for t, _ in runs),
        "metrics": runs[0][1],
    }


def loader(*, dry: bool, workers: int) -> dict[str, Any]:
    """Training batches/s of the stream loader over local shards of 256×128 JPEGs (pinned on CUDA)."""
    from dpm_dist.config import DataConfig
    from dpm_dist.data.loader import build_train_loader
    from dpm_dist.data.synth import write_synthetic_shards
    from dpm_dist.dist import DistEnv

    p, k = (2, 2) if dry else (16, 4)
    num_ids, per_id, count = (8, 4, 4) if dry else (96, 16, 32)
    batches = 4 if dry else 8 * workers
    with tempfile.TemporaryDirectory(prefix="gpu-check-loader-") as work:
        start = time.perf_counter()
        root = write_synthetic_shards(
            os.path.join(work, "synthetic"),
            num_ids=num_ids,
            num_test_ids=2,
            images_per_id=per_id,
            height=256,
            width=128,
            max_count=count,
        )
        render_s = time.perf_counter() - start
        cfg = DataConfig(
            root=root,
            dataset="synthetic",
            sampler="stream",
            num_ids=p,
            num_instances=k,
            num_workers=workers,
            shuffle_buffer=max(p * k, 128),
            batches_per_epoch=1 + batches,
            img_size=[256, 128],
            pin_memory=torch.cuda.is_available(),
        )
        it = iter(build_train_loader(cfg, DistEnv(), epoch=1, seed=0))
        next(it)  # worker start-up and the shuffle buffers
        t0 = time.perf_counter()
        seen = sum(b["images"].shape[0] for b in it)
        elapsed = time.perf_counter() - t0
    return {
        "workers": workers,
        "batch": p * k,
        "batches": batches,
        "images": seen,
        "render_s": render_s,
        "images_per_s": seen / elapsed,
        "pin_memory": cfg.pin_memory,
        "images_stored": num_ids * per_id,
    }


def write(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def timed(fn: Callable[..., dict[str, Any]], path: str, **kw: Any) -> None:
    start = time.perf_counter()
    result = fn(**kw)
    result["wall_s"] = time.perf_counter() - start
    write(path, result)
