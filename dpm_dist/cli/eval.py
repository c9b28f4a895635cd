"""``dpm-eval``: evaluate a checkpoint on the query/gallery shards, on one or many ranks, with the same numbers.

    dpm-eval --checkpoint runs/tiny_synthetic                                    # a run folder: model_best.pt, else model_final.pt
    dpm-eval --checkpoint runs/tiny_synthetic/model_final.pt                     # our model file: its config is inside
    dpm-eval --checkpoint occluded_duke_dpm.pt experiment=occluded_duke data.root=/data/shards/occluded_duke
    dpm-eval --checkpoint transformer_150.pth experiment=occluded_duke data.root=...   # an official file, directly
    torchrun --nproc-per-node 4 -m dpm_dist.cli.eval --checkpoint ... [Hydra overrides]
    dpm-eval --checkpoint runs/market_duke_msmt17_dpm                            # data.roots: each dataset on its own, a table

Everything after the flags is a Hydra override of ``configs/train.yaml`` (``eval.distance=cosine``,
``eval.rerank=true``, ``eval.num_pictures=8``, ...). A model file written by training carries its resolved
config: its ``model``, ``data`` and ``eval`` sections (the data root, the test feature, ...) are the defaults, and
only the fields the command line changes (directly or through a preset such as ``experiment=``) differ.
The model architecture comes from the checkpoint when it carries one (``meta.config.model`` of our
exports, the converter's ``meta``), otherwise from the composed ``model`` group; class and camera counts
always come from the weights.

Writes to ``--output-dir`` (default ``<checkpoint's folder>/eval/<checkpoint's name>``) on rank 0:
``results.json``, TensorBoard scalars ``eval/*`` and the pictures as images under ``tb/`` (at the training
step the weights were saved at, the step axis of training's own ``eval/*``), and ``pictures/``: per
chosen query a ranked list, the last block's head cross-correlation and the mask, plus the head
cross-correlation averaged over those queries.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from dpm_dist.cli.common import (
    absolute_path,
    check_local_inputs,
    compose_config,
    one_process_checks,
    resolve_paths,
    run_guarded,
)

PROG = "dpm-eval"
# Taken from the model file's training config unless the command line sets them (the weights fix the model anyway).
STORED_SECTIONS = ("model", "data", "eval")
ONE_ROOT = ("root", "eval_root", "train_urls", "query_urls", "gallery_urls")  # data fields that exclude data.roots
MANY_ROOTS = ("roots", "root_weights")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog="Remaining arguments are Hydra overrides, e.g. experiment=occluded_duke eval.rerank=true",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="our model file (.pt), an official DPM state dict (.pth), or a run folder"
    )
    parser.add_argument("--output-dir", help="default: <checkpoint's folder>/eval/<checkpoint's name>")
    args, overrides = parser.parse_known_args(argv)
    return run_guarded(PROG, lambda: evaluate_checkpoint(args.checkpoint, args.output_dir, overrides))


def evaluate_checkpoint(checkpoint: str, output_dir: str | None, overrides: Sequence[str]) -> int:
    """Everything a user can get wrong is checked before the process group; then every rank evaluates."""
    from dpm_dist import dist
    from dpm_dist.dist import DistEnv
    from dpm_dist.eval.run import run_eval
    from dpm_dist.model.files import ModelFile, find_model_file

    env = DistEnv.from_env()
    path, note = find_model_file(absolute_path(checkpoint) or checkpoint)
    if note and env.is_main:
        print(f"{PROG}: {note}", file=sys.stderr, flush=True)
    model_file = ModelFile.read(path)
    cfg, from_file = eval_config(model_file.config, overrides)
    _check_inputs(cfg, from_file, path)
    note = check_datasets(cfg, model_file.meta, path)
    if note and env.is_main:
        print(f"{PROG}: warning: {note}", file=sys.stderr, flush=True)
    out_dir = absolute_path(output_dir) or default_output_dir(path)
    step = training_step(path, model_file.meta)
    dist.init_process_group(env, timeout_s=cfg.engine.collective_timeout_s)
    try:
        result = run_eval(cfg, model_file, env, output_dir=out_dir, step=step)
        if env.is_main:
            print(json.dumps({"metrics": result["metrics"], "output_dir": out_dir}), flush=True)
            if result.get("datasets"):
                from dpm_dist.eval.evaluator import dataset_table

                print(dataset_table({part["name"]: part["metrics"] for part in result["datasets"]}), flush=True)
            print(summary_line(result, out_dir), flush=True)
    finally:
        dist.barrier()
        dist.destroy()
    return 0


# ---- which file -------------------------------------------------------------------------------------------------


def default_output_dir(model_path: str) -> str:
    """Next to the checkpoint: ``<folder>/eval/<file name without extension>`` (best and final stay apart)."""
    return os.path.join(os.path.dirname(model_path), "eval", os.path.splitext(os.path.basename(model_path))[0])


def training_step(model_path: str, meta: dict[str, Any]) -> int | None:
    """The global step the weights were saved at: training logs ``eval/*`` at it, so dpm-eval's scalars line up.

    From ``meta.step`` when the file records it, else from the run's checkpoint of the file's epoch
    (``checkpoints/epoch_XXXX/meta.json``) or the run's ``results.json`` (final epoch); None if unknown.
    """
    from dpm_dist.train.checkpoint import tag_for

    if isinstance(meta.get("step"), int):
        return int(meta["step"])
    epoch, run = meta.get("epoch"), os.path.dirname(model_path)
    if not isinstance(epoch, int):
        return None
    for path, key, needs_epoch in (
        (os.path.join(run, "checkpoints", tag_for(epoch), "meta.json"), "step", "epoch"),
        (os.path.join(run, "results.json"), "steps", "epochs"),
    ):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            continue
        if saved.get(needs_epoch) == epoch and isinstance(saved.get(key), int):
            return int(saved[key])
    return None


# ---- which settings ---------------------------------------------------------------------------------------------


def eval_config(stored: dict[str, Any], overrides: Sequence[str]) -> tuple[Any, list[str]]:
    """The config to evaluate with, and the fields taken from the model file's training config.

    A field the user set is one an override names (``eval.neck_feat=before``, even to its default value)
    or one the overrides changed from ``train.yaml``'s value (presets such as ``experiment=occluded_duke``).
    """
    user = compose_config(overrides)
    if not stored:
        return resolve_paths(user), []
    base = compose_config([])
    named = _override_keys(overrides)
    sections, from_file = {}, []
    for section in STORED_SECTIONS:
        saved, mine, default = stored.get(section) or {}, getattr(user, section), getattr(base, section)
        changes, user_set = {}, set()
        for field in dataclasses.fields(mine):
            key = f"{section}.{field.name}"
            if any(key == k or key.startswith(k + ".") for k in named) or getattr(mine, field.name) != getattr(
                default, field.name
            ):
                user_set.add(field.name)
            elif field.name in saved and saved[field.name] != getattr(mine, field.name):
                changes[field.name] = saved[field.name]
        if section == "data":  # the user's data.root or data.roots replaces the file's other one
            for group, other in ((ONE_ROOT, MANY_ROOTS), (MANY_ROOTS, ONE_ROOT)):
                if user_set & set(group):
                    changes = {k: v for k, v in changes.items() if k not in other}
        from_file += [f"{section}.{name}" for name in changes]
        sections[section] = dataclasses.replace(mine, **changes)
    return resolve_paths(dataclasses.replace(user, **sections)), from_file


def _override_keys(overrides: Sequence[str]) -> set[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))}


def _check_inputs(cfg: Any, from_file: list[str], model_path: str) -> None:
    """The shard folders exist (before any process group); a missing one that came from the model file says so."""
    data = cfg.data
    if data.query_urls and data.gallery_urls:  # explicit shard lists: the roots are not read
        data = dataclasses.replace(data, root=None, eval_root=None)
    try:
        check_local_inputs(
            dataclasses.replace(cfg, data=data, model=dataclasses.replace(cfg.model, pretrained=None)),
            roles=("query", "gallery"),
            remote_shards=one_process_checks(),
        )
    except FileNotFoundError as err:
        field = next((k for k in from_file if f"`{k}`" in str(err)), None)
        if field is None:
            raise
        raise FileNotFoundError(
            f"{err} (the training config stored in {model_path}; override it with {field}=<folder>)"
        ) from None


def check_datasets(cfg: Any, meta: dict[str, Any], model_path: str) -> str | None:
    """A model trained on several datasets holds their camera offsets (SIE): evaluating it on other
    ``data.roots`` than it was trained on is refused (``ValueError``); on one root, a warning (returned)."""
    from dpm_dist.data.loader import load_manifest
    from dpm_dist.data.union import same_datasets

    trained = meta.get("datasets") or []
    if len(trained) < 2:
        return None
    names = ", ".join(d["name"] for d in trained)
    if len(cfg.data.roots) < 2:
        return (
            f"{model_path} was trained on {len(trained)} datasets ({names}) with camera offsets; one data.root is "
            "evaluated with cameras from 0, the first dataset's; data.roots=[...] evaluates each with its own"
        )
    differ = same_datasets(trained, load_manifest(cfg.data)["datasets"])
    if differ:
        raise ValueError(
            f"config field `data.roots`: {model_path} was trained on {differ}; the camera offsets would "
            "not match: list the training datasets, in their order"
        )
    return None


def summary_line(result: dict[str, Any], out_dir: str) -> str:
    m = result["metrics"]
    valid = int(m["num_valid_query"])
    skipped = f", {int(m['num_query']) - valid} without a true match skipped" if valid != int(m["num_query"]) else ""
    mean = f"mean of {len(result['datasets'])} datasets: " if result.get("datasets") else ""
    return (
        f"{mean}rank-1 {m['rank1']:.1%}  mAP {m['mAP']:.1%}  mINP {m['mINP']:.1%}  ({int(m['num_query'])} queries{skipped}, "
        f"{int(m['num_gallery'])} gallery images)   results: {os.path.join(out_dir, 'results.json')}   "
        f"TensorBoard: tensorboard --logdir {os.path.join(out_dir, 'tb')}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
