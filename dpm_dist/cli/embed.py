"""``dpm-embed``: embed images with a trained model into a Parquet file (key, pid, camid, feat, feat_bn, mask).

    dpm-embed runs/tiny_synthetic photos/ -o photos.parquet                  # a folder, recursively
    dpm-embed runs/tiny_synthetic list.txt -o list.parquet --camid 0         # a list file; images without a camera
    dpm-embed runs/tiny_synthetic shards/synthetic --role query -o q.parquet # shards: local, http(s)://, s3://
    torchrun --nproc-per-node 4 -m dpm_dist.cli.embed MODEL INPUT -o out.parquet   # the same file on any ranks

pid and camid are read from Market-style or MSMT17 file names (``--names``) when they parse. A model trained on
several datasets with an SIE camera embedding needs ``--dataset NAME`` (the camera ids are that dataset's own;
shards whose index.json identifies one of them select it). A corrupt image
is an error naming the file, or with ``--skip-corrupt`` a counted, logged skip (the training policy,
``data.skip_corrupt``). A progress bar runs on stderr; the last line gives the throughput.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dpm_dist.cli.common import absolute_path, run_guarded

PROG = "dpm-embed"
ROLES = ("query", "gallery")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="our model file (.pt), a run folder, or an official DPM state dict (.pth)")
    parser.add_argument(
        "input",
        help="a folder of images, a list file (one path per line), or a shard root "
        "(folder or http(s)/s3 URL holding index.json)",
    )
    parser.add_argument("-o", "--output", default="embeddings.parquet", help="Parquet file (default: %(default)s)")
    parser.add_argument("--role", choices=ROLES + ("all",), default="all", help="shards: which split (default: both)")
    parser.add_argument(
        "--names",
        choices=("market", "msmt17", "none"),
        default="market",
        help="read pid/camid from file names in this style (default: %(default)s)",
    )
    parser.add_argument("--camid", type=int, help="camera id (0-based) for images whose name gives none")
    parser.add_argument(
        "--dataset",
        help="which of the model's training datasets the images come from (models trained "
        "on several: their cameras are shifted by its camera offset)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="image-decoding processes per rank")
    parser.add_argument(
        "--skip-corrupt", action="store_true", help="count and skip undecodable images instead of failing"
    )
    parser.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (MinIO, ...) for s3:// shards")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: this rank's GPU, else the CPU)")
    args = parser.parse_args(argv)
    return run_guarded(PROG, lambda: embed(args))


def embed(args: argparse.Namespace) -> int:
    from dpm_dist import dist
    from dpm_dist.deploy.embed import (
        assign_cameras,
        choose_dataset,
        embed_items,
        embed_shards,
        list_file,
        list_folder,
        read_shard_manifest,
        write_embeddings,
    )
    from dpm_dist.deploy.loading import load_model
    from dpm_dist.dist import DistEnv
    from dpm_dist.model.files import resolve_model_path

    if args.batch_size < 1 or args.workers < 0:
        raise ValueError(f"--batch-size must be >= 1 and --workers >= 0 (got {args.batch_size}, {args.workers})")
    env = DistEnv.from_env()
    source, output = absolute_path(args.input), absolute_path(args.output)
    kind = input_kind(source)
    path, note = resolve_model_path(args.checkpoint, flag="CHECKPOINT")
    if note and env.is_main:
        print(f"{PROG}: {note}", file=sys.stderr, flush=True)
    items = None
    if kind != "shards":  # every file checked before the model is read and before any process group
        items = list_folder(source, names=args.names) if kind == "folder" else list_file(source, names=args.names)
    loaded = load_model(path, args.device or dist.device_for(env))
    manifest = read_shard_manifest(loaded, source, s3_endpoint=args.s3_endpoint) if kind == "shards" else None
    dataset, chosen = choose_dataset(loaded, args.dataset, manifest, where=args.input)
    if chosen and env.is_main:
        print(f"{PROG}: {chosen}", file=sys.stderr, flush=True)
    offset = int(dataset["cam_offset"]) if dataset else 0
    if items is not None:
        items = assign_cameras(items, loaded, args.camid, dataset)
    if env.distributed:
        dist.init_process_group(env)
    try:
        common = dict(
            batch_size=args.batch_size, num_workers=args.workers, skip_corrupt=args.skip_corrupt, cam_offset=offset
        )
        if items is not None:
            result = embed_items(loaded, items, env, **common)
        else:
            roles = ROLES if args.role == "all" else (args.role,)
            result = embed_shards(
                loaded, source, env, roles=roles, s3_endpoint=args.s3_endpoint, manifest=manifest, **common
            )
        if env.is_main:
            settings = {
                "input": source,
                "input_kind": kind,
                "role": args.role if kind == "shards" else None,
                "names": args.names,
                "camid": args.camid,
                "batch_size": args.batch_size,
                "skip_corrupt": args.skip_corrupt,
                "world_size": env.world_size,
                "dataset": dataset["name"] if dataset else None,
                "cam_offset": offset,
                "dataset_from": None if dataset is None else "--dataset" if args.dataset else "index.json",
            }
            write_embeddings(output, result, loaded, settings)
            print(summary(result, env.world_size, output, dataset), flush=True)
    finally:
        if env.distributed:
            dist.barrier()
            dist.destroy()
    return 0


def input_kind(source: str) -> str:
    """shards (a URL, or a folder with index.json), folder, or list (a file)."""
    if "://" in source or os.path.isfile(os.path.join(source, "index.json")):
        return "shards"
    if os.path.isdir(source):
        return "folder"
    if os.path.isfile(source):
        return "list"
    raise FileNotFoundError(f"INPUT: no such folder, list file or shard root: {source}")


def summary(result, world_size: int, output: str, dataset: dict | None = None) -> str:
    num = len(result.rows)
    rate = num / result.seconds if result.seconds > 0 else float("inf")
    skipped = f", {result.num_skipped} corrupt skipped" if result.num_skipped else ""
    of = f" of dataset {dataset['name']} (cameras + {dataset['cam_offset']})" if dataset else ""
    return (
        f"{PROG}: {num} images{of} in {result.seconds:.1f} s ({rate:.1f} images/s on {world_size} "
        f"rank{'s' if world_size > 1 else ''}{skipped}) -> {output}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
