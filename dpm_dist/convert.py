"""``dpm-convert``: turn an official DPM checkpoint into a dpm-dist model file, verifying every tensor.

    dpm-convert transformer_150.pth occluded_duke_dpm.pt --stride 11 11
    dpm-convert market_dpm.pth market_dpm.pt --stride 12 12

The output holds ``{"model": state_dict, "meta": {...}}``; :func:`dpm_dist.weights.load_dpm_checkpoint`,
``dpm-eval`` and ``dpm-train model.init_checkpoint=...`` read it (they read the official file directly too).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Optional, Sequence

import torch

from dpm_dist.model import DPMNet, create_model
from dpm_dist.weights import (
    convert_official_state_dict,
    describe_state_dict,
    is_official_state_dict,
    load_state_dict_checked,
    read_state_dict,
)


def convert_official_checkpoint(
    src: str,
    dst: Optional[str] = None,
    *,
    img_size: Sequence[int] = (256, 128),
    stride: Sequence[int] = (11, 11),
    backbone: str = "vit_base_patch16_224",
    tap_blocks: Sequence[int] = (2, 4, 10, 12),
    num_heads: Optional[int] = None,
) -> DPMNet:
    """Convert ``src`` (official naming), load it strictly into a freshly built model, optionally save it.

    Raises ValueError naming the key and both shapes on any mismatch, and names the stride when the
    position embedding's token count does not fit ``img_size``/``stride``.
    """
    raw = read_state_dict(src)
    if not is_official_state_dict(raw):
        raise ValueError(f"{src}: no 'base.*' keys; this is not an official DPM checkpoint")
    state = convert_official_state_dict(raw)
    facts = describe_state_dict(state)
    patch = facts["patch_size"]
    grid = [(int(img_size[i]) - patch) // int(stride[i]) + 1 for i in range(2)]
    if grid[0] * grid[1] + 1 != facts["num_tokens"]:
        raise ValueError(
            f"{src}: pos_embed has {facts['num_tokens']} tokens but img_size {list(img_size)} with stride {list(stride)} "
            f"gives {grid[0]}x{grid[1]}+1 = {grid[0] * grid[1] + 1}; pass the stride the checkpoint was trained with (--stride)"
        )
    model = create_model(
        backbone=backbone,
        num_classes=facts["num_classes"],
        num_cams=facts["num_cams"],
        img_size=img_size,
        stride=stride,
        patch_size=patch,
        tap_blocks=tap_blocks,
        embed_dim=facts["embed_dim"],
        depth=facts["depth"],
        num_heads=num_heads,
        sie=facts["num_cams"] > 1,
    )
    load_state_dict_checked(model, state, source=src)
    if dst is not None:
        meta = dict(facts, img_size=list(img_size), stride=list(stride), backbone=backbone, tap_blocks=list(tap_blocks), source=os.path.abspath(src))
        save_model_file(model, dst, meta)
    return model


def save_model_file(model: torch.nn.Module, dst: str, meta: dict) -> None:
    """Write ``{"model": fp32 state dict, "meta": meta}`` atomically (temp file + rename)."""
    folder = os.path.dirname(os.path.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save({"model": state, "meta": meta}, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dpm-convert", description="Convert an official DPM checkpoint to a dpm-dist model file.")
    parser.add_argument("src", help="official state dict, e.g. transformer_150.pth")
    parser.add_argument("dst", help="output file (.pt)")
    parser.add_argument("--stride", type=int, nargs=2, default=[11, 11], metavar=("SY", "SX"), help="11 11 for Occluded-Duke, 12 12 for Market/Duke")
    parser.add_argument("--img-size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"))
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--tap-blocks", type=int, nargs="+", default=[2, 4, 10, 12])
    args = parser.parse_args(argv)
    model = convert_official_checkpoint(
        args.src, args.dst, img_size=args.img_size, stride=args.stride, backbone=args.backbone, tap_blocks=args.tap_blocks
    )
    facts = describe_state_dict(model.state_dict())
    facts["parameters"] = sum(p.numel() for p in model.parameters())
    print(json.dumps({"written": args.dst, **facts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
