"""Seconds per training step with ``engine.invariant`` on and off, at 2 gloo ranks, side by side in one run.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/invariance.py                 # tiny model, 2 CPU ranks
    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/invariance.py --steps 40 --ranks 3
    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/invariance.py --model vit_s --ids 4 --steps 10

The script starts its own gloo ranks. Each rank builds two engines over identical models (drop-path 0.1):
today's per-rank mode (``engine.invariant=off``: per-rank BatchNorm, process-RNG drop-path, local triplet
mining) and the invariant mode (global BatchNorm, sample-keyed drop-path, triplet gather, metrics averaged over
ranks). They are timed round-robin (one step of each per round, after warm-up) so machine noise hits both
alike. Rank 0 prints the median seconds per step of each (wall clock, and the CPU time of its process, which a
busy machine disturbs less) and the ratio invariant / today. The loader's part (the augmentation seeds) costs the
same in both modes and is left out.

It also counts the collectives of a step in each mode (every ``torch.distributed`` call the step makes, DeepSpeed's
included) and times a bare collective of the same kind between the same ranks (a gather of 129 floats, median of
200). On this 2-core VM the invariant mode's extra cost is mostly its synchronisation points: besides the
collectives' own latency, every one of them makes the faster rank wait for the slower; it is a fixed cost per
step that a bigger model's compute hides (docs/benchmarks.md, "World-size invariance cost").
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import socket
import statistics
import time

import torch

MODELS = {  # the tiny demo model, half a ViT-Ti (6 blocks of 192) and a ViT-S-sized one (12 blocks of 384)
    "tiny": dict(
        model=dict(embed_dim=64, depth=4, num_heads=4, tap_blocks=(1, 2, 3, 4)), img=(128, 64), stride=(12, 12)
    ),
    "small": dict(
        model=dict(embed_dim=192, depth=6, num_heads=3, tap_blocks=(3, 4, 5, 6)), img=(256, 128), stride=(16, 16)
    ),
    "vit_s": dict(model=dict(embed_dim=384, depth=12, num_heads=6), img=(256, 128), stride=(16, 16)),
}
DROP_PATH, K = 0.1, 4


def _engine(name: str, invariant: str, ids: int, world: int, classes: int):
    from dpm_dist.config import to_config
    from dpm_dist.dist import DistEnv
    from dpm_dist.model.dpm import create_model
    from dpm_dist.train.engine import DPMEngine

    env, spec = DistEnv.from_env(), MODELS[name]
    img, stride = spec["img"], spec["stride"]
    torch.manual_seed(0)
    model = create_model(
        num_classes=classes, num_cams=8, img_size=img, stride=stride, drop_path=DROP_PATH, **spec["model"]
    )
    cfg = to_config(
        {
            "model": {"img_size": list(img), "stride": list(stride), "drop_path": DROP_PATH},
            "data": {"img_size": list(img), "global_num_ids": ids * world, "num_instances": K},
            "engine": {"invariant": invariant, "zero_stage": 0},
        }
    )
    engine = DPMEngine.from_config(cfg, env, model)
    engine.start_epoch(10)
    return engine


_CALLS: collections.Counter[str] = collections.Counter()


def _count_collectives() -> None:
    """Count every collective ``torch.distributed`` call of this process (DeepSpeed's go through the same module)."""
    import torch.distributed as tdist

    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast"):
        original = getattr(tdist, name)

        @functools.wraps(original)
        def counted(*args, _original=original, _name=name, **kwargs):
            _CALLS[_name] += 1
            return _original(*args, **kwargs)

        setattr(tdist, name, counted)


def _collective_latency(world: int, rounds: int = 200) -> float:
    """Median seconds of one small all-gather (129 floats: a BatchNorm's statistics at 64 channels) on this group."""
    import torch.distributed as tdist

    local, parts = torch.randn(129), [torch.empty(129) for _ in range(world)]
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        tdist.all_gather(parts, local)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rank(rank: int, world: int, port: int, model: str, ids: int, steps: int, threads: int) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    from dpm_dist.dist import DistEnv, init_process_group

    env = DistEnv.from_env()
    init_process_group(env)
    _count_collectives()
    classes, batch = 702, ids * K
    modes = {
        "today": _engine(model, "off", ids, world, classes),
        "invariant": _engine(model, "on", ids, world, classes),
    }
    g = torch.Generator().manual_seed(rank)
    data = {
        "images": torch.randn(batch, 3, *MODELS[model]["img"], generator=g),
        "pids": (torch.arange(ids).repeat_interleave(K) + rank * ids) % classes,
        "camids": torch.randint(0, 8, (batch,), generator=g),
        "sample_seeds": torch.arange(batch) + rank * batch,
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for engine in modes.values():  # warm-up
        engine.step(data)
    calls = {}
    for name, engine in modes.items():  # one counted step of each
        _CALLS.clear()
        engine.step(data)
        calls[name] = sum(_CALLS.values())
    for _ in range(steps):
        for name, engine in modes.items():
            t0, c0 = time.perf_counter(), time.process_time()
            engine.step(data)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    latency = _collective_latency(world)  # collective: every rank, before rank 0 prints
    if env.is_main:
        today = statistics.median(times["today"])
        spec = MODELS[model]
        print(
            f"{model} DPM ({spec['model']['embed_dim']}-wide, {spec['model']['depth']} blocks, "
            f"{spec['img'][0]}x{spec['img'][1]}), {world} gloo ranks x {batch} images, fp32, ZeRO-0, "
            f"{steps} timed steps per mode, {threads} thread(s) per rank"
        )
        today_cpu = statistics.median(cpu["today"])
        print(f"{'mode':<10} {'s/step':>8} {'vs today':>9} {'CPU s/step':>11} {'vs today':>9}")
        for name in modes:
            med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
            print(f"{name:<10} {med:8.3f} {med / today:8.3f}x {med_cpu:11.3f} {med_cpu / today_cpu:8.3f}x")
        extra = calls["invariant"] - calls["today"]
        print(
            f"collectives per step: today {calls['today']}, invariant {calls['invariant']}; one small gather between "
            f"ranks that wait for it: {latency * 1e3:.2f} ms ({extra} of them: {extra * latency * 1e3:.0f} ms, "
            f"{extra * latency / today:.1%} of today's step); the rest of the difference is the mode's own "
            "arithmetic and each rank waiting for the slower one at every synchronisation point"
        )
    from dpm_dist import dist

    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=sorted(MODELS))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--ids", type=int, default=8, help="identities per rank (× 4 images)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spawn_args = (args.ranks, port, args.model, args.ids, args.steps, args.threads)
    mp.spawn(_rank, args=spawn_args, nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
