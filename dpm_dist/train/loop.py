"""The training loop: build → resume → for each epoch: steps, then evaluate and save. Read it top to bottom.

``train(cfg, env, report)`` is what ``dpm-train`` (any launcher) and the Ray Tune trainable call.
Every rank runs every line; only the loggers and file writes are rank-0 gated.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from typing import Any, Callable, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from dpm_dist import dist
from dpm_dist.config import DPMConfig
from dpm_dist.dist import DistEnv
from dpm_dist.train import checkpoint

log = logging.getLogger(__name__)

# report(metrics, epoch, checkpoint_folder): the Ray Tune hook; called on every rank after each eval.
Reporter = Callable[[dict[str, float], int, Optional[str]], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_engine(cfg: DPMConfig, env: DistEnv):
    """Model (+ ImageNet weights) wrapped in the two DeepSpeed engines."""
    from dpm_dist.data.loader import load_manifest
    from dpm_dist.model.dpm import build_model
    from dpm_dist.model.weights import load_imagenet_vit
    from dpm_dist.train.engine import DPMEngine

    manifest = load_manifest(cfg.data)
    seed_everything(cfg.engine.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, num_classes=manifest["num_train_ids"], num_cams=manifest["num_cams"])
    if cfg.model.pretrained:
        load_imagenet_vit(model, cfg.model.pretrained)
    return DPMEngine(model, cfg, env)


def _progress_bar(cfg: DPMConfig, env: DistEnv):
    """A tqdm bar with ETA on rank 0 (``log.progress``); a disabled, silent one elsewhere."""
    from tqdm import tqdm

    return tqdm(total=0, disable=not (env.is_main and cfg.log.progress), unit="it", file=sys.stderr,
                mininterval=2.0, dynamic_ncols=True)


def _epoch_steps(cfg: DPMConfig, loader: Any) -> int:
    n = len(loader)
    return min(n, cfg.optim.steps_per_epoch) if cfg.optim.steps_per_epoch else n


def _eval_due(cfg: DPMConfig, epoch: int) -> bool:
    return epoch % cfg.eval.period == 0 or epoch == cfg.optim.epochs


def train(cfg: DPMConfig, env: DistEnv, report: Optional[Reporter] = None) -> dict[str, float]:
    """Train (or resume) the run in ``cfg.log.output_dir``; returns the last evaluation's metrics."""
    from dpm_dist.model.files import save_model_file
    from dpm_dist.eval.evaluator import evaluate
    from dpm_dist.data.loader import build_train_loader
    from dpm_dist.loggers import build_logger

    if cfg.engine.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    out_dir, ckpt_root = cfg.log.output_dir, os.path.join(cfg.log.output_dir, "checkpoints")
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    if env.is_main:
        os.makedirs(ckpt_root, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved), os.path.join(out_dir, "config.yaml"))
    engine = build_engine(cfg, env)
    meta = checkpoint.resume(engine, ckpt_root, env)
    start_epoch, step = (meta["epoch"] + 1, meta["step"]) if meta else (1, 0)
    best = meta.get("best", -1.0) if meta else -1.0
    results: dict[str, float] = dict(meta.get("results", {})) if meta else {}
    if not (meta and meta.get("rng_restored")):  # fresh run, or another world size: seed per rank and epoch
        seed_everything(cfg.engine.seed * 1000 + env.rank + 7919 * start_epoch)  # drop-path RNG
    logger = build_logger(cfg.log, env)
    bar = _progress_bar(cfg, env)
    if meta and env.is_main:
        print(f"resumed from {meta['tag']} (epoch {meta['epoch']}, step {step}, world size {meta['world_size']})", flush=True)

    for epoch in range(start_epoch, cfg.optim.epochs + 1):
        engine.start_epoch(epoch)
        loader = build_train_loader(cfg.data, env, epoch=epoch, seed=cfg.engine.seed)
        if epoch == start_epoch:  # ETA over the remaining epochs, assuming they are as long as this one
            bar.reset(total=_epoch_steps(cfg, loader) * (cfg.optim.epochs - start_epoch + 1))
        bar.set_description(f"epoch {epoch}/{cfg.optim.epochs}")
        t_data, t_epoch, seen = 0.0, time.time(), 0
        t_mark = time.time()
        for i, batch in enumerate(loader):
            if cfg.optim.steps_per_epoch and i >= cfg.optim.steps_per_epoch:
                break
            t_data += time.time() - t_mark
            metrics = engine.step(batch)
            step += 1
            seen += batch["images"].shape[0] * env.world_size
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
            if step % cfg.log.log_every == 0:
                elapsed = max(time.time() - t_epoch, 1e-9)
                logs = {f"train/{k}": v for k, v in metrics.items()}
                logs.update({f"lr/{k}": v for k, v in engine.learning_rates().items()})
                logs.update({"perf/samples_per_sec": seen / elapsed, "perf/data_time": t_data / (i + 1), "train/epoch": epoch})
                logger.log(logs, step)
            t_mark = time.time()
        improved = False
        if _eval_due(cfg, epoch):
            results = evaluate(engine.model, cfg, env, device=engine.device)  # collective
            logger.log({f"eval/{k}": v for k, v in results.items()}, step)
            improved = results[cfg.search.metric] > best
            best = max(best, results[cfg.search.metric])
        folder = None
        if epoch % cfg.log.checkpoint_every == 0 or epoch == cfg.optim.epochs or _eval_due(cfg, epoch):
            meta_out = {"best": best, "results": results, "config": resolved}
            folder = checkpoint.save(engine, ckpt_root, epoch=epoch, step=step, env=env, meta=meta_out,
                                     keep_last=cfg.log.keep_last, is_best=improved and cfg.log.keep_best)
            if improved and env.is_main and cfg.log.keep_best:
                save_model_file(engine.model, os.path.join(out_dir, "model_best.pt"), {"epoch": epoch, "results": results, "config": resolved})
        if report is not None and _eval_due(cfg, epoch):
            report(dict(results, epoch=epoch), epoch, folder)

    bar.close()
    if env.is_main:
        save_model_file(engine.model, os.path.join(out_dir, "model_final.pt"), {"epoch": cfg.optim.epochs, "results": results, "config": resolved})
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump({"results": results, "best": best, "epochs": cfg.optim.epochs, "steps": step}, f, indent=2)
    hparams = {"alpha": cfg.loss.alpha, "beta": cfg.loss.beta, "margin": cfg.loss.margin, "scale": cfg.loss.scale,
               "lr": cfg.optim.base_lr, "update_mode": cfg.engine.update_mode, "world_size": env.world_size}
    logger.close(hparams, {k: v for k, v in results.items() if isinstance(v, float)})
    dist.barrier()
    return results
