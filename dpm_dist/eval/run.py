"""Evaluating one model file end to end: load it, evaluate on every rank, write results and pictures.

:func:`run_eval` is what ``dpm-eval`` runs on every rank. The file is read and its model built by
:mod:`dpm_dist.model.files` (the architecture the file records, weights loaded strictly), as
``dpm_dist.load_model`` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any

import torch

from dpm_dist import dist
from dpm_dist.config import DPMConfig
from dpm_dist.dist import DistEnv
from dpm_dist.eval.embeddings import Embeddings
from dpm_dist.fsio import write_text_atomic
from dpm_dist.model.files import ModelFile, load_model_file


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-60:]


def write_pictures(
    out_dir: str,
    model: torch.nn.Module,
    query: Embeddings,
    gallery: Embeddings,
    metrics: Any,
    cfg: DPMConfig,
    env: DistEnv,
    *,
    device: torch.device,
    dataset: str | None = None,
) -> list[str]:
    """Ranked lists, head cross-correlations and masks of a few queries. Collective (image fetch); rank 0 draws."""
    from dpm_dist.eval import pictures
    from dpm_dist.eval.evaluator import fetch_images
    from dpm_dist.eval.retrieval import pick_queries

    chosen = pick_queries(metrics.ap, metrics.num_rel, cfg.eval.num_pictures)
    tops = {i: _top_of(query, gallery, i, cfg) for i in chosen}
    wanted = {("query", query.keys[i]) for i in chosen} | {
        ("gallery", gallery.keys[j]) for top, _ in tops.values() for j in top
    }
    images = fetch_images(cfg.data, env, wanted, dataset=dataset)
    if not env.is_main or not chosen:
        return []
    folder = os.path.join(out_dir, "pictures")
    q_images = torch.stack([images[("query", query.keys[i])] for i in chosen])
    model.eval()
    with torch.no_grad():
        attn = model(q_images.to(device), query.camids[chosen].to(device)).attn_logits.float().cpu()
    corr = pictures.head_correlation(attn)
    written = []
    for n, i in enumerate(chosen):
        name = f"{n:02d}_{_safe(query.keys[i])}"
        written += _query_pictures(folder, name, query, gallery, i, tops[i], images, metrics, corr[n], cfg)
    written.append(
        pictures.save_head_correlation(
            os.path.join(folder, "head_correlation_mean.png"),
            corr.mean(0),
            title=f"last block, mean over {len(chosen)} queries",
        )
    )
    return written


def _top_of(query: Embeddings, gallery: Embeddings, i: int, cfg: DPMConfig) -> tuple[list[int], torch.Tensor]:
    """Query ``i``'s top ``eval.picture_topk`` kept gallery items and its distance row."""
    from dpm_dist.eval.retrieval import distance_matrix, top_k_gallery

    row = distance_matrix(
        query.feats[i : i + 1], gallery.feats, q_mask=query.masks[i : i + 1], metric=cfg.eval.distance
    )[0]
    top = top_k_gallery(
        row, int(query.pids[i]), int(query.camids[i]), gallery.pids, gallery.camids, cfg.eval.picture_topk
    )
    return top.tolist(), row


def _shown_distances(
    query: Embeddings, gallery: Embeddings, i: int, top: list[int], row: torch.Tensor, cfg: DPMConfig
) -> list[str]:
    """The distances printed over the ranked list: the official arccos values (euclidean: as computed)."""
    from dpm_dist.eval.retrieval import arccos_distance, masked_cosine_similarity

    if cfg.eval.distance == "euclidean":
        return [f"d={float(row[j]):.3f}" for j in top]
    cos = (
        masked_cosine_similarity(query.feats[i : i + 1], query.masks[i : i + 1], gallery.feats[top])
        if cfg.eval.distance == "masked_cosine"
        else -row[top][None, :]
    )
    return [f"d={float(d):.3f}" for d in arccos_distance(cos)[0]]


def _query_pictures(
    folder: str,
    name: str,
    query: Embeddings,
    gallery: Embeddings,
    i: int,
    ranked: tuple[list[int], torch.Tensor],
    images: dict[tuple[str, str], torch.Tensor],
    metrics: Any,
    corr: torch.Tensor,
    cfg: DPMConfig,
) -> list[str]:
    """Query ``i``'s three pictures: its ranked list, its heads' cross-correlation and its HMG mask."""
    from dpm_dist.eval import pictures

    top, row = ranked
    shown = _shown_distances(query, gallery, i, top, row, cfg)
    key = query.keys[i]
    return [
        pictures.save_ranked_list(
            os.path.join(folder, f"ranked_{name}.png"),
            images[("query", key)],
            [images[("gallery", gallery.keys[j])] for j in top],
            [bool(gallery.pids[j] == query.pids[i]) for j in top],
            query_title=f"query\npid {int(query.pids[i])} {pictures.camera_label(int(query.camids[i]))}\nAP {float(metrics.ap[i]):.3f}",
            gallery_titles=[
                f"{s}\npid {int(gallery.pids[j])} {pictures.camera_label(int(gallery.camids[j]))}"
                for s, j in zip(shown, top)
            ],
        ),
        pictures.save_head_correlation(
            os.path.join(folder, f"head_correlation_{name}.png"), corr, title=f"last block, query {key[:32]}"
        ),
        pictures.save_mask_plot(
            os.path.join(folder, f"mask_{name}.png"), query.masks[i], title=f"HMG mask, query {key[:32]}"
        ),
    ]


COUNTS = ("num_query", "num_gallery", "num_valid_query")  # in results.json and the summary, not TensorBoard scalars


def run_eval(
    cfg: DPMConfig, model_file: ModelFile, env: DistEnv, *, output_dir: str, step: int | None = None
) -> dict[str, Any]:
    """Evaluate ``model_file`` on every rank; rank 0 writes results.json, TensorBoard and pictures.

    ``step`` is the training step the weights were saved at (training logs ``eval/*`` at its global step);
    the TensorBoard summaries use it, or 0 when it is unknown. With several ``data.roots`` every dataset is
    evaluated on its own (pictures and top-k under ``<output_dir>/<dataset>/``): ``metrics`` holds
    ``<dataset>/<key>`` and the means (:func:`dpm_dist.eval.evaluator.merge_datasets`), ``datasets`` each one's part.
    """
    from dpm_dist.data.loader import eval_datasets
    from dpm_dist.eval.evaluator import merge_datasets

    device = dist.device_for(env)
    model, model_cfg, meta = load_model_file(model_file, cfg.model)
    cfg = dataclasses.replace(
        cfg, model=model_cfg, data=dataclasses.replace(cfg.data, img_size=list(model_cfg.img_size))
    )
    model.to(device)
    names = eval_datasets(cfg.data)
    parts = [
        _evaluate_dataset(model, cfg, env, device, os.path.join(output_dir, name) if name else output_dir, name)
        for name in names or [None]
    ]
    written = [p for part in parts for p in part.pop("written")]
    result = {
        "checkpoint": model_file.path,
        "metrics": parts[0]["metrics"],
        "cmc": parts[0]["cmc"],
        "world_size": env.world_size,
        "seconds": {k: sum(part["seconds"][k] for part in parts) for k in ("extract_and_gather", "retrieval")},
        "eval": dataclasses.asdict(cfg.eval),
        "data_root": cfg.data.eval_root or cfg.data.root,
        "epoch": meta.get("epoch"),
        "step": step,
        "pictures": [os.path.relpath(p, output_dir) for p in written],
        "topk_file": os.path.relpath(parts[0]["topk_file"], output_dir)
        if parts[0]["topk_file"] and not names
        else None,
    }
    if names:  # the plain keys (and the CMC) are the means over the datasets
        shortest = min(len(part["cmc"]) for part in parts)
        result.update(
            metrics=merge_datasets({part["name"]: part["metrics"] for part in parts}),
            data_roots=list(cfg.data.roots),
            cmc=[sum(part["cmc"][i] for part in parts) / len(parts) for i in range(shortest)],
            datasets=[
                dict(part, topk_file=os.path.relpath(part["topk_file"], output_dir) if part["topk_file"] else None)
                for part in parts
            ],
        )
    if env.is_main:
        write_text_atomic(os.path.join(output_dir, "results.json"), json.dumps(result, indent=2))
        if cfg.log.tensorboard:
            _write_tensorboard(output_dir, result["metrics"], written, step or 0)
    return result


def _evaluate_dataset(
    model: torch.nn.Module, cfg: DPMConfig, env: DistEnv, device: torch.device, output_dir: str, dataset: str | None
) -> dict[str, Any]:
    """Metrics, top-k file and pictures of one evaluation set (one of several ``data.roots``, or the only one). Collective."""
    from dpm_dist.eval.evaluator import evaluate_embeddings, extract_and_gather
    from dpm_dist.eval.topk import picture_gallery, write_topk  # issue 14: top-k file; a shard's pictured items

    start = time.perf_counter()
    query, gallery = extract_and_gather(
        model,
        cfg.data,
        env,
        device=device,
        neck_feat=cfg.eval.neck_feat,
        shard_gallery=cfg.eval.shard_gallery,
        dataset=dataset,
    )
    extracted = time.perf_counter()
    metrics = evaluate_embeddings(query, gallery, cfg.eval, env)
    scored = time.perf_counter()
    topk_file = write_topk(output_dir, query, gallery, cfg.eval, env)
    gallery = picture_gallery(query, gallery, metrics, cfg.eval, env)
    written = (
        write_pictures(output_dir, model, query, gallery, metrics, cfg, env, device=device, dataset=dataset)
        if cfg.eval.num_pictures
        else []
    )
    return {
        "name": dataset,
        "metrics": metrics.as_dict(),
        "cmc": metrics.cmc.tolist(),
        "topk_file": topk_file,
        "written": written,
        "seconds": {"extract_and_gather": extracted - start, "retrieval": scored - extracted},
    }


def _write_tensorboard(output_dir: str, metrics: dict[str, float], pictures: list[str], step: int) -> None:
    """``<output_dir>/tb``: the metrics (no counts) and the pictures, ``pictures/[<dataset>/]<name>``."""
    from dpm_dist.loggers import TensorBoardLogger

    logger = TensorBoardLogger(os.path.join(output_dir, "tb"))
    logger.log({f"eval/{k}": v for k, v in metrics.items() if k.rsplit("/", 1)[-1] not in COUNTS}, step)
    for path in pictures:
        folder = os.path.dirname(os.path.dirname(os.path.relpath(path, output_dir)))  # "<dataset>" or ""
        logger.log_image(
            f"pictures/{folder + '/' if folder else ''}{os.path.splitext(os.path.basename(path))[0]}", path, step
        )
    logger.close()
