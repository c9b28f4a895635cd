"""ZeRO-1/2 optimiser state on another number of ranks: consolidate every rank's files of one engine's
checkpoint, then give each rank of the new world size its own slice (docs/training.md, "Checkpoints").

DeepSpeed's universal-checkpoint converter (``ds_to_universal``) does the same but only knows Adam's
``exp_avg``/``exp_avg_sq`` and fails on SGD momentum; this reads DeepSpeed's file format (its
``param_slice_mappings``) and sets a ZeRO engine's fp32 partitions through its optimiser objects. With
:mod:`dpm_dist.train.engine`, the only module that touches DeepSpeed.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def _zero_rank_files(folder: str) -> list[str]:
    files = [f for f in os.listdir(folder) if f.startswith("zero_pp_rank_") and f.endswith("_optim_states.pt")]
    return [os.path.join(folder, f) for f in sorted(files, key=lambda f: int(f.split("_")[3]))]


def _is_flat(value: Any) -> bool:
    return torch.is_tensor(value) and value.dim() > 0


def consolidate_zero_state(folder: str) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's full flat fp32 weights (``fp32``) and optimiser state (``momentum_buffer``...)
    from the ZeRO-1/2 files of all ranks of one engine's checkpoint, keyed by parameter name.

    Each rank's file holds a contiguous slice of the flattened parameters and, per parameter, the
    slice it owns (``param_slice_mappings``); concatenating the slices in rank order gives the whole
    tensor. (DeepSpeed's universal-checkpoint converter does the same but only knows Adam's state.)
    """
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        OPTIMIZER_STATE_DICT,
        PARAM_SLICE_MAPPINGS,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    files = _zero_rank_files(folder)
    if not files:
        raise FileNotFoundError(f"no ZeRO optimiser files (zero_pp_rank_*_optim_states.pt) in {folder}")
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    scalars: dict[int, dict[str, Any]] = {}
    group_of: dict[str, int] = {}
    for path in files:
        osd = torch.load(path, map_location="cpu", weights_only=False)[OPTIMIZER_STATE_DICT]
        base = osd[BASE_OPTIMIZER_STATE]
        states = base["state"] if isinstance(base, dict) else dict(enumerate(base))
        for group, mapping in enumerate(osd[PARAM_SLICE_MAPPINGS]):
            flat = {"fp32": osd[SINGLE_PARTITION_OF_FP32_GROUPS][group]}
            for key, value in states.get(group, {}).items():  # e.g. SGD's momentum; AdamW's moments and step
                if _is_flat(value):
                    flat[key] = value
                else:
                    scalars.setdefault(group, {})[key] = value  # the same on every rank
            for name, frag in mapping.items():
                group_of[name] = group
                for key, tensor in flat.items():
                    pieces.setdefault(name, {}).setdefault(key, []).append(tensor.narrow(0, frag.start, frag.numel))
    return {
        name: {**{key: torch.cat(parts) for key, parts in by_key.items()}, **scalars.get(group_of[name], {})}
        for name, by_key in pieces.items()
    }


def load_resharded_zero_state(ds_engine: Any, folder: str) -> None:
    """Set a ZeRO-1/2 engine's fp32 partitions and optimiser state from a checkpoint written by any
    number of ranks (:func:`consolidate_zero_state`); every rank takes its own slice."""
    full = consolidate_zero_state(folder)
    zopt = ds_engine.optimizer
    names = {id(p): n for n, p in ds_engine.module.named_parameters()}
    for group, params in enumerate(zopt.bit16_groups):
        flat = zopt.single_partition_of_fp32_groups[group]
        saved = []
        for p in params:
            name = names[id(p)]
            if name not in full or full[name]["fp32"].numel() != p.numel():
                got = "missing" if name not in full else f"{full[name]['fp32'].numel()} values"
                raise RuntimeError(f"checkpoint {folder}: parameter {name!r} ({p.numel()} values) is {got} there")
            saved.append((p, full[name]))
        flat_keys = sorted({k for _, state in saved for k, v in state.items() if k != "fp32" and _is_flat(v)})
        states = {k: torch.zeros_like(flat) for k in flat_keys}
        scalars = {
            k: v.clone() if torch.is_tensor(v) else v for _, state in saved for k, v in state.items() if not _is_flat(v)
        }
        for p, state in saved:
            if p._hp_mapping is None:  # no slice of this parameter lives on this rank
                continue
            lp, hp = p._hp_mapping.lp_fragment_address, p._hp_mapping.hp_fragment_address
            with torch.no_grad():  # the flat fp32 partition is the optimiser's leaf parameter
                for key, dst in [("fp32", flat), *states.items()]:
                    dst.narrow(0, hp.start, hp.numel).copy_(state[key].narrow(0, lp.start, lp.numel))
        if states or scalars:
            zopt.optimizer.state[flat].update({**scalars, **states})
