"""DS_ACCELERATOR=cpu .venv/bin/python benchmarks/loader_epochs.py [--workers 2] [--epochs 4]

What ``data.persistent_workers`` saves at each epoch boundary: the wait for an epoch's first batch, with a new
DataLoader per epoch (the default: its workers start, import, open the shards and fill the P×K buffer) and with
one DataLoader whose workers live across epochs (the workers only restart their pipeline). Both samplers, the
same synthetic shards, side by side in one run; epochs after the first are timed (the first starts the workers
either way). Also prints each mode's whole-epoch time, so the saving can be read against an epoch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from dpm_dist.config import DataConfig
from dpm_dist.data.loader import TrainLoader
from dpm_dist.data.synth import write_synthetic_shards
from dpm_dist.dist import DistEnv


def run(cfg: DataConfig, epochs: int) -> tuple[list[float], list[float]]:
    """(seconds to the first batch, seconds for the whole epoch) of epochs 2..epochs."""
    loaders, first, whole = TrainLoader(cfg, DistEnv(), seed=0), [], []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        it = iter(loaders.epoch(epoch))
        next(it)
        t1 = time.perf_counter()
        for _ in it:
            pass
        if epoch > 1:
            first.append(t1 - t0)
            whole.append(time.perf_counter() - t0)
    return first, whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--num-ids", type=int, default=40)
    parser.add_argument("--images-per-id", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_shards(
            os.path.join(tmp, "synthetic"),
            seed=0,
            num_ids=args.num_ids,
            num_test_ids=2,
            images_per_id=args.images_per_id,
            query_per_id=1,
            gallery_per_id=1,
            num_cams=4,
            height=256,
            width=128,
            max_count=16,
        )
        print(
            f"{args.num_ids * args.images_per_id} training images 256x128, {args.workers} workers, batch 8x4, "
            f"epochs 2..{args.epochs} timed\n"
        )
        print(
            "| sampler | first batch, new loader each epoch (s) | first batch, persistent workers (s) | ratio "
            "| epoch, new loader (s) | epoch, persistent (s) |"
        )
        print("|---|---|---|---|---|---|")
        for sampler in ("exact", "stream"):
            got = {}
            for persistent in (False, True):
                cfg = DataConfig(
                    dataset="synthetic",
                    root=root,
                    sampler=sampler,
                    num_ids=8,
                    num_instances=4,
                    num_workers=args.workers,
                    persistent_workers=persistent,
                    shuffle_buffer=64,
                )
                got[persistent] = [statistics.median(v) for v in run(cfg, args.epochs)]
            (f0, e0), (f1, e1) = got[False], got[True]
            print(f"| {sampler} | {f0:.3f} | {f1:.3f} | {f1 / f0:.2f}x | {e0:.2f} | {e1:.2f} |", flush=True)


if __name__ == "__main__":
    main()
