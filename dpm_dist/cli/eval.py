"""``dpm-eval``: evaluate a checkpoint on the query/gallery shards, on one or many ranks, with the same numbers.

    dpm-eval --checkpoint runs/tiny_synthetic/model_final.pt                     # our export; its config is inside
    dpm-eval --checkpoint occluded_duke_dpm.pt experiment=occluded_duke data.root=/data/shards/occluded_duke
    dpm-eval --checkpoint transformer_150.pth experiment=occluded_duke data.root=...   # an official file, directly
    torchrun --nproc-per-node 4 -m dpm_dist.cli.eval --checkpoint ... [Hydra overrides]

Everything after the flags is a Hydra override of ``configs/train.yaml`` (``eval.distance=cosine``,
``eval.rerank=true``, ``eval.num_pictures=8``, ...). The model architecture comes from the checkpoint when
it carries one (``meta.config.model`` of our exports, the converter's ``meta``), otherwise from the
composed ``model`` group; class and camera counts always come from the weights.

Writes to ``--output-dir`` (default ``<log.output_dir>/eval``) on rank 0: ``results.json``, TensorBoard
scalars ``eval/*`` under ``tb/``, and ``pictures/``: per chosen query a ranked list, the last block's
head cross-correlation and the mask, plus the head cross-correlation averaged over those queries.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from dpm_dist import dist
from dpm_dist.cli.common import compose_config
from dpm_dist.dist import DistEnv


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dpm-eval", description=__doc__.split("\n\n")[0],
                                     epilog="Remaining arguments are Hydra overrides, e.g. experiment=occluded_duke eval.rerank=true")
    parser.add_argument("--checkpoint", required=True, help="our model file (.pt) or an official DPM state dict (.pth)")
    parser.add_argument("--output-dir", help="default: <log.output_dir>/eval")
    args, overrides = parser.parse_known_args(argv)
    cfg = compose_config(overrides)
    env = DistEnv.from_env()
    dist.init_process_group(env)
    try:
        from dpm_dist.eval.run import run_eval

        result = run_eval(cfg, args.checkpoint, env, output_dir=args.output_dir)
        if env.is_main:
            print(json.dumps({"metrics": result["metrics"], "output_dir": os.path.abspath(args.output_dir or os.path.join(cfg.log.output_dir, "eval"))}), flush=True)
    finally:
        dist.barrier()
        dist.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
