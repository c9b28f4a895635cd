"""``dpm-eval``: evaluate a checkpoint on the query/gallery shards, on one or many ranks, with the same numbers.

    dpm-eval --checkpoint runs/tiny_synthetic/model_final.pt                     # our export; its config is inside
    dpm-eval --checkpoint occluded_duke_dpm.pt experiment=occluded_duke data.root=/data/shards/occluded_duke
    dpm-eval --checkpoint transformer_150.pth experiment=occluded_duke data.root=...   # an official file, directly
    torchrun --nproc-per-node 4 -m dpm_dist.eval_cli --checkpoint ... [Hydra overrides]

Everything after the flags is a Hydra override of ``configs/train.yaml`` (``eval.distance=cosine``,
``eval.rerank=true``, ``eval.num_pictures=8``, ...). The model architecture comes from the checkpoint when
it carries one (``meta.config.model`` of our exports, the converter's ``meta``), otherwise from the
composed ``model`` group; class and camera counts always come from the weights.

Writes to ``--output-dir`` (default ``<log.output_dir>/eval``) on rank 0: ``results.json``, TensorBoard
scalars ``eval/*`` under ``tb/``, and ``pictures/``: per chosen query a ranked list, the last block's
head cross-correlation and the mask, plus the head cross-correlation averaged over those queries.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from typing import Any, Optional, Sequence

import torch

from dpm_dist import dist
from dpm_dist.config import DPMConfig, ModelConfig
from dpm_dist.dist import DistEnv


def compose_config(overrides: Sequence[str]) -> DPMConfig:
    """``configs/train.yaml`` + overrides, validated (Hydra's compose API; works under any launcher)."""
    from hydra import compose, initialize_config_dir

    from dpm_dist.cli import CONFIG_DIR
    from dpm_dist.config import register_configs, to_config

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return to_config(compose(config_name="train", overrides=list(overrides)))


def _checkpoint_meta(path: str) -> dict[str, Any]:
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    meta = obj.get("meta") if isinstance(obj, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def model_config_for(cfg: DPMConfig, meta: dict[str, Any]) -> ModelConfig:
    """The checkpoint's own architecture when it records one, else the composed ``model`` section."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    saved = (meta.get("config") or {}).get("model")
    if saved:
        return ModelConfig(**{k: v for k, v in saved.items() if k in fields})
    known = {k: meta[k] for k in ("img_size", "stride", "backbone", "tap_blocks", "embed_dim", "depth", "patch_size")
             if k in meta}
    return dataclasses.replace(cfg.model, **known)


def load_model(path: str, cfg: DPMConfig) -> tuple[torch.nn.Module, ModelConfig, dict[str, Any]]:
    """Build the DPM model for ``path`` (our export or an official state dict) and load it strictly."""
    from dpm_dist.model import build_model
    from dpm_dist.weights import describe_state_dict, load_state_dict_checked, read_dpm_state_dict

    meta = _checkpoint_meta(path)
    state = read_dpm_state_dict(path)
    facts = describe_state_dict(state)
    model_cfg = model_config_for(cfg, meta)
    model = build_model(model_cfg, num_classes=facts["num_classes"], num_cams=facts["num_cams"])
    load_state_dict_checked(model, state, source=path)
    return model, model_cfg, meta


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-60:]


def write_pictures(out_dir: str, model: torch.nn.Module, query, gallery, metrics, cfg: DPMConfig, env: DistEnv, *,
                   device: torch.device) -> list[str]:
    """Ranked lists, head cross-correlations and masks of a few queries. Collective (image fetch); rank 0 draws."""
    from dpm_dist.evaluator import fetch_images
    from dpm_dist.retrieval import arccos_distance, distance_matrix, masked_cosine_similarity, pick_queries, top_k_gallery
    from dpm_dist import visualize

    chosen = pick_queries(metrics.ap, metrics.num_rel, cfg.eval.num_pictures)
    tops = {}
    for i in chosen:
        row = distance_matrix(query.feats[i:i + 1], gallery.feats, q_mask=query.masks[i:i + 1], metric=cfg.eval.distance)[0]
        tops[i] = (top_k_gallery(row, int(query.pids[i]), int(query.camids[i]), gallery.pids, gallery.camids,
                                 cfg.eval.picture_topk).tolist(), row)
    wanted = {("query", query.keys[i]) for i in chosen} | {("gallery", gallery.keys[j]) for top, _ in tops.values() for j in top}
    images = fetch_images(cfg.data, env, wanted)
    if not env.is_main or not chosen:
        return []
    pictures = os.path.join(out_dir, "pictures")
    q_images = torch.stack([images[("query", query.keys[i])] for i in chosen])
    model.eval()
    with torch.no_grad():
        attn = model(q_images.to(device), query.camids[chosen].to(device)).attn_logits.float().cpu()
    corr = visualize.head_correlation(attn)
    written = []
    for n, i in enumerate(chosen):
        top, row = tops[i]
        name = f"{n:02d}_{_safe(query.keys[i])}"
        if cfg.eval.distance == "euclidean":
            shown = [f"d={float(row[j]):.3f}" for j in top]
        else:
            cos = masked_cosine_similarity(query.feats[i:i + 1], query.masks[i:i + 1], gallery.feats[top]) \
                if cfg.eval.distance == "masked_cosine" else -row[top][None, :]
            shown = [f"d={float(d):.3f}" for d in arccos_distance(cos)[0]]
        written.append(visualize.save_ranked_list(
            os.path.join(pictures, f"ranked_{name}.png"), images[("query", query.keys[i])],
            [images[("gallery", gallery.keys[j])] for j in top], [bool(gallery.pids[j] == query.pids[i]) for j in top],
            query_title=f"query pid {int(query.pids[i])} cam {int(query.camids[i])}\nAP {float(metrics.ap[i]):.3f}",
            gallery_titles=[f"{s}\npid {int(gallery.pids[j])} c{int(gallery.camids[j])}" for s, j in zip(shown, top)]))
        written.append(visualize.save_head_correlation(os.path.join(pictures, f"head_correlation_{name}.png"), corr[n],
                                                       title=f"last block, query {query.keys[i][:32]}"))
        written.append(visualize.save_mask_plot(os.path.join(pictures, f"mask_{name}.png"), query.masks[i],
                                                title=f"HMG mask, query {query.keys[i][:32]}"))
    written.append(visualize.save_head_correlation(os.path.join(pictures, "head_correlation_mean.png"), corr.mean(0),
                                                   title=f"last block, mean over {len(chosen)} queries"))
    return written


def run_eval(cfg: DPMConfig, checkpoint: str, env: DistEnv, *, output_dir: Optional[str] = None) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on every rank; rank 0 writes results.json, TensorBoard scalars and pictures."""
    from dpm_dist.evaluator import evaluate_embeddings, extract_and_gather

    device = dist.device_for(env)
    out_dir = output_dir or os.path.join(cfg.log.output_dir, "eval")
    model, model_cfg, meta = load_model(checkpoint, cfg)
    cfg = dataclasses.replace(cfg, model=model_cfg, data=dataclasses.replace(cfg.data, img_size=list(model_cfg.img_size)))
    model.to(device)
    start = time.perf_counter()
    query, gallery = extract_and_gather(model, cfg.data, env, device=device, neck_feat=cfg.eval.neck_feat)
    extracted = time.perf_counter()
    metrics = evaluate_embeddings(query, gallery, cfg.eval, env)
    scored = time.perf_counter()
    pictures = write_pictures(out_dir, model, query, gallery, metrics, cfg, env, device=device) if cfg.eval.num_pictures else []
    result = {
        "checkpoint": os.path.abspath(checkpoint),
        "metrics": metrics.as_dict(),
        "cmc": metrics.cmc.tolist(),
        "world_size": env.world_size,
        "seconds": {"extract_and_gather": extracted - start, "retrieval": scored - extracted},
        "eval": dataclasses.asdict(cfg.eval),
        "data_root": cfg.data.eval_root or cfg.data.root,
        "pictures": [os.path.relpath(p, out_dir) for p in pictures],
    }
    if env.is_main:
        from dpm_dist.loggers import TensorBoardLogger

        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(result, f, indent=2)
        if cfg.log.tensorboard:
            logger = TensorBoardLogger(os.path.join(out_dir, "tb"))
            logger.log({f"eval/{k}": v for k, v in metrics.as_dict().items()}, int(meta.get("epoch", 0)))
            logger.close()
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dpm-eval", description=__doc__.split("\n\n")[0],
                                     epilog="Remaining arguments are Hydra overrides, e.g. experiment=occluded_duke eval.rerank=true")
    parser.add_argument("--checkpoint", required=True, help="our model file (.pt) or an official DPM state dict (.pth)")
    parser.add_argument("--output-dir", help="default: <log.output_dir>/eval")
    args, overrides = parser.parse_known_args(argv)
    cfg = compose_config(overrides)
    env = DistEnv.from_env()
    dist.init_process_group(env)
    try:
        result = run_eval(cfg, args.checkpoint, env, output_dir=args.output_dir)
        if env.is_main:
            print(json.dumps({"metrics": result["metrics"], "output_dir": os.path.abspath(args.output_dir or os.path.join(cfg.log.output_dir, "eval"))}), flush=True)
    finally:
        dist.barrier()
        dist.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
