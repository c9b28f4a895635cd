"""``dpm-convert``: turn an official DPM checkpoint into a dpm-dist model file, verifying every tensor.

dpm-convert transformer_150.pth occluded_duke_dpm.pt --stride 11 11
dpm-convert market_dpm.pth market_dpm.pt --stride 12 12
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from dpm_dist.cli.common import absolute_path, run_guarded
from dpm_dist.model.convert import convert_official_checkpoint
from dpm_dist.model.weights import describe_state_dict

PROG = "dpm-convert"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Convert an official DPM checkpoint to a dpm-dist model file."
    )
    parser.add_argument("src", help="official state dict, e.g. transformer_150.pth")
    parser.add_argument("dst", help="output file (.pt)")
    parser.add_argument(
        "--stride",
        type=int,
        nargs=2,
        default=[11, 11],
        metavar=("SY", "SX"),
        help="11 11 for Occluded-Duke, 12 12 for Market/Duke",
    )
    parser.add_argument("--img-size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"))
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--tap-blocks", type=int, nargs="+", default=[2, 4, 10, 12])
    parser.add_argument(
        "--num-heads", type=int, default=None, help="attention heads (default: the --backbone's; for other widths)"
    )
    args = parser.parse_args(argv)
    return run_guarded(PROG, lambda: convert(args))


def convert(args: argparse.Namespace) -> int:
    src, dst = absolute_path(args.src), absolute_path(args.dst)
    if os.path.isdir(dst):
        raise IsADirectoryError(f"{dst}: is a folder; give the output file's name (e.g. {os.path.join(dst, 'dpm.pt')})")
    model = convert_official_checkpoint(
        src,
        dst,
        img_size=args.img_size,
        stride=args.stride,
        backbone=args.backbone,
        tap_blocks=args.tap_blocks,
        num_heads=args.num_heads,
    )
    facts = describe_state_dict(model.state_dict())
    facts["parameters"] = sum(p.numel() for p in model.parameters())
    print(json.dumps({"written": dst, **facts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
