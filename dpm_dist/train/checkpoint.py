"""Full-state, crash-safe checkpoints of the engine; resume on the same or another number of ranks.

The engine writes and reads its own files (``main/``, ``mask/``, ``head/``: :meth:`DPMEngine.save` and
:meth:`DPMEngine.load`, which reshard on another world size); this module owns the folder around them: RNG
states and loss scales, meta, the manifest, the ``latest``/``best`` pointers, verification and pruning.

Layout under ``<output_dir>/checkpoints``::

    epoch_0003/main/...        DeepSpeed files of the main engine (every rank writes its ZeRO shard)
    epoch_0003/mask/...        DeepSpeed files of the HMG engine
    epoch_0003/rng/rank_<r>.pt per-rank RNG states (python, numpy, torch, cuda) and fp16 loss scalers
    epoch_0003/head/rank_<r>.pt model.classifier=sharded: each rank's prototype rows and their optimiser state
    epoch_0003/meta.json       epoch, step, world size, ZeRO stage, best metric, results, resolved config
    epoch_0003/manifest.json   every file above with its size and sha256, written last (after an fsync of each)
    step_0004_000001/...       a step checkpoint inside epoch 4, after its step 1 (``log.checkpoint_every_steps``, or
                               a stop signal): the same files; meta.json adds the position in the epoch
    latest                     name of the newest checkpoint whose manifest was written, replaced atomically last
    best                       name of the checkpoint with the best eval metric (kept by keep-last-N)

Checkpoints are ordered by (epoch, step in it): ``step_0004_000001`` comes after ``epoch_0003`` and before
``epoch_0004``. ``log.keep_last`` epoch checkpoints and ``log.keep_last_steps`` step checkpoints are kept; a step
checkpoint older than the newest epoch checkpoint is removed (it holds nothing that one does not).

A folder is a checkpoint only once its manifest is written: a crash during a save leaves ``latest``
pointing at the previous one and a folder without a manifest, which resuming reports and skips and the
next save removes. Resuming verifies the newest folder's manifest (every file present, of its size and
hash) and falls back to the previous checkpoint with a warning naming what failed (:func:`find_resumable`).
A save that fails (a full disk, a permission error) raises :class:`CheckpointSaveError` naming the
folder and the free space, and leaves ``latest`` as it was. The hashing is shared out over the ranks.
Every function here that touches the engines or verifies is collective: all ranks call it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from typing import Any

import numpy as np
import torch

from dpm_dist import dist
from dpm_dist.data.shards import file_sha256
from dpm_dist.dist import DistEnv
from dpm_dist.fsio import write_text_atomic
from dpm_dist.model.files import describe_write_failure, is_write_failure

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 2  # meta.json's checkpoint_format; folders written before manifests existed have none
_NO_MANIFEST = f"no {MANIFEST} (its save did not finish)"


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the previous one is intact and still ``latest``."""


def tag_for(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def step_tag(epoch: int, epoch_step: int) -> str:
    """The tag of a step checkpoint: inside ``epoch``, after its step ``epoch_step`` (1-based)."""
    return f"step_{epoch:04d}_{epoch_step:06d}"


def tag_key(tag: str) -> tuple[int, float] | None:
    """The place of a checkpoint tag in the run, (epoch, step in it; an epoch checkpoint last), or None."""
    kind, _, rest = tag.partition("_")
    try:
        if kind == "epoch":
            return int(rest), float("inf")
        if kind == "step":
            epoch, _, step = rest.partition("_")
            return int(epoch), int(step)
    except ValueError:
        return None
    return None


def describe(meta: dict[str, Any], epochs: int) -> str:
    """A checkpoint for messages: ``epoch_0015 (epoch 15 of 40)``, ``step_0016_000001 (epoch 16, step 1 of 2)``."""
    if meta.get("epoch_step"):
        return f"{meta['tag']} (epoch {meta['epoch']}, step {meta['epoch_step']} of {meta['epoch_steps']})"
    return f"{meta['tag']} (epoch {meta['epoch']} of {epochs})"


def _read_pointer(root: str, name: str) -> str | None:
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    return tag if tag and _has_manifest(os.path.join(root, tag)) else None


def _has_manifest(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST)) and os.path.isfile(os.path.join(folder, "meta.json"))


# ---- manifests: written last, verified on resume; the hashing is shared out over the ranks ----------------


def _share(sizes: dict[str, int], env: DistEnv, holders: dict[str, list[int]] | None = None) -> list[str]:
    """This rank's files: the largest first, each to the least loaded rank that holds it (all by default);
    the same answer on every rank."""
    load, mine = [0] * env.world_size, []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        owner = min(holders[name] if holders else range(env.world_size), key=lambda r: (load[r], r))
        load[owner] += sizes[name]
        if owner == env.rank:
            mine.append(name)
    return mine


def _files_under(folder: str) -> dict[str, int]:
    out = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            rel = os.path.relpath(path, folder)
            if rel != MANIFEST:
                out[rel] = os.path.getsize(path)
    return out


def write_manifest(folder: str, env: DistEnv) -> dict[str, Any]:
    """Hash (and fsync) every file of ``folder`` with the ranks sharing the work; rank 0 writes the manifest.

    Each rank hashes files it sees: on a shared file system any rank, on folders of their own (Ray Tune's
    workers, whose files Ray merges into one checkpoint) the rank that wrote the file. Collective.
    """
    dist.barrier()  # every rank's files are written (rank 0's meta.json too) before any rank lists the folder
    sizes: dict[str, int] = {}
    holders: dict[str, list[int]] = {}
    for rank, seen in enumerate(dist.all_gather_objects(_files_under(folder))):
        for name, size in seen.items():
            sizes.setdefault(name, size)
            holders.setdefault(name, []).append(rank)
    mine = {
        name: {"size": sizes[name], "sha256": file_sha256(os.path.join(folder, name), sync=True)}
        for name in _share(sizes, env, holders)
    }
    files = {k: v for part in dist.all_gather_objects(mine) for k, v in part.items()}
    manifest = {"format": 1, "algorithm": "sha256", "files": dict(sorted(files.items()))}
    if env.is_main:
        write_text_atomic(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1))
    return manifest


def _read_manifest(folder: str) -> tuple[dict[str, Any] | None, str]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None, _NO_MANIFEST
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and {"size", "sha256"} <= v.keys() for v in files.values()
        ):
            raise ValueError("no list of files with sizes and hashes")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"{MANIFEST} is unreadable ({err})"
    return manifest, ""


def _check_file(folder: str, name: str, want: dict[str, Any]) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return f"{name} is missing"
    size = os.path.getsize(path)
    if size != want["size"]:
        return f"{name} has {size} bytes, the manifest says {want['size']}"
    if file_sha256(path) != want["sha256"]:
        return f"{name} does not match its sha256 (damaged)"
    return ""


def verify(folder: str, env: DistEnv) -> list[str]:
    """What is wrong with the checkpoint ``folder`` ([] when its manifest verifies), the same on every rank. Collective."""
    manifest, problem = _read_manifest(folder) if env.is_main else (None, "")
    manifest, problem = dist.broadcast_object((manifest, problem))
    if manifest is None:
        return [problem]
    files = manifest["files"]
    mine = [
        p
        for p in (_check_file(folder, n, files[n]) for n in _share({n: v["size"] for n, v in files.items()}, env))
        if p
    ]
    return sorted(p for part in dist.all_gather_objects(mine) for p in part)


def _checkpoint_folders(root: str) -> list[str]:
    """Epoch and step checkpoint folders under ``root``, the newest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if tag_key(t) is not None and os.path.isdir(os.path.join(root, t))]
    return sorted(tags, key=lambda t: tag_key(t) or (0, 0), reverse=True)


def find_resumable(root: str, env: DistEnv) -> dict[str, Any] | None:
    """Meta of the newest checkpoint under ``root`` whose manifest verifies, or None when there is none yet.

    A newer folder that fails verification (a truncated, damaged or missing file, or no manifest: a save
    that did not finish) is named in a warning and the previous checkpoint is used; when folders exist but
    none verifies, ``ValueError`` lists what was found. Collective: every rank gets the same answer.
    """
    failed: list[str] = []
    for tag in _checkpoint_folders(root):
        folder = os.path.join(root, tag)
        problems = verify(folder, env)
        legacy = problems == [_NO_MANIFEST] and dist.broadcast_object(_legacy_meta(root, tag) if env.is_main else None)
        if not problems or legacy:
            with open(os.path.join(folder, "meta.json")) as f:
                meta = json.load(f)
            if failed and env.is_main:
                log.warning(
                    "skipping %s; resuming from %s, the newest checkpoint that verifies", "; ".join(failed), tag
                )
            if legacy and env.is_main:
                log.warning("%s was written before checkpoints had manifests: resuming from it unverified", tag)
            return meta
        failed.append(f"{tag}: {', '.join(problems[:3])}{f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''}")
    if failed:
        raise ValueError(
            f"no checkpoint in {root} verifies ({'; '.join(failed)}); move the folder away (or set a new "
            "log.output_dir) to start over"
        )
    return None


def _legacy_meta(root: str, tag: str) -> bool:
    """``tag`` is a complete checkpoint of the format before manifests: ``latest`` names it and its meta.json has
    no ``checkpoint_format`` (a save of this format moves ``latest`` only after the manifest, so a folder of it
    without one is never named there)."""
    pointer = os.path.join(root, "latest")
    try:
        with open(pointer) as f, open(os.path.join(root, tag, "meta.json")) as m:
            return f.read().strip() == tag and "checkpoint_format" not in json.load(m)
    except (OSError, ValueError):
        return False


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


def save(
    engine: Any,
    root: str,
    *,
    epoch: int,
    step: int,
    env: DistEnv,
    meta: dict[str, Any],
    keep_last: int,
    is_best: bool,
    keep_last_steps: int = 2,
) -> str:
    """Save the engine (:meth:`DPMEngine.save`), RNG and ``meta`` as ``epoch_XXXX``, or as the step checkpoint
    ``step_XXXX_YYYYYY`` when ``meta`` holds a position inside the epoch (``epoch_step``); then move ``latest`` (and
    ``best``) and prune. Collective."""
    tag = step_tag(epoch, meta["epoch_step"]) if meta.get("epoch_step") else tag_for(epoch)
    folder = os.path.join(root, tag)
    if env.is_main and os.path.isdir(folder):
        shutil.rmtree(folder)  # a partial folder from a crashed save of the same epoch
    dist.barrier()
    try:
        engine.save(folder)  # the DeepSpeed engines' files and the head's; every rank its own shards
        os.makedirs(os.path.join(folder, "rng"), exist_ok=True)
        torch.save(
            {"rng": rng_state(), "scalers": engine.scaler_state()}, os.path.join(folder, "rng", f"rank_{env.rank}.pt")
        )
        dist.barrier()  # every rank's shards are on disk before the checkpoint is declared complete
        if env.is_main:
            full_meta = dict(meta, epoch=epoch, step=step, world_size=env.world_size, tag=tag, checkpoint_format=FORMAT)
            write_text_atomic(os.path.join(folder, "meta.json"), json.dumps(full_meta, indent=2, default=str))
        write_manifest(folder, env)  # collective; the folder is a checkpoint from here on
    except Exception as err:
        if not is_write_failure(err):
            raise
        why, previous = describe_write_failure(err, folder), _read_pointer(root, "latest")
        if env.is_main:
            shutil.rmtree(folder, ignore_errors=True)  # never half a checkpoint, and its space back
        kept = f"{previous} is intact and still the latest" if previous else "there is no earlier checkpoint"
        raise CheckpointSaveError(
            f"saving checkpoint {folder} failed: {why}; {kept}; free space and re-run the same command to resume"
        ) from err
    if env.is_main:
        write_text_atomic(os.path.join(root, "latest"), tag)
        if is_best:
            write_text_atomic(os.path.join(root, "best"), tag)
        _prune(root, keep_last, keep_last_steps)
    dist.barrier()
    return folder


def _prune(root: str, keep_last: int, keep_last_steps: int = 2) -> None:
    """Keep the newest ``keep_last`` epoch and ``keep_last_steps`` step checkpoints, ``best`` and ``latest``; a step
    checkpoint older than the newest epoch checkpoint goes (and any unfinished folder)."""
    tags = _checkpoint_folders(root)[::-1]  # oldest first
    complete = [t for t in tags if _has_manifest(os.path.join(root, t))]
    epochs = [t for t in complete if t.startswith("epoch_")]
    newest_epoch = tag_key(epochs[-1]) if epochs else None
    steps = [t for t in complete if t.startswith("step_") and (tag_key(t) or (0, 0)) > (newest_epoch or (0, 0))]
    keep: set[str | None] = {*epochs[-keep_last:], *steps[-keep_last_steps:]}
    keep |= {_read_pointer(root, "best"), _read_pointer(root, "latest")}
    for tag in tags:
        if tag not in keep:
            shutil.rmtree(os.path.join(root, tag), ignore_errors=True)


def latest_meta(root: str) -> dict[str, Any] | None:
    """Meta of the checkpoint ``latest`` names, or None; not verified (for messages: :func:`find_resumable` resumes)."""
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
    "name",
    "optim.epochs",
    "optim.fused",
    "data.root",
    "data.roots",
    "data.eval_root",
    "data.train_urls",
    "data.query_urls",
    "data.gallery_urls",
    "data.cache_dir",
    "data.s3_endpoint",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "data.eval_batch_size",
    "data.verify_sha",
    "data.skip_corrupt",
    "data.io_retries",
    "data.io_backoff_s",
    "data.io_timeout_s",
    "engine.deterministic",
    "engine.compile",
    "engine.compile_backend",
    "engine.collective_timeout_s",
    "engine.max_nonfinite_steps",
    "eval",
    "log",
    "search",
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
        raise ValueError(
            f"config field `log.allow_config_change`: not a config field: {', '.join(map(repr, unknown))} "
            "(expected dotted keys such as loss.alpha)"
        )
    diff = {
        k: [old.get(k, _ABSENT), new.get(k, _ABSENT)]
        for k in sorted(set(old) | set(new))
        if old.get(k, _ABSENT) != new.get(k, _ABSENT)
    }
    refused = [k for k in diff if not _covered(k, RESUME_MAY_CHANGE) and not _covered(k, allow)]
    if refused:
        listed = "; ".join(f"{k}: {diff[k][0]!r} in the checkpoint, {diff[k][1]!r} now" for k in refused)
        raise ValueError(
            f"log.output_dir {current['log']['output_dir']} holds a run trained with another configuration "
            f"({listed}); use a new log.output_dir for a new run, or resume with exactly this change "
            f"recorded: log.allow_config_change=[{','.join(refused)}]"
        )
    return {k: v for k, v in diff.items() if not _covered(k, ("log",))}


def resume(engine: Any, root: str, env: DistEnv, meta: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Load the checkpoint ``meta`` describes (default: :func:`find_resumable`) into ``engine``; returns its meta
    or None. Collective.

    The engine reads its own files (:meth:`DPMEngine.load`: on another world size it reshards the ZeRO state and the
    prototype head); this restores the fp16 loss scale and, on the same world size, every rank's RNG states.
    """
    meta = find_resumable(root, env) if meta is None else dict(meta)
    if meta is None:
        return None
    folder = os.path.join(root, meta["tag"])
    engine.load(folder, meta["world_size"])
    same_world = meta["world_size"] == env.world_size
    rank_file = os.path.join(folder, "rng", f"rank_{env.rank if same_world else 0}.pt")
    state = torch.load(rank_file, weights_only=False) if os.path.isfile(rank_file) else {}
    engine.load_scaler_state(state.get("scalers", {}))  # the loss scale is the same on every rank
    meta["rng_restored"] = same_world and "rng" in state
    if meta["rng_restored"]:  # the run continues exactly as if it had never stopped
        set_rng_state(state["rng"])
    return meta
