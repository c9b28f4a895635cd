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


def resume(engine: Any, root: str, env: DistEnv) -> Optional[dict[str, Any]]:
    """Load the newest complete checkpoint into ``engine``; returns its meta or None. Collective.

    On a different world size with ZeRO >= 1 every rank reads the module weights and takes its own
    slice of the consolidated fp32 weights and optimiser state (:func:`dpm_dist.train.engine.load_resharded_zero_state`).
    """
    from dpm_dist.train.engine import load_resharded_zero_state

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
