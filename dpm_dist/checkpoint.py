"""Full-state, crash-safe checkpoints of both engines; resume on the same or another number of ranks.

Layout under ``<output_dir>/checkpoints``::

    epoch_0003/main/...        DeepSpeed files of the main engine (every rank writes its ZeRO shard)
    epoch_0003/mask/...        DeepSpeed files of the HMG engine
    epoch_0003/rng/rank_<r>.pt per-rank RNG states (python, numpy, torch, cuda) and fp16 loss scalers
    epoch_0003/meta.json       epoch, step, world size, ZeRO stage, best metric, results, resolved config
    latest                     name of the newest *complete* checkpoint, replaced atomically last
    best                       name of the checkpoint with the best eval metric (kept by keep-last-N)

A crash during a save leaves ``latest`` pointing at the previous complete checkpoint; the partial
folder is ignored and removed by the next successful save. Every function here that touches the
engines is collective: all ranks call it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch

from dpm_dist import dist
from dpm_dist.dist import DistEnv


def tag_for(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_pointer(root: str, name: str) -> Optional[str]:
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    return tag if tag and os.path.isfile(os.path.join(root, tag, "meta.json")) else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine: Any, root: str, *, epoch: int, step: int, env: DistEnv, meta: dict[str, Any], keep_last: int,
         is_best: bool) -> str:
    """Save both engines, RNG and ``meta`` as ``epoch_XXXX``; then move ``latest`` (and ``best``). Collective."""
    tag = tag_for(epoch)
    folder = os.path.join(root, tag)
    if env.is_main and os.path.isdir(folder):
        shutil.rmtree(folder)  # a partial folder from a crashed save of the same epoch
    dist.barrier()
    for name, ds_engine in engine.modules():
        ds_engine.save_checkpoint(folder, tag=name, save_latest=False)
    os.makedirs(os.path.join(folder, "rng"), exist_ok=True)
    torch.save({"rng": rng_state(), "scalers": engine.scaler_state()}, os.path.join(folder, "rng", f"rank_{env.rank}.pt"))
    dist.barrier()  # every rank's shards are on disk before the checkpoint is declared complete
    if env.is_main:
        full_meta = dict(meta, epoch=epoch, step=step, world_size=env.world_size, tag=tag)
        _write_atomic(os.path.join(folder, "meta.json"), json.dumps(full_meta, indent=2, default=str))
        _write_atomic(os.path.join(root, "latest"), tag)
        if is_best:
            _write_atomic(os.path.join(root, "best"), tag)
        _prune(root, keep_last)
    dist.barrier()
    return folder


def _prune(root: str, keep_last: int) -> None:
    tags = sorted(t for t in os.listdir(root) if t.startswith("epoch_") and os.path.isdir(os.path.join(root, t)))
    complete = [t for t in tags if os.path.isfile(os.path.join(root, t, "meta.json"))]
    keep = set(complete[-keep_last:]) | {_read_pointer(root, "best"), _read_pointer(root, "latest")}
    for tag in tags:
        if tag not in keep:
            shutil.rmtree(os.path.join(root, tag), ignore_errors=True)


def latest_meta(root: str) -> Optional[dict[str, Any]]:
    """Meta of the newest complete checkpoint under ``root``, or None."""
    tag = _read_pointer(root, "latest")
    if tag is None:
        return None
    with open(os.path.join(root, tag, "meta.json")) as f:
        return json.load(f)


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
    from deepspeed.checkpoint.constants import (BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT, PARAM_SLICE_MAPPINGS,
                                                SINGLE_PARTITION_OF_FP32_GROUPS)

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
    return {name: {**{key: torch.cat(parts) for key, parts in by_key.items()}, **scalars.get(group_of[name], {})}
            for name, by_key in pieces.items()}


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
        scalars = {k: v.clone() if torch.is_tensor(v) else v for _, state in saved for k, v in state.items() if not _is_flat(v)}
        for p, state in saved:
            if p._hp_mapping is None:  # no slice of this parameter lives on this rank
                continue
            lp, hp = p._hp_mapping.lp_fragment_address, p._hp_mapping.hp_fragment_address
            with torch.no_grad():  # the flat fp32 partition is the optimiser's leaf parameter
                for key, dst in [("fp32", flat), *states.items()]:
                    dst.narrow(0, hp.start, hp.numel).copy_(state[key].narrow(0, lp.start, lp.numel))
        if states or scalars:
            zopt.optimizer.state[flat].update({**scalars, **states})


def resume(engine: Any, root: str, env: DistEnv) -> Optional[dict[str, Any]]:
    """Load the newest complete checkpoint into ``engine``; returns its meta or None. Collective.

    On a different world size with ZeRO >= 1 every rank reads the module weights and takes its own
    slice of the consolidated fp32 weights and optimiser state (:func:`load_resharded_zero_state`).
    """
    meta = latest_meta(root)
    if meta is None:
        return None
    folder = os.path.join(root, meta["tag"])
    reshard = meta["world_size"] != env.world_size and engine.cfg.engine.zero_stage > 0
    if reshard and env.is_main:
        print(f"resharding the ZeRO-{engine.cfg.engine.zero_stage} optimiser state of {meta['tag']} from "
              f"{meta['world_size']} to {env.world_size} ranks", flush=True)
    for name, ds_engine in engine.modules():
        # Another world size: the module weights as saved, then each rank's slice of the whole state.
        path, _ = ds_engine.load_checkpoint(folder, tag=name, load_module_only=reshard, load_optimizer_states=not reshard,
                                            load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"checkpoint {folder}/{name} could not be loaded")
        if reshard:
            load_resharded_zero_state(ds_engine, os.path.join(folder, name))
    same_world = meta["world_size"] == env.world_size
    rank_file = os.path.join(folder, "rng", f"rank_{env.rank if same_world else 0}.pt")
    state = torch.load(rank_file, weights_only=False) if os.path.isfile(rank_file) else {}
    engine.load_scaler_state(state.get("scalers", {}))  # the loss scale is the same on every rank
    meta["rng_restored"] = same_world and "rng" in state
    if meta["rng_restored"]:  # the run continues exactly as if it had never stopped
        set_rng_state(state["rng"])
    return meta
