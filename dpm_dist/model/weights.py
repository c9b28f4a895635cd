"""Loading weights from local files: ImageNet ViT, official DPM checkpoints, and our own exports.

Nothing here downloads anything. Every mismatch is an error that names the key and both shapes.

Official DPM key map (``transformer_150.pth`` and friends; a ``module.`` prefix is stripped first):

=============================================  ===========================================
official key                                   dpm-dist key
=============================================  ===========================================
``base.cls_token`` / ``base.pos_embed``        ``backbone.cls_token`` / ``backbone.pos_embed``
``base.sie_embed``                             ``backbone.sie_embed``
``base.patch_embed.proj.{weight,bias}``        ``backbone.patch_embed.proj.{weight,bias}``
``base.blocks.{i}.*``                          ``backbone.blocks.{i}.*`` (timm names match)
``base.norm.{weight,bias}``                    ``backbone.norm.{weight,bias}``
``base.ConvLayer.{0,2,4}.{0,1}.*``             ``mask_gen.layers.{0,2,4}.{0,1}.*`` (conv, BN)
``base.attfc.{weight,bias}``                   ``mask_gen.fc.{weight,bias}``
``classifier.weight``                          ``classifier.weight`` (the prototypes W)
``bottleneck.*``                               ``bottleneck.*`` (BNNeck)
``base.fc.*``                                  dropped (the unused 1000-way head)
=============================================  ===========================================
"""

from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

_OFFICIAL_RULES: tuple[tuple[str, str | None], ...] = (
    (r"^base\.fc\.", None),
    (r"^base\.ConvLayer\.", "mask_gen.layers."),
    (r"^base\.attfc\.", "mask_gen.fc."),
    (r"^base\.", "backbone."),
    (r"^classifier\.", "classifier."),
    (r"^bottleneck\.", "bottleneck."),
)


_LEGACY_MAGIC = bytes.fromhex("80028a0a6cfc9c46f9206aa85019")  # pickled magic number of pre-zip torch.save files
_DPM_KEYS = (
    "backbone.pos_embed",
    "backbone.patch_embed.proj.weight",
    "classifier.weight",
    "mask_gen.layers.0.0.weight",
)


def load_torch_file(path: str) -> Any:
    """``torch.load(weights_only=True)`` whose failures name the file and what it is not.

    torch's own messages mislead here: garbage bytes give an IndexError or advice about mmap, and a
    file holding Python objects suggests ``weights_only=False`` (which runs arbitrary code).
    """
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder, not a weights file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".npz"):
        raise ValueError(
            f"{path}: Google .npz checkpoints are not supported; use the PyTorch jx_vit_base_p16_224 file or a timm state dict"
        )
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    size = os.path.getsize(path)
    is_zip = head.startswith(b"PK\x03\x04")
    if is_zip and not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: truncated or damaged torch file (a zip archive without its directory, {size} bytes; "
            f"was the copy complete?)"
        )
    if not is_zip and not head.startswith(_LEGACY_MAGIC):
        what = "an empty file" if size == 0 else f"starts with bytes {head[:8].hex(' ')}"
        raise ValueError(f"{path}: not a torch file ({what}; torch.save writes a zip archive)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(err.__context__ or err))
        if found:
            raise ValueError(
                f"{path}: not a state dict: the torch file holds a pickled Python object ({found.group(1)}); "
                f"re-save its tensors with torch.save(model.state_dict(), ...)"
            ) from None
        raise ValueError(f"{path}: damaged torch file (its pickle does not load)") from None
    except (RuntimeError, EOFError) as err:
        reason = re.sub(r"^\[enforce fail at [^\]]*\][ .]*", "", str(err).splitlines()[0])[
            :120
        ]  # drop the C++ source location
        kind = (
            "truncated or damaged torch file"
            if head.startswith(_LEGACY_MAGIC)
            else "a zip archive but not a torch file"
        )
        raise ValueError(f"{path}: {kind} ({reason})") from None


def is_safetensors(path: str) -> bool:
    """``path`` is laid out as a safetensors file: a little-endian u64 header length, then a JSON header."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


def load_safetensors_file(path: str) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file (the format current timm / Hugging Face ViT weights come in), errors naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if not is_safetensors(path):
        size = os.path.getsize(path)
        raise ValueError(f"{path}: not a safetensors file ({'an empty file' if size == 0 else 'no JSON header'})")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: truncated or damaged safetensors file ({str(err).splitlines()[0][:120]})") from None


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a torch file (``torch.save``) or a safetensors file, by content; errors name the file."""
    if path.endswith(".safetensors") or is_safetensors(path):
        return _unwrap_state_dict(load_safetensors_file(path), path)
    return _unwrap_state_dict(load_torch_file(path), path)


def _unwrap_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path}: not a state dict: the torch file holds a {type(obj).__name__}, not a dict of tensors"
        )
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ValueError(
            f"{path}: not a state dict of tensors: key {bad!r} holds a {type(obj[bad]).__name__} "
            f"(keys: {_some(list(obj))})"
        )
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in obj.items()}


def _some(keys: list[str], n: int = 4) -> str:
    return ", ".join(repr(k) for k in keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def resize_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """Resize a (1, 1+h·w, D) position embedding to ``new_grid`` exactly as docs/method.md §1.4 says.

    The class-token slot is kept as is; the grid is resized with bilinear interpolation,
    ``align_corners=False`` and no antialiasing (timm's default is bicubic + antialias: not faithful).
    """
    cls_slot, grid = pos_embed[:, :1], pos_embed[:, 1:]
    if old_grid is None:
        side = math.isqrt(grid.shape[1])
        if side * side != grid.shape[1]:
            raise ValueError(f"pos_embed has {grid.shape[1]} patch slots, not a square grid; pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bilinear", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([cls_slot, grid], dim=1)


def load_state_dict_checked(
    module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, may_be_missing: frozenset[str] = frozenset()
) -> None:
    """Load ``state`` into ``module``; unknown keys, missing keys and shape mismatches are errors naming the key."""
    own = module.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {unknown[:8]}{' ...' if len(unknown) > 8 else ''} (not in the model)"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(
                f"{source}: key {key!r} has shape {tuple(value.shape)} in the file but {tuple(own[key].shape)} in the model"
            )
    missing = sorted(k for k in own if k not in state and k not in may_be_missing)
    if missing:
        raise ValueError(f"{source}: missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    module.load_state_dict(state, strict=False)


def load_imagenet_vit(model: nn.Module, path: str) -> None:
    """Load ImageNet ViT weights (``jx_vit_base_p16_224-80ecf9dd.pth``, or a timm state dict as a torch or a
    ``.safetensors`` file) into ``model.backbone``.

    Keys containing ``head`` or ``dist`` are dropped; a 2-D patch weight is reshaped; ``pos_embed``
    is resized to the model's grid. The HMG, SIE, BNNeck and prototypes keep their initialisation.
    """
    backbone: Any = model.backbone  # a ViTBackbone (patch_embed, grid)
    raw = read_state_dict(path)
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if "head" in key or "dist" in key or key.startswith("fc_norm."):
            continue
        if key == "patch_embed.proj.weight" and value.ndim == 2:
            ph, pw = backbone.patch_embed.proj.kernel_size
            value = value.reshape(value.shape[0], -1, ph, pw)
        if key == "pos_embed":
            value = resize_pos_embed(value, backbone.grid)
        state[key] = value
    load_state_dict_checked(backbone, state, source=path, may_be_missing=frozenset({"sie_embed"}))


def official_key(key: str) -> str | None:
    """dpm-dist name of an official DPM key, or None for keys that are dropped (``base.fc``)."""
    for pattern, replacement in _OFFICIAL_RULES:
        if re.match(pattern, key):
            return None if replacement is None else re.sub(pattern, replacement, key, count=1)
    raise ValueError(f"unknown official DPM key {key!r}")


def is_official_state_dict(state: Mapping[str, Any]) -> bool:
    return any(k.startswith("base.") for k in state)


def convert_official_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official DPM state dict (``base.*``, ``classifier.weight``, ``bottleneck.*``) to ours."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        new = official_key(key)
        if new is not None:
            out[new] = value
    return out


def read_dpm_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state dict in our naming, meta)`` of our model file, a DeepSpeed fp32 export or an official file.

    ``meta`` is our model files' ``meta`` (epoch, results, resolved config; the converter's facts), else {}.
    """
    obj = load_torch_file(path)
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    state = _unwrap_state_dict(obj, path)
    if is_official_state_dict(state):
        state = convert_official_state_dict(state)
    missing = [k for k in _DPM_KEYS if k not in state]
    if missing:
        if "pos_embed" in state and "blocks.0.attn.qkv.weight" in state:
            raise ValueError(f"{path}: an ImageNet ViT state dict, not a DPM model (it is what model.pretrained takes)")
        raise ValueError(f"{path}: not a DPM state dict: no {missing[0]!r} key (keys: {_some(list(state))})")
    return state, dict(meta) if isinstance(meta, Mapping) else {}


def read_dpm_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A DPM state dict in our naming from our export, a DeepSpeed fp32 export or an official file."""
    return read_dpm_file(path)[0]


def load_dpm_checkpoint(model: nn.Module, path: str) -> None:
    """Load a complete DPM model (ours or an official checkpoint) strictly: every key, every shape."""
    load_state_dict_checked(model, read_dpm_state_dict(path), source=path)


def describe_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Shape facts of a DPM state dict in our naming (for the converter and error messages)."""
    pos = state["backbone.pos_embed"]
    sie = state.get("backbone.sie_embed")
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("backbone.blocks.")}
    return {
        "embed_dim": int(pos.shape[-1]),
        "num_tokens": int(pos.shape[1]),
        "num_classes": int(state["classifier.weight"].shape[0]),
        "num_cams": int(sie.shape[0]) if sie is not None else 0,
        "depth": len(blocks),
        "patch_size": int(state["backbone.patch_embed.proj.weight"].shape[-1]),
        "num_taps": int(state["mask_gen.layers.0.0.weight"].shape[1]) // int(pos.shape[-1]),
    }


def backbone_start(model_cfg: Any) -> tuple[str, str | None]:
    """What the backbone starts from, for the start-up summary, and a warning when that is a full-size timm ViT
    (the paper presets' ViT-B: no ``embed_dim``/``depth`` override) from random weights: the paper's results need
    ImageNet weights, and nothing else would say that a long run is starting from scratch."""
    if model_cfg.pretrained:
        return f"ImageNet weights from {model_cfg.pretrained}", None
    line = "random initialisation (model.pretrained not set)"
    if model_cfg.embed_dim is None and model_cfg.depth is None:
        return line, (
            f"model.pretrained is not set: the {model_cfg.backbone} backbone starts from random weights; the paper's "
            f"presets need ImageNet weights (model.pretrained=/path/to/jx_vit_base_p16_224-80ecf9dd.pth or .safetensors)"
        )
    return line, None
