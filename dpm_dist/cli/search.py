"""``dpm-search``: the top-k gallery images of every query image, from two dpm-embed files.

    dpm-search q.parquet g.parquet                          # top 10 by DPM's masked distance -> search/topk.parquet
    dpm-search q.parquet g.parquet -k 20 --distance cosine --format jsonl --output-dir out
    dpm-search q.parquet g.parquet --pictures 4             # ranked-list pictures (files that record image paths)
    torchrun --nproc-per-node 4 -m dpm_dist.cli.search q.parquet g.parquet   # each rank holds a gallery share

Scoring is the evaluator's (dpm_dist/eval/topk.py on a gallery-sharded GalleryShard): the same lists on
any number of ranks. ``--exclude-same-camera`` applies the evaluation protocol (drops gallery items with
the query's pid and camera), so the lists are dpm-eval's top-k lists.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dpm_dist.cli.common import absolute_path, run_guarded

PROG = "dpm-search"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("query", help="dpm-embed file of the query images")
    parser.add_argument("gallery", help="dpm-embed file of the gallery images")
    parser.add_argument("-k", "--topk", type=int, default=10, help="gallery items per query (default: %(default)s)")
    parser.add_argument("--distance", choices=("masked_cosine", "cosine"), default="masked_cosine")
    parser.add_argument(
        "--feature",
        choices=("before", "after"),
        help="feature before/after the BNNeck (default: the model's test feature, recorded in the files)",
    )
    parser.add_argument(
        "--exclude-same-camera",
        action="store_true",
        help="evaluation protocol: drop gallery items with the query's pid and camera",
    )
    parser.add_argument("--output-dir", default="search", help="where topk.<format> goes (default: %(default)s)")
    parser.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    parser.add_argument("--pictures", type=int, default=0, help="ranked-list pictures of the first N queries")
    parser.add_argument(
        "--query-chunk", type=int, default=256, help="queries scored at once (memory ~ chunk x gallery)"
    )
    args = parser.parse_args(argv)
    return run_guarded(PROG, lambda: run(args))


def run(args: argparse.Namespace) -> int:
    from dpm_dist import dist
    from dpm_dist.deploy.search import describe_lists, search, write_pictures
    from dpm_dist.dist import DistEnv

    env = DistEnv.from_env()
    out_dir = absolute_path(args.output_dir)
    if env.distributed:
        dist.init_process_group(env)
    try:
        path, query, _ = search(
            absolute_path(args.query),
            absolute_path(args.gallery),
            out_dir,
            env,
            k=args.topk,
            distance=args.distance,
            feature=args.feature,
            exclude_junk=args.exclude_same_camera,
            fmt=args.format,
            query_chunk=args.query_chunk,
        )
        if env.is_main:
            assert path is not None  # rank 0 wrote the lists
            written = (
                write_pictures(out_dir, path, query, absolute_path(args.gallery), args.pictures)
                if args.pictures
                else []
            )
            extra = f", {len(written)} pictures in {out_dir}/pictures" if written else ""
            lists = describe_lists(
                path, absolute_path(args.gallery), args.topk, len(query.rows), exclude_junk=args.exclude_same_camera
            )
            print(f"{PROG}: {lists} ({args.distance}) -> {path}{extra}", flush=True)
    finally:
        if env.distributed:
            dist.barrier()
            dist.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
