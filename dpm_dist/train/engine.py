"""DeepSpeed wrapping of DPM's two-step update (docs/method.md §5.4, §10). The only module that imports deepspeed.

Two engines share one model: ``main`` owns every parameter except the HMG (SGD + the cosine schedule),
``mask`` owns the HMG (SGD, constant lr by default). Each step toggles ``requires_grad`` so that an
engine only ever sees gradients of its own parameters: that is what keeps ZeRO-1/2 correct (a
parameter reduced by both engines crashes ZeRO-2, and stale grads leak into the other engine's next
step at ZeRO-0/1; ECOSYSTEM.md B3).

Update modes (``engine.update_mode``):

* ``reference`` — the official loop literally: two full forward + backward passes; step 1 also
  computes (and discards) the HMG weight gradients, step 2 computes every loss term and the
  backbone gradients (discarded). ZeRO stage 0 only, because ZeRO cannot reduce a parameter twice.
* ``exact`` (default) — the same updates at lower cost (docs/method.md §10.2): no HMG weight gradients in
  step 1 (the gradient still flows *through* the HMG into the backbone); step 2 runs the backbone
  without autograd (train mode: fresh drop-path, BNNeck statistics update as in the official code)
  and backpropagates (1−α)·CE(masked ArcFace) into the HMG only.
* ``approx`` — step 2 reuses step 1's taps, f_bn and W (docs/method.md §10.3): no second backbone forward; the
  HMG sees the pre-update backbone and BN statistics update once. Not exact; documented as such.

Non-finite steps (docs/training.md, "Non-finite losses"): a NaN/Inf loss term on any rank (it turns that
rank's gradients into NaN) or a non-finite gradient norm (ZeRO-1/2: DeepSpeed's own all-reduced norm;
ZeRO-0: the norm of the already all-reduced gradients, the same on every rank) skips the update on every
rank, and the BN running statistics of that forward are put back. fp16 keeps GradScaler's skip-and-back-off.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from dpm_dist import dist
from dpm_dist.config import DPMConfig
from dpm_dist.dist import DistEnv, device_for
from dpm_dist.model.dpm import DPMNet
from dpm_dist.train.losses import dpm_loss, masked_arcface_ce
from dpm_dist.train.optim import build_optimizers, build_scheduler
from dpm_dist.train.sharded_head import ShardedHead, gather_rows

log = logging.getLogger(__name__)

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(cfg: DPMConfig, env: DistEnv) -> dict[str, Any]:
    """The DeepSpeed config dict of one engine, derived from the typed config (no JSON files)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.data.batch_size * env.world_size,
        "gradient_clipping": float(cfg.engine.gradient_clipping),  # DeepSpeed's default is 1.0: never inherit it
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.engine.precision in _AUTOCAST:
        # torch.autocast around fp32 weights, like the official AMP; fp16 gets torch's GradScaler
        # (init 2^16, growth ×2 every 2000 updates, backoff 0.5: the official GradScaler defaults).
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if cfg.engine.precision == "bf16" else "float16"}
    return ds


def compile_model(model: DPMNet, backend: str = "inductor") -> None:
    """``engine.compile``: torch.compile, in place, every ViT block but the last, and the HMG.

    In place (``nn.Module.compile``), so parameter names, checkpoints and the DeepSpeed wrapping are
    unchanged. The blocks share one compiled graph (same code, parameters are graph inputs). The last
    block stays eager: the HEM logits come from a forward hook on its qkv projection, which a compiled
    block would not run. The losses stay eager too: at B×C = 64×702 they are a tiny share of a step.
    """
    for block in model.backbone.blocks[:-1]:
        block.compile(backend=backend)
    model.mask_gen.compile(backend=backend)


def _set_requires_grad(params: list[nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


def _nonfinite_terms(flags: torch.Tensor, names: list[str]) -> tuple[str, ...]:
    """The ``names`` whose ``flags`` (this rank's "non-finite") are set on any rank. Collective."""
    return tuple(name for name, bad in zip(names, dist.all_reduce_sum(flags.float()).tolist()) if bad)


def _grad_norm_finite(params: list[nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


def _back_off(scaler: Any) -> None:
    """One GradScaler back-off (scale × backoff_factor, growth count restarted), as ``update()`` after an inf."""
    state = scaler.state_dict()
    scaler.load_state_dict(dict(state, scale=state["scale"] * state["backoff_factor"], _growth_tracker=0))


def _forget_fp16_autocast() -> None:
    """DeepSpeed remembers an fp16 torch_autocast engine in module globals, and every later ZeRO engine of the
    process then gets a GradScaler (a Ray Tune actor or a test building several engines); clear it."""
    from deepspeed.runtime import torch_autocast

    torch_autocast.TORCH_AUTOCAST_INITIALIZED, torch_autocast.TORCH_AUTOCAST_DTYPE = False, None


class DPMEngine:
    """Owns the model, both DeepSpeed engines and the schedulers. ``step(batch)`` does one iteration."""

    def __init__(self, model: DPMNet, cfg: DPMConfig, env: DistEnv) -> None:
        import deepspeed

        if cfg.engine.update_mode == "reference" and cfg.engine.zero_stage != 0:
            raise ValueError(
                "config field `engine.update_mode`: 'reference' computes every gradient in both steps, "
                "which ZeRO cannot reduce twice; use engine.zero_stage=0 (or update_mode=exact)"
            )
        if cfg.engine.sync_bn:
            if not torch.cuda.is_available():
                raise ValueError("config field `engine.sync_bn`: SyncBatchNorm needs CUDA devices")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.cfg, self.env = cfg, env
        self.device = device_for(env)
        self.model = model.to(self.device)
        if cfg.engine.compile:
            compile_model(self.model, cfg.engine.compile_backend)
        # model.classifier=sharded: this rank's prototype rows leave the model before DeepSpeed sees it (they
        # are model-parallel) and get their own optimiser (dpm_dist/train/sharded_head.py says why).
        self.head = ShardedHead(model, cfg, env) if cfg.model.classifier == "sharded" else None
        self._main_params = model.non_mask_parameters()
        self._mask_params = model.mask_parameters()
        # The frozen BNNeck bias must stay out of both engines.
        opt_main, opt_mask = build_optimizers(model, cfg.optim)
        ds_cfg = deepspeed_config(cfg, env)
        if cfg.engine.precision not in _AUTOCAST:
            _forget_fp16_autocast()
        self.main, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=opt_main,
            model_parameters=self._main_params,
            config=dict(ds_cfg),
            dist_init_required=env.distributed,
        )
        self.mask, _, _, _ = deepspeed.initialize(
            model=model.mask_gen,
            optimizer=opt_mask,
            model_parameters=self._mask_params,
            config=dict(ds_cfg),
            dist_init_required=env.distributed,
        )
        self.opt_main, self.opt_mask = opt_main, opt_mask
        self.sched_main = build_scheduler(opt_main, cfg.optim)
        self.sched_mask = build_scheduler(opt_mask, cfg.optim) if cfg.optim.schedule_mask_generator else None
        lc = cfg.loss
        self._loss_args = dict(
            alpha=lc.alpha,
            beta=lc.beta,
            margin=lc.margin,
            scale=lc.scale,
            triplet_weight=lc.triplet_weight,
            hem_ref_batch=lc.hem_ref_batch if cfg.engine.hem_global_batch else None,
        )
        self._buffers = list(self.model.buffers())  # the BN running statistics
        # Skipped (non-finite) iterations: in all (the loop restores it on resume), in a row, why the last one
        # skipped (() when it was applied), and every cause seen in the current streak, in order.
        self.skipped_steps, self.nonfinite_streak = 0, 0
        self.last_skip: tuple[str, ...] = ()
        self.streak_causes: tuple[str, ...] = ()

    # ------------------------------------------------------------------ schedule
    def start_epoch(self, epoch: int) -> None:
        """Set the learning rates of ``epoch`` (1-based), as the official per-epoch scheduler step."""
        self.sched_main.step(epoch)
        if self.head is not None:
            self.head.start_epoch(epoch)
        if self.sched_mask is not None:
            self.sched_mask.step(epoch)

    def learning_rates(self) -> dict[str, float]:
        out = {}
        head = [("head", self.head.optimizer)] if self.head is not None else []
        for tag, opt in (("main", self.opt_main), ("mask", self.opt_mask), *head):
            for group in opt.param_groups:
                out[f"{tag}_{group.get('name', 'group')}"] = float(group["lr"])
        return out

    # ------------------------------------------------------------------ step
    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = _AUTOCAST.get(self.cfg.engine.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _triplet_inputs(self, feat: torch.Tensor, pids: torch.Tensor) -> dict[str, torch.Tensor | None]:
        if not (self.cfg.engine.gather_triplet and self.env.distributed):
            return {}
        # Gradient-carrying gather: each rank's features receive the gradient of the global mining.
        world = self.env.world_size
        return {"triplet_feat": gather_rows(feat, world, grad_scale=1.0), "triplet_labels": gather_rows(pids, world)}

    def _loss(self, out, pids) -> dict[str, torch.Tensor]:
        if self.head is not None:
            sharded = dict(prototypes=None, id_terms=self.head.classification_terms(out.feat_bn, out.mask, pids))
        else:
            sharded = dict(prototypes=self.model.prototypes)
        return dpm_loss(
            feat=out.feat,
            feat_bn=out.feat_bn,
            mask=out.mask,
            attn_logits=out.attn_logits,
            labels=pids,
            **sharded,
            **self._triplet_inputs(out.feat, pids),
            **self._loss_args,
        )

    def _step2_masked_ce(self, feat_bn: torch.Tensor, mask: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        """Step 2's masked ArcFace CE against fixed prototypes (the sharded head's when there is one)."""
        if self.head is not None:
            return self.head.masked_arcface_ce(feat_bn, mask, pids)
        return masked_arcface_ce(
            feat_bn, mask, self.model.prototypes.detach(), pids, margin=self.cfg.loss.margin, scale=self.cfg.loss.scale
        )

    def step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One DPM iteration: step 1 (everything but the HMG), then step 2 (the HMG only).

        A non-finite loss term or gradient norm skips the rest of the iteration on every rank, with the BN
        statistics of the skipped forward put back; ``last_skip`` then names the cause. fp16: GradScaler's
        own skip of an engine's update is counted the same way, and changes nothing else (as in AMP).
        """
        images = batch["images"].to(self.device, non_blocking=True)
        pids = batch["pids"].to(self.device, non_blocking=True)
        camids = batch["camids"].to(self.device, non_blocking=True)
        mode = self.cfg.engine.update_mode
        self.model.train()
        if self.head is not None:
            self.head.begin_iteration()

        # Step 1: train the holistic prototypes (and backbone); the HMG is not stepped.
        _set_requires_grad(self._main_params, True)
        _set_requires_grad(self._mask_params, mode == "reference")
        self.main.zero_grad()
        if self.head is not None:
            self.head.zero_grad()
        stats = [b.clone() for b in self._buffers]
        with self._autocast():
            enc = self.model.encode(images, camids)
            out = self.model.head(enc)
            losses = self._loss(out, pids)
        main_causes, stop = self._update(
            "main",
            self.main,
            self._main_params,
            losses["loss"],
            {k: v for k, v in losses.items() if k.startswith("loss")},
        )
        if stop:
            return self._skipped(main_causes, stats, self._metrics(losses, out))
        if self.head is not None:  # fp16 (the only non-stopping cause) is refused with a sharded head
            self.head.step()

        # Step 2: train the mask generator; everything else is not stepped.
        _set_requires_grad(self._main_params, mode == "reference")
        _set_requires_grad(self._mask_params, True)
        self.mask.zero_grad()
        stats = [b.clone() for b in self._buffers]
        with self._autocast():
            if mode == "reference":
                out2 = self.model(images, camids)
                loss2 = self._loss(out2, pids)["loss"]
            else:
                if mode == "exact":
                    with torch.no_grad():
                        enc2 = self.model.encode(images, camids)
                        feat_bn2 = self.model.bottleneck(enc2.feat)
                    taps = enc2.taps
                else:  # approx
                    taps, feat_bn2 = enc.taps.detach(), out.feat_bn.detach()
                mask2 = self.model.mask_gen(taps)
                loss2 = (1.0 - self.cfg.loss.alpha) * self._step2_masked_ce(feat_bn2, mask2, pids)
        mask_causes, stop = self._update("mask", self.mask, self._mask_params, loss2, {"loss_step2": loss2})
        if mode == "reference":
            self.main.zero_grad()  # the discarded step-2 backbone grads must not leak into the next step 1
            if self.head is not None:
                self.head.zero_grad()
        if stop:  # step 1 stays applied (it was finite); the HMG is not updated
            return self._skipped(main_causes + mask_causes, stats, self._metrics(losses, out, loss2))
        _set_requires_grad(self._main_params, True)
        self._count(main_causes + mask_causes)  # fp16: GradScaler may have skipped an engine's update
        return self._metrics(losses, out, loss2)

    def _metrics(
        self, losses: dict[str, torch.Tensor], out: Any, loss2: torch.Tensor | None = None
    ) -> dict[str, float]:
        metrics = {k: float(v.detach()) for k, v in losses.items()}
        if loss2 is not None:
            metrics["loss_step2"] = float(loss2.detach())
        metrics["mask_mean"] = float(out.mask.detach().float().mean())
        scale = self.loss_scale()
        if scale is not None:
            metrics["loss_scale"] = scale
        return metrics

    def _update(
        self, name: str, ds_engine: Any, params: list[nn.Parameter], loss: torch.Tensor, terms: dict[str, torch.Tensor]
    ) -> tuple[tuple[str, ...], bool]:
        """Backward + step of one engine, skipped on every rank when one of ``terms`` (on any rank) or the
        gradient norm is non-finite. Returns what was non-finite (``()``: applied) and whether the rest of
        the iteration must be skipped too (not after GradScaler's own skip). Every rank returns the same."""
        flags = torch.stack([~torch.isfinite(v.detach()).all() for v in terms.values()])
        # A non-finite term makes every gradient NaN (x·NaN; ×1.0 is exact), on this rank and, once reduced, on
        # all: the gradient check skips everywhere with no collective (nor host sync) of its own.
        ds_engine.backward(loss * torch.where(flags.any(), float("nan"), 1.0))
        scaler = dict(self._scalers()).get(name)
        saved = scaler.state_dict() if scaler is not None else None
        cause = self._step_if_finite(name, ds_engine, params, scaler)
        if not cause:
            return (), False
        bad = _nonfinite_terms(flags, list(terms))  # collective: on a skipped step every rank is here
        if bad:
            if scaler is not None:
                scaler.load_state_dict(saved)  # a non-finite forward is no fp16 overflow: keep the scale
            return bad, True
        return (cause,), scaler is None

    def _step_if_finite(self, name: str, ds_engine: Any, params: list[nn.Parameter], scaler: Any) -> str:
        """Step ``ds_engine`` unless its (reduced) gradient norm is non-finite; returns why it skipped, else ""."""
        zero = self.cfg.engine.zero_stage > 0
        if scaler is None and not zero and not _grad_norm_finite(params):  # ZeRO-0 grads are all-reduced already
            ds_engine.zero_grad()
            return f"gradient norm ({name})"
        scale = float(scaler.get_scale()) if scaler is not None else 0.0
        ds_engine.step()  # ZeRO-1/2 skip a non-finite (all-reduced) norm themselves; GradScaler skips an inf
        if zero and ds_engine.optimizer.overflow:
            if scaler is None:
                return f"gradient norm ({name})"
            _back_off(scaler)  # ZeRO's own norm check returns before GradScaler could see the inf and back off
        if scaler is not None and float(scaler.get_scale()) < scale:
            return f"fp16 gradient overflow ({name}: loss scale {scale:g} -> {float(scaler.get_scale()):g})"
        return ""

    def _skipped(
        self, causes: tuple[str, ...], stats: list[torch.Tensor], metrics: dict[str, float]
    ) -> dict[str, float]:
        """A skipped iteration: the BN statistics of its forward put back, then counted."""
        with torch.no_grad():
            for buf, saved in zip(self._buffers, stats):
                buf.copy_(saved)
        _set_requires_grad(self._main_params, True)
        self._count(causes)
        return metrics

    def _count(self, causes: tuple[str, ...]) -> None:
        """Book the iteration: skipped (``causes``: what was non-finite) or applied (``()``: the streak ends)."""
        self.last_skip = causes
        if not causes:
            self.nonfinite_streak, self.streak_causes = 0, ()
            return
        self.skipped_steps += 1
        self.nonfinite_streak += 1
        self.streak_causes = tuple(dict.fromkeys(self.streak_causes + causes))

    def _scalers(self) -> Iterator[tuple[str, Any]]:
        """The fp16 GradScaler of each engine (DeepSpeed's torch_autocast keeps it out of its checkpoints)."""
        for name, engine in self.modules():
            scaler = getattr(engine, "torch_autocast_z0_gradscaler", None) or getattr(
                engine.optimizer, "torch_autocast_gradscaler", None
            )
            if scaler is not None:
                yield name, scaler

    def loss_scale(self) -> float | None:
        return next((float(scaler.get_scale()) for name, scaler in self._scalers() if name == "main"), None)

    # ------------------------------------------------------------------ state
    def model_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on rank 0 (a sharded head's W gathered into ``classifier.weight``), None
        elsewhere. Collective."""
        weight = self.head.full_weight() if self.head is not None else None
        if not self.env.is_main:
            return None
        state = dict(self.model.state_dict())
        if self.head is not None:
            state["classifier.weight"] = weight
        return state

    def modules(self) -> Iterator[tuple[str, Any]]:
        yield "main", self.main
        yield "mask", self.mask

    def scaler_state(self) -> dict[str, Any]:
        return {name: scaler.state_dict() for name, scaler in self._scalers()}

    def load_scaler_state(self, state: dict[str, Any]) -> None:
        for name, scaler in self._scalers():
            if name in state:
                scaler.load_state_dict(state[name])


# ZeRO state on another world size (DeepSpeed internals, so it lives in the one module that imports it).


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
