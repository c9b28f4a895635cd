"""The official-checkpoint converter: an official DPM state dict -> a verified dpm-dist model.

The command is ``dpm-convert`` (:mod:`dpm_dist.cli.convert`). A written file holds ``{"model": state_dict, "meta": {...}}``; :func:`dpm_dist.model.weights.load_dpm_checkpoint`,
``dpm-eval`` and ``dpm-train model.init_checkpoint=...`` read it (they read the official file directly too).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from dpm_dist.model.dpm import DPMNet, create_model
from dpm_dist.model.files import save_model_file
from dpm_dist.model.weights import (
    convert_official_state_dict,
    describe_state_dict,
    is_official_state_dict,
    load_state_dict_checked,
    read_state_dict,
)


def convert_official_checkpoint(
    src: str,
    dst: str | None = None,
    *,
    img_size: Sequence[int] = (256, 128),
    stride: Sequence[int] = (11, 11),
    backbone: str = "vit_base_patch16_224",
    tap_blocks: Sequence[int] = (2, 4, 10, 12),
    num_heads: int | None = None,
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
    check_backbone_shape(src, facts, backbone=backbone, tap_blocks=tap_blocks, num_heads=num_heads)
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
        meta = dict(
            facts,
            img_size=list(img_size),
            stride=list(stride),
            backbone=backbone,
            tap_blocks=list(tap_blocks),
            source=os.path.abspath(src),
        )
        save_model_file(model, dst, meta)
    return model


# timm's ViT sizes: the width and head count each name stands for (vit_<size>_patch..., deit_<size>_...)
_VIT_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12), "large": (1024, 16), "huge": (1280, 16)}


def check_backbone_shape(
    src: str, facts: dict, *, backbone: str, tap_blocks: Sequence[int], num_heads: int | None
) -> None:
    """One ``ValueError`` naming the file and its shape when ``backbone`` / ``tap_blocks`` / ``num_heads`` cannot
    hold the checkpoint's ViT (timm would fail with a bare ``AssertionError``, or build the wrong head count)."""
    dim, depth = facts["embed_dim"], facts["depth"]
    shape = f"{src}: a ViT of width {dim} and depth {depth}"
    size = next((name for name in _VIT_SIZES if f"_{name}_" in f"_{backbone}_"), None)
    if num_heads is None and size is not None and _VIT_SIZES[size][0] != dim:
        fits = [f"vit_{n}_patch16_224" for n, (width, _) in _VIT_SIZES.items() if width == dim]
        hint = f"--backbone {fits[0]}" if fits else "--num-heads H (a divisor of the width)"
        raise ValueError(f"{shape}, but --backbone {backbone} is {_VIT_SIZES[size][0]} wide: pass {hint}")
    heads = num_heads or (_VIT_SIZES[size][1] if size else None)
    if heads is not None and dim % heads:
        raise ValueError(f"{shape}: {heads} attention heads do not divide the width; pass --num-heads H (a divisor)")
    if max(tap_blocks) > depth:
        raise ValueError(
            f"{shape}: --tap-blocks {list(tap_blocks)} names block {max(tap_blocks)}; pass blocks <= {depth}"
        )
    if len(tap_blocks) != facts["num_taps"]:
        raise ValueError(
            f"{shape}: its mask generator reads {facts['num_taps']} blocks but --tap-blocks names {len(tap_blocks)}"
        )
