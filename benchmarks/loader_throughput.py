"""DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 .venv/bin/python benchmarks/loader_throughput.py

Images/s per DataLoader worker of the training input pipeline, by source, measured side by side in one
run (defaults: about a minute on 2 cores). Other examples:

    .venv/bin/python benchmarks/loader_throughput.py --workers 4 --num-ids 200 --reps 7     # a bigger box
    .venv/bin/python benchmarks/loader_throughput.py --shuffle-buffer 2000 --sources local,http,s3

One synthetic dataset (``dpm_dist.data.synth``, 256×128 px JPEGs by default) is rendered once and written
both as shards + ``index.json`` and as a Market-style ``bounding_box_train/`` folder of the very same
JPEG bytes. The sources, all producing P×K batches of (3, 256, 128) tensors with the docs/method.md §6.1 train
augmentation:

* ``shards: local``        the project's stream loader (``dpm_dist.data.loader.build_train_loader``,
                            ``data.sampler=stream``) over the shard folder;
* ``shards: HTTP``         the same loader over ``http://127.0.0.1:PORT/...`` (a ThreadingHTTPServer
                            serving the shard folder from a thread of this process);
* ``shards: S3 (moto)``    the same loader over ``s3://bench/...`` on a loopback moto server (dummy
                            credentials, shards uploaded with s3fs, as ``tests/conftest.py`` does);
* ``shards: local, exact`` the project's default ``data.sampler=exact`` (random access into local tars);
* ``folder of JPEGs``      the reference's way: a map-style Dataset over the files (PIL open +
                            ``.convert("RGB")``, torchvision Resize(bicubic)/Flip/Pad/RandomCrop/ToTensor/
                            Normalize + timm RandomErasing(pixel)), the official identity sampler
                            (``official_pk_indices``), batch P×K.

Every source gets the same number of workers and batches. Sources are timed round-robin (one
measurement of each per repetition, a fresh DataLoader each time); a measurement discards its first
batch (worker start-up, client set-up, filling the shuffle buffer) and times the next ``--batches``.
Prints the median images/s per worker, the ratios to the local-shard stream and to the folder, and
for the stream rows the samples read (whole shards fetched and sha256-checked) per image delivered.
"""

from __future__ import annotations

import argparse
import functools
import gc
import multiprocessing
import os
import platform
import random
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import dpm_dist.data.loader
from dpm_dist.config import DataConfig
from dpm_dist.data.layouts import scan_layout
from dpm_dist.data.loader import build_train_loader
from dpm_dist.data.sampling import official_pk_indices
from dpm_dist.data.shards import write_dataset
from dpm_dist.data.synth import SynthSpec, synth_samples
from dpm_dist.dist import DistEnv

# ---- data


def make_data(work: str, args: argparse.Namespace) -> tuple[str, str]:
    """Render the synthetic training set once; write it as shards and as a Market-style folder."""
    spec = SynthSpec(
        seed=args.seed,
        num_ids=args.num_ids,
        num_test_ids=0,
        images_per_id=args.images_per_id,
        height=args.height,
        width=args.width,
    )
    samples = list(synth_samples(spec))
    shard_dir, folder = os.path.join(work, "shards", "synthetic"), os.path.join(work, "folder")
    write_dataset(
        samples,
        shard_dir,
        dataset="synthetic",
        max_count=args.max_count,
        seed=args.seed,
        extra={"synthetic": dict(vars(spec))},
    )
    for s in samples:
        path = os.path.join(folder, s.source)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(s.jpg)
    return shard_dir, folder


# ---- servers


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def start_http(directory: str) -> tuple[str, Callable[[], None]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=directory))
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return f"http://127.0.0.1:{server.server_address[1]}", stop


def start_s3(shard_dir: str) -> tuple[str, str, Callable[[], None]]:
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        BOTO_CONFIG="/dev/null",
        AWS_DEFAULT_REGION="us-east-1",
    )
    os.environ.pop("AWS_PROFILE", None)
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    fs.mkdir("bench")
    for name in sorted(os.listdir(shard_dir)):
        fs.put_file(os.path.join(shard_dir, name), f"bench/synthetic/{name}")
    return endpoint, "s3://bench/synthetic", server.stop


# ---- the reference's way: folder of JPEGs


class FolderDataset(Dataset):
    """The official ``ImageDataset``: open with PIL, convert to RGB, transform; returns (img, pid, camid)."""

    def __init__(self, items: list[tuple[str, int, int]], transform: Any) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        path, label, camid = self.items[index]
        img = Image.open(path).convert("RGB")
        return self.transform(img), label, camid


def _collate_folder(batch: list[tuple[torch.Tensor, int, int]]) -> dict[str, torch.Tensor]:
    imgs, pids, camids = zip(*batch)
    return {"images": torch.stack(imgs), "pids": torch.tensor(pids), "camids": torch.tensor(camids)}


def folder_loader(folder: str, cfg: DataConfig, n_batches: int, rep: int) -> DataLoader:
    import torchvision.transforms as T
    from timm.data.random_erasing import RandomErasing

    records = [r for r in scan_layout("generic", folder) if r.role == "train"]
    labels = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    items = [(r.path, labels[r.pid], r.camid) for r in records]
    size = tuple(cfg.img_size)
    transform = T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=cfg.flip_prob),
            T.Pad(cfg.padding),
            T.RandomCrop(size),
            T.ToTensor(),
            T.Normalize([0.5] * 3, [0.5] * 3),
            RandomErasing(probability=cfg.erase_prob, mode="pixel", max_count=1, device="cpu"),
        ]
    )
    order: list[int] = []
    epoch = 0
    while len(order) < n_batches * cfg.batch_size:  # the official sampler's epochs, back to back
        seed = 1000 * rep + epoch
        order += official_pk_indices(
            [it[1] for it in items], cfg.num_ids, cfg.num_instances, random.Random(seed), np.random.RandomState(seed)
        )
        epoch += 1
    return DataLoader(
        FolderDataset(items, transform),
        batch_size=cfg.batch_size,
        sampler=order,
        num_workers=cfg.num_workers,
        collate_fn=_collate_folder,
        drop_last=True,
    )


# ---- measurement

SHARD_READS = multiprocessing.Value("l", 0)  # shared with forked workers


def count_shard_reads() -> None:
    """Count the loader's whole-shard reads (instrumentation only: the wrapped call is unchanged)."""
    fetch = dpm_dist.data.loader.fetch_shard

    def counted(*a: Any, **k: Any) -> bytes:
        with SHARD_READS.get_lock():
            SHARD_READS.value += 1
        return fetch(*a, **k)

    dpm_dist.data.loader.fetch_shard = counted


def measure(loader: Iterable[Any], batches: int, batch_size: int) -> tuple[float, int]:
    """Images/s over ``batches`` batches after a discarded first one, and the shard reads meanwhile."""
    it = iter(loader)
    first = next(it)
    assert first["images"].shape[0] == batch_size, first["images"].shape
    reads = SHARD_READS.value
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        assert batch["images"].shape[0] == batch_size
    elapsed = time.perf_counter() - start
    reads = SHARD_READS.value - reads
    del it, first, batch  # shuts the workers down before the next source starts
    gc.collect()
    return batches * batch_size / elapsed, reads


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Images/s per DataLoader worker: shards (local, HTTP, S3) vs a folder of JPEGs, side by side."
    )
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers for every source")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per measurement (after 1 warm-up)")
    parser.add_argument("--reps", type=int, default=5, help="round-robin repetitions; the median is reported")
    parser.add_argument("--num-ids", type=int, default=64, help="synthetic training identities")
    parser.add_argument("--images-per-id", type=int, default=12)
    parser.add_argument("--height", type=int, default=256, help="stored image height (px)")
    parser.add_argument("--width", type=int, default=128, help="stored image width (px)")
    parser.add_argument("--P", type=int, default=16, help="identities per batch (data.num_ids)")
    parser.add_argument("--K", type=int, default=4, help="images per identity (data.num_instances)")
    parser.add_argument("--max-count", type=int, default=64, help="samples per shard")
    parser.add_argument(
        "--shuffle-buffer",
        type=int,
        default=128,
        help="stream mode data.shuffle_buffer (default 1/6 of the default set, about the share the "
        "config default 2000 is of Occluded-Duke's 15,618 training images)",
    )
    parser.add_argument(
        "--sources", default="local,http,s3,exact,folder", help="comma list of local, http, s3, exact, folder"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="write the data here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    if args.batches < 1 or args.reps < 1:
        parser.error("--batches and --reps must be >= 1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    work = args.keep or tempfile.mkdtemp(prefix="dpm-loader-bench-")
    stops: list[Callable[[], None]] = []
    try:
        t0 = time.perf_counter()
        shard_dir, folder = make_data(work, args)
        n_train = args.num_ids * args.images_per_id
        n_shards = len([n for n in os.listdir(shard_dir) if n.endswith(".tar")])
        print(
            f"data: {n_train} training JPEGs of {args.height}x{args.width} px "
            f"({sum(os.path.getsize(os.path.join(shard_dir, n)) for n in os.listdir(shard_dir)) / 2**20:.1f} MiB "
            f"in {n_shards} shards), "
            f"rendered in {time.perf_counter() - t0:.1f} s"
        )

        common = dict(
            dataset="synthetic",
            num_ids=args.P,
            num_instances=args.K,
            num_workers=args.workers,
            shuffle_buffer=args.shuffle_buffer,
            batches_per_epoch=1 + args.batches,
        )
        wanted = [s.strip() for s in args.sources.split(",") if s.strip()]
        roots: dict[str, dict[str, Any]] = {}
        if "local" in wanted:
            roots["shards: local"] = dict(root=shard_dir, sampler="stream")
        if "http" in wanted:
            url, stop = start_http(os.path.dirname(shard_dir))
            stops.append(stop)
            roots["shards: HTTP"] = dict(root=f"{url}/synthetic", sampler="stream")
        if "s3" in wanted:
            endpoint, root, stop = start_s3(shard_dir)
            stops.append(stop)
            roots["shards: S3 (moto)"] = dict(root=root, sampler="stream", s3_endpoint=endpoint)
        if "exact" in wanted:
            roots["shards: local, exact"] = dict(root=shard_dir, sampler="exact")
        cfgs = {name: DataConfig(**common, **extra) for name, extra in roots.items()}
        folder_cfg = DataConfig(**common)
        if "folder" in wanted:
            cfgs["folder of JPEGs"] = folder_cfg

        results: dict[str, list[float]] = {name: [] for name in cfgs}
        reads: dict[str, list[int]] = {name: [] for name in cfgs}
        batch_size = args.P * args.K
        count_shard_reads()
        for rep in range(args.reps):
            for name, cfg in cfgs.items():
                if name == "folder of JPEGs":
                    loader: Iterable[Any] = folder_loader(folder, cfg, 1 + args.batches, rep)
                else:
                    loader = build_train_loader(cfg, DistEnv(), epoch=rep, seed=args.seed)
                    if len(loader) < 1 + args.batches:  # type: ignore[arg-type]
                        raise SystemExit(
                            f"{name}: one epoch has only {len(loader)} batches; lower --batches "
                            "or raise --num-ids / --images-per-id"
                        )
                rate, n_reads = measure(loader, args.batches, batch_size)
                results[name].append(rate)
                reads[name].append(n_reads)
                del loader
            print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{n} {v[-1]:.0f}" for n, v in results.items()))

        per_worker = max(1, args.workers)
        med = {name: statistics.median(v) / per_worker for name, v in results.items()}
        ref_local, ref_folder = med.get("shards: local"), med.get("folder of JPEGs")
        print(
            f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"workers={args.workers}, batch {args.P}x{args.K}={batch_size}, {args.batches} timed batches after 1 "
            f"warm-up, median of {args.reps} round-robin reps, stored {args.height}x{args.width} -> "
            f"{folder_cfg.img_size[0]}x{folder_cfg.img_size[1]}\n"
        )
        print(
            "| source | images/s per worker | runs (per worker) | vs local shards | vs folder of JPEGs "
            "| samples read / image |"
        )
        print("|---|---|---|---|---|---|")
        for name, value in med.items():
            runs = " / ".join(f"{v / per_worker:.0f}" for v in results[name])
            vs_local = f"{value / ref_local:.2f}×" if ref_local else "–"
            vs_folder = f"{value / ref_folder:.2f}×" if ref_folder else "–"
            per_batch = (
                f"{sum(reads[name]) * n_train / n_shards / (args.batches * args.reps * batch_size):.2f}"
                if name.startswith("shards") and cfgs[name].sampler == "stream"
                else "–"
            )
            print(f"| {name} | {value:.0f} | {runs} | {vs_local} | {vs_folder} | {per_batch} |")
        print(
            f"\n(samples read / image: samples in the whole shards fetched (and sha256-checked) while the timed "
            f"batches were made (approximate at the edges: the worker prefetches), per image delivered; 1.00 = no read amplification; data.shuffle_buffer={args.shuffle_buffer} "
            f"for {n_train} training images)"
        )
    finally:
        for stop in stops:
            stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
