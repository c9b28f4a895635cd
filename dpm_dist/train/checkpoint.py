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


# ---- resuming with the configuration of the checkpoint ------------------------------------------------------

# The one allow-list: config fields (dotted keys; a section covers its fields) that may differ between a
# checkpoint and the run resuming it. The length of the run, where the data lives and how it is read,
# execution knobs that keep the update, evaluation, logging and the search. Anything else changes what
# the weights were trained with, and needs `log.allow_config_change=[field, ...]` (recorded in the run).
RESUME_MAY_CHANGE = (
    "name", "optim.epochs", "optim.fused",
    "data.root", "data.eval_root", "data.train_urls", "data.query_urls", "data.gallery_urls", "data.cache_dir",
    "data.s3_endpoint", "data.num_workers", "data.pin_memory", "data.eval_batch_size", "data.verify_sha",
    "data.skip_corrupt", "data.io_retries", "data.io_backoff_s", "data.io_timeout_s",
    "engine.deterministic", "engine.compile", "engine.compile_backend", "engine.collective_timeout_s", "engine.collective_timeout_s",
    "eval", "log", "search",
)
_ABSENT = "(absent)"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _covered(key: str, fields: Any) -> bool:
    return any(key == f or key.startswith(f + ".") for f in fields)


def _schema_defaults() -> dict[str, Any]:
    from omegaconf import OmegaConf

    from dpm_dist.config import DPMConfig

    return flatten(OmegaConf.to_container(OmegaConf.structured(DPMConfig), resolve=True))


def config_changes(saved: dict[str, Any], current: dict[str, Any], allow: Any = ()) -> dict[str, list[Any]]:
    """The fields in which ``current`` differs from the checkpoint's ``saved`` config: ``{key: [old, new]}``.

    A field the checkpoint predates counts as unchanged at its default (new options default to the old
    behaviour). Raises ``ValueError`` listing every difference outside :data:`RESUME_MAY_CHANGE` and
    ``allow`` (``log.allow_config_change``), with both values and how to proceed.
    """
    old, new, defaults = flatten(saved), flatten(current), _schema_defaults()
    old.update({k: v for k, v in new.items() if k not in old and k in defaults and defaults[k] == v})
    unknown = [f for f in allow if not any(_covered(k, [f]) for k in new)]
    if unknown:
        raise ValueError(f"config field `log.allow_config_change`: not a config field: {', '.join(map(repr, unknown))} "
                         "(expected dotted keys such as loss.alpha)")
    diff = {k: [old.get(k, _ABSENT), new.get(k, _ABSENT)] for k in sorted(set(old) | set(new))
            if old.get(k, _ABSENT) != new.get(k, _ABSENT)}
    refused = [k for k in diff if not _covered(k, RESUME_MAY_CHANGE) and not _covered(k, allow)]
    if refused:
        listed = "; ".join(f"{k}: {diff[k][0]!r} in the checkpoint, {diff[k][1]!r} now" for k in refused)
        raise ValueError(f"log.output_dir {current['log']['output_dir']} holds a run trained with another configuration "
                         f"({listed}); use a new log.output_dir for a new run, or resume with exactly this change "
                         f"recorded: log.allow_config_change=[{','.join(refused)}]")
    return {k: v for k, v in diff.items() if not _covered(k, ("log",))}


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
