"""``dpm-shards``: dataset folder -> shards, the synthetic dataset, and shard verification.

    dpm-shards write --layout occluded_duke --src /data/Occluded_Duke            # -> shards/occluded_duke
    dpm-shards write --layout occluded_reid --src /data/Occluded_REID           # raw release, no Rename.py
    dpm-shards write --layout msmt17 --src /data/MSMT17_V1 --max-bytes 256MB
    dpm-shards write --layout list --list /data/people/people.csv  # your own: path,identity,camera,role -> shards/people
    dpm-shards write --layout folders --src /data/people    # your own: <role>/<identity>/<camera>_*.jpg -> shards/people
    dpm-shards synth --out shards/synthetic [--folder /tmp/synthetic_folder] [--num-ids 50]
    dpm-shards verify shards/occluded_duke          # or http://host/occluded_duke, s3://bucket/occluded_duke

Every image is decoded while writing: a corrupt one is an error naming the file, or with ``--skip-corrupt``
it is left out, counted and listed in ``index.json``. User errors are one line ``dpm-shards: error: ...``
(exit 2; the traceback with ``HYDRA_FULL_ERROR=1``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dpm_dist.cli.common import absolute_path, run_guarded
from dpm_dist.data.layouts import LAYOUTS, OWN_LAYOUTS, scan_layout, scan_own
from dpm_dist.data.shards import MANIFEST, CorruptImageError, read_manifest, verify, write_records
from dpm_dist.data.storage import IOOptions, is_remote, local_path
from dpm_dist.data.synth import SynthSpec, write_synthetic_folder, write_synthetic_shards

PROG = "dpm-shards"
DEFAULT_ROOT = "shards"
SYNTH_FLAGS = (
    "num_ids",
    "num_test_ids",
    "images_per_id",
    "query_per_id",
    "gallery_per_id",
    "num_cams",
    "height",
    "width",
)


def parse_size(text: str) -> int:
    """``"64MB"``, ``"1GB"``, ``"500kB"`` or a plain byte count."""
    units = {"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "b": 1}
    low = text.strip().lower()
    for suffix, factor in units.items():
        if low.endswith(suffix) and low[: -len(suffix)].strip().replace(".", "", 1).isdigit():
            return int(float(low[: -len(suffix)]) * factor)
    if low.isdigit():
        return int(low)
    raise argparse.ArgumentTypeError(f"cannot read size {text!r} (e.g. 64MB)")


def _summary(manifest: dict, out: str) -> str:
    parts = [
        f"{role}: {s['num_samples']} images / {s['num_ids']} ids / {len(s['shards'])} shards"
        for role, s in manifest["splits"].items()
    ]
    return f"wrote {out}: " + "; ".join(parts) + f"; C={manifest['num_train_ids']} cams={manifest['num_cams']}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="convert a dataset folder (or a list file) into shards")
    write.add_argument("--layout", required=True, choices=sorted([*LAYOUTS, *OWN_LAYOUTS]))
    write.add_argument("--src", help="dataset folder (every layout but list)")
    write.add_argument(
        "--list",
        help="--layout list: CSV/TSV file with columns path,identity,camera,role (paths relative to its folder)",
    )
    write.add_argument(
        "--out",
        help=f"output folder (default {DEFAULT_ROOT}/<layout>; list: {DEFAULT_ROOT}/<list file name without "
        f"extension>; folders: {DEFAULT_ROOT}/<--src folder name>)",
    )
    write.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="leave out images that do not decode (counted, listed in index.json) instead of failing",
    )
    synth = sub.add_parser("synth", help="generate the built-in synthetic occluded-person dataset")
    synth.add_argument("--out", help=f"shard folder (default {DEFAULT_ROOT}/synthetic)")
    synth.add_argument("--folder", help="also (or, with --no-shards, only) write a Market-style image folder")
    synth.add_argument("--no-shards", action="store_true")
    for field in SYNTH_FLAGS:
        synth.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(SynthSpec, field))
    for p, count in ((write, 1000), (synth, 64)):
        p.add_argument("--max-count", type=int, default=count, help="samples per shard at most")
        p.add_argument("--max-bytes", type=parse_size, default=64 << 20, help="bytes per shard at most (e.g. 64MB)")
        p.add_argument("--seed", type=int, default=0)
    check = sub.add_parser("verify", help="recompute counts and sha256, decode every image")
    check.add_argument("root", help="shard folder or URL prefix holding index.json")
    check.add_argument("--s3-endpoint", help="e.g. http://127.0.0.1:9000 (default: AWS)")
    return parser


def _source(args: argparse.Namespace) -> tuple[str, str]:
    """The absolute ``--src`` folder (or ``--list`` file) and the default output folder's name."""
    if args.layout == "list":
        if args.src or not args.list:
            raise ValueError(
                "--layout list takes --list FILE (paths in it are relative to its folder), not --src"
                if args.src
                else "--layout list needs --list FILE (a CSV/TSV with columns path,identity,camera,role)"
            )
        src = absolute_path(args.list)
        return src, os.path.splitext(os.path.basename(src))[0]
    if args.list or not args.src:
        raise ValueError(
            f"--list is for --layout list only (--layout {args.layout} reads --src DIR)"
            if args.list
            else f"--layout {args.layout} needs --src DIR (the dataset folder)"
        )
    src = absolute_path(args.src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src {src}: no such folder")
    return src, os.path.basename(src.rstrip(os.sep)) if args.layout == "folders" else args.layout


def _write(args: argparse.Namespace) -> int:
    src, name = _source(args)
    out = absolute_path(args.out or os.path.join(DEFAULT_ROOT, name))
    where: dict[str, str] = {}
    if args.layout in OWN_LAYOUTS:  # written as "generic" (train with data.dataset=generic), names recorded
        own = scan_own(args.layout, src)
        for line in own.warnings:
            print(f"{PROG}: warning: {line}", file=sys.stderr)
        records, where, dataset = own.records, own.where, "generic"
        extra = {"layout": args.layout, "identities": own.identities, "cameras": own.cameras}
    else:
        records, dataset, extra = scan_layout(args.layout, src), args.layout, {}
    try:
        manifest = write_records(
            records,
            out,
            dataset=dataset,
            skip_corrupt=args.skip_corrupt,
            max_count=args.max_count,
            max_bytes=args.max_bytes,
            seed=args.seed,
            extra=extra,
        )
    except CorruptImageError as exc:
        listed = f" (listed on {where[exc.path]})" if exc.path in where and "line" in where[exc.path] else ""
        raise ValueError(
            f"{exc}{listed}; nothing was written (--skip-corrupt leaves such files out, listed in index.json)"
        ) from exc
    print(_summary(manifest, out))
    if manifest["skipped"]:
        first = manifest["skipped"][0]
        print(
            f'{PROG}: warning: skipped {manifest["num_skipped"]} corrupt image(s), listed under "skipped" in '
            f"{os.path.join(out, 'index.json')}; first: {first['path']} ({first['reason']})",
            file=sys.stderr,
        )
    return 0


def _synth(args: argparse.Namespace) -> int:
    fields = {f: getattr(args, f) for f in SYNTH_FLAGS}
    if args.folder:
        print(f"wrote {write_synthetic_folder(absolute_path(args.folder), SynthSpec(seed=args.seed, **fields))}")
    if not args.no_shards:
        out = write_synthetic_shards(
            absolute_path(args.out or os.path.join(DEFAULT_ROOT, "synthetic")),
            seed=args.seed,
            max_count=args.max_count,
            max_bytes=args.max_bytes,
            **fields,
        )
        print(_summary(read_manifest(out), out))
    return 0


def _verify(args: argparse.Namespace) -> int:
    root = absolute_path(args.root)
    if not is_remote(root):
        folder = local_path(root)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"verify: no such folder: {folder}")
        if not os.path.isfile(os.path.join(folder, MANIFEST)):
            raise FileNotFoundError(f"verify: {folder} holds no {MANIFEST} (not a shard folder)")
    problems = verify(root, IOOptions(s3_endpoint=args.s3_endpoint))
    for line in problems:
        print(line, file=sys.stderr)
    print(f"{root}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 done, 1 ``verify`` found problems, 2 a user error (one line on stderr, naming the culprit)."""
    args = _parser().parse_args(argv)
    run = {"write": _write, "synth": _synth, "verify": _verify}[args.command]
    return run_guarded(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
