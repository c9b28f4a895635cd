"""DeepSpeed wrapping of DPM's two-step update (docs/method.md §5.4, §10). With ``zero_reshard`` (ZeRO state on
another world size), the only module that imports deepspeed.

Two engines share one model: ``main`` owns every parameter except the HMG (SGD + the cosine schedule),
``mask`` owns the HMG (SGD, constant lr by default). Each step toggles ``requires_grad`` so that an
engine only ever sees gradients of its own parameters: that is what keeps ZeRO-1/2 correct (a
parameter reduced by both engines crashes ZeRO-2, and stale grads leak into the other engine's next
step at ZeRO-0/1; docs/method.md §10.7).

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

The prototype head W is either inside the main engine (replicated) or sharded over the ranks; the engine talks
to both through one interface (:mod:`dpm_dist.train.heads`), chosen in :meth:`DPMEngine.from_config`.
The engine writes and reads its own part of a checkpoint (:meth:`DPMEngine.save` / :meth:`DPMEngine.load`);
:mod:`dpm_dist.train.checkpoint` owns the folder around it.

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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from dpm_dist import dist
from dpm_dist.config import DPMConfig, for_world_size
from dpm_dist.dist import DistEnv, device_for
from dpm_dist.model.dpm import DPMNet
from dpm_dist.train.heads import PrototypeHead, build_head
from dpm_dist.train.invariant import KeyedDropPath, global_batchnorm, key_drop_paths
from dpm_dist.train.losses import dpm_loss, loss_terms_from_config
from dpm_dist.train.optim import build_optimizers, build_scheduler
from dpm_dist.train.sharded_head import gather_rows
from dpm_dist.train.zero_reshard import load_resharded_zero_state

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


def _prepared(model: DPMNet, cfg: DPMConfig, env: DistEnv) -> DPMNet:
    """``model`` with global BatchNorm (``engine.sync_bn``, ``engine.invariant``: torch's SyncBatchNorm on CUDA,
    :class:`~dpm_dist.train.invariant.GlobalBatchNorm` on CPU/gloo) and sample-keyed drop-paths (``engine.invariant``),
    on this rank's device, compiled (``engine.compile``)."""
    invariant = cfg.engine.invariant == "on"
    if cfg.engine.sync_bn or invariant:
        global_batchnorm(model, cuda=torch.cuda.is_available())  # in place: the model itself is no BatchNorm
    if invariant:
        key_drop_paths(model.backbone.blocks)
    model = model.to(device_for(env))
    if cfg.engine.compile:
        compile_model(model, cfg.engine.compile_backend)
    return model


COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU communication op: torch builds it on first use and caches it


def comm_op_to_build() -> str | None:
    """The folder DeepSpeed is about to build its CPU communication op into (``TORCH_EXTENSIONS_DIR``, else
    ``~/.cache/torch_extensions/<python, torch build>/``), or None when it is built there already or not needed
    (CUDA, or a DeepSpeed installed with the op prebuilt). torch's build folder is a private function: any
    surprise there is None (no message), never an error."""
    if torch.cuda.is_available():
        return None
    try:
        from deepspeed.git_version_info import installed_ops
        from torch.utils.cpp_extension import _get_build_directory

        if installed_ops.get(COMM_OP, False):
            return None
        folder = str(_get_build_directory(COMM_OP, verbose=False))
    except Exception:
        return None
    return None if os.path.isfile(os.path.join(folder, f"{COMM_OP}.so")) else folder


def _wrap(
    model: DPMNet, opt_main: Any, opt_mask: Any, ds_cfg: dict[str, Any], env: DistEnv, precision: str
) -> tuple[Any, Any]:
    """The two DeepSpeed engines sharing ``model``: ``main`` over every parameter but the HMG's, ``mask`` over them."""
    import deepspeed

    folder = comm_op_to_build() if env.local_rank == 0 else None  # one line per machine
    if folder:
        log.info(
            "building DeepSpeed's CPU communication op (%s) into %s: about 100 s on 2 cores, once per machine and "
            "Python environment (later runs load it)",
            COMM_OP,
            folder,
        )
    if precision not in _AUTOCAST:
        _forget_fp16_autocast()
    engines = []
    for module, opt, params in (
        (model, opt_main, model.non_mask_parameters()),
        (model.mask_gen, opt_mask, model.mask_parameters()),
    ):
        engine, _, _, _ = deepspeed.initialize(
            model=module,
            optimizer=opt,
            model_parameters=params,
            config=dict(ds_cfg),
            dist_init_required=env.distributed,
        )
        engines.append(engine)
    _release_shm_workspace(env)
    return engines[0], engines[1]


def _release_shm_workspace(env: DistEnv) -> None:
    """Drop the names of DeepSpeed's shared-memory workspaces; the memory goes when the ranks end.

    When every rank runs on one machine (DeepSpeed's launcher sets ``LOCAL_SIZE`` to the world size), DeepSpeed's
    CPU backend maps a 66 MiB workspace per rank in ``/dev/shm`` for its inference all-reduce, named after the
    user, ``MASTER_ADDR``, ``MASTER_PORT`` and the rank, and never unlinks it: every run used to leave 66 MiB a rank
    there until the machine restarts, and a full ``/dev/shm`` ends DataLoader workers with bus errors. DeepSpeed's
    initialisation returns once a rank has mapped every peer's workspace; after a barrier no rank opens one again.
    Collective (only when ``LOCAL_SIZE`` is the world size, the same on every rank).
    """
    if env.world_size < 2 or os.environ.get("LOCAL_SIZE") != str(env.world_size) or torch.cuda.is_available():
        return
    dist.barrier()
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{env.rank}"  # DeepSpeed's shm.cpp
    with contextlib.suppress(OSError):
        os.unlink(os.path.join("/dev/shm", name))


@dataclass(frozen=True)
class EngineOptions:
    """What the update reads of the configuration (:meth:`DPMEngine.from_config` fills it in)."""

    update_mode: str = "exact"  # engine.update_mode: reference | exact | approx
    zero_stage: int = 0  # engine.zero_stage
    precision: str = "fp32"  # engine.precision: fp32 | bf16 | fp16
    gather_triplet: bool = False  # engine.gather_triplet: mine triplets over every rank's features
    loss: dict[str, Any] = field(default_factory=dict)  # the weights of dpm_loss (losses.loss_terms_from_config)
    invariant: bool = False  # engine.invariant (resolved for the world size): logged metrics are global-batch means


class DPMEngine:
    """Owns the model, the prototype head, both DeepSpeed engines and the schedules. ``step(batch)`` does one
    iteration; ``save(folder)`` / ``load(folder, saved_world_size)`` are its part of a checkpoint."""

    def __init__(
        self,
        model: DPMNet,
        head: PrototypeHead,
        *,
        main: Any,
        mask: Any,
        optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
        schedulers: tuple[Any, Any | None],
        env: DistEnv,
        options: EngineOptions,
    ) -> None:
        """``main`` / ``mask``: the DeepSpeed engines over ``model`` and ``model.mask_gen`` with the torch
        ``optimizers`` inside; ``schedulers``: theirs (the mask's None: constant lr)."""
        self.model, self.head, self.env, self.options = model, head, env, options
        self.device = device_for(env)
        self.main, self.mask = main, mask
        self.opt_main, self.opt_mask = optimizers
        self.sched_main, self.sched_mask = schedulers
        self._main_params = model.non_mask_parameters()
        self._mask_params = model.mask_parameters()
        self._buffers = list(model.buffers())  # the BN running statistics
        # engine.invariant: the drop-paths' per-sample draws, keyed by the batch's sample seeds (None: process RNG)
        self._draws = next((m.draws for m in model.modules() if isinstance(m, KeyedDropPath)), None)
        self._dtype = _AUTOCAST.get(options.precision)
        # Skipped (non-finite) iterations: in all (the loop restores it on resume), in a row, why the last one
        # skipped (() when it was applied), and every cause seen in the current streak, in order.
        self.skipped_steps, self.nonfinite_streak = 0, 0
        self.last_skip: tuple[str, ...] = ()
        self.streak_causes: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: DPMConfig, env: DistEnv, model: DPMNet) -> DPMEngine:
        """The engine ``cfg`` describes around ``model``: checks, SyncBN, device, compile, the head, both
        optimisers wrapped by DeepSpeed, the schedules."""
        cfg = for_world_size(cfg, env.world_size)  # data.global_num_ids and engine.invariant on this world size
        e = cfg.engine
        if e.update_mode == "reference" and e.zero_stage != 0:
            raise ValueError(
                "config field `engine.update_mode`: 'reference' computes every gradient in both steps, "
                "which ZeRO cannot reduce twice; use engine.zero_stage=0 (or update_mode=exact)"
            )
        model = _prepared(model, cfg, env)
        # model.classifier=sharded: this rank's prototype rows leave the model before DeepSpeed sees it (they
        # are model-parallel) and get their own optimiser (dpm_dist/train/sharded_head.py says why).
        head = build_head(model, cfg, env)
        opt_main, opt_mask = build_optimizers(model, cfg.optim)  # the frozen BNNeck bias stays out of both
        main, mask = _wrap(model, opt_main, opt_mask, deepspeed_config(cfg, env), env, e.precision)
        schedulers = (
            build_scheduler(opt_main, cfg.optim),
            build_scheduler(opt_mask, cfg.optim) if cfg.optim.schedule_mask_generator else None,
        )
        loss = dict(
            loss_terms_from_config(cfg.loss),
            hem_ref_batch=cfg.loss.hem_ref_batch if e.hem_global_batch else None,
            masked_branch=cfg.loss.masked_branch,  # off (Table 3's baseline): no step 2 (docs/method.md §4.7)
        )
        options = EngineOptions(
            e.update_mode, e.zero_stage, e.precision, e.gather_triplet, loss, invariant=e.invariant == "on"
        )
        return cls(
            model,
            head,
            main=main,
            mask=mask,
            optimizers=(opt_main, opt_mask),
            schedulers=schedulers,
            env=env,
            options=options,
        )

    # ------------------------------------------------------------------ schedule
    def start_epoch(self, epoch: int) -> None:
        """Set the learning rates of ``epoch`` (1-based), as the official per-epoch scheduler step."""
        self.sched_main.step(epoch)
        self.head.start_epoch(epoch)
        if self.sched_mask is not None:
            self.sched_mask.step(epoch)

    def learning_rates(self) -> dict[str, float]:
        out = {}
        for tag, opt in (("main", self.opt_main), ("mask", self.opt_mask), *self.head.optimizers()):
            for group in opt.param_groups:
                out[f"{tag}_{group.get('name', 'group')}"] = float(group["lr"])
        return out

    # ------------------------------------------------------------------ step
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._dtype)

    def _keyed(self, seeds: torch.Tensor | None, place: int) -> contextlib.AbstractContextManager:
        """Within: the drop-paths draw from each sample's seed at ``place`` (engine.invariant), else as before."""
        if self._draws is None or seeds is None:
            return contextlib.nullcontext()
        return self._draws.keyed(seeds, place, self.device)

    def _triplet_inputs(self, feat: torch.Tensor, pids: torch.Tensor) -> dict[str, torch.Tensor | None]:
        if not (self.options.gather_triplet and self.env.distributed):
            return {}
        # Gradient-carrying gather: each rank's features receive the gradient of the global mining.
        world = self.env.world_size
        return {"triplet_feat": gather_rows(feat, world, grad_scale=1.0), "triplet_labels": gather_rows(pids, world)}

    def _loss(self, out, pids) -> dict[str, torch.Tensor]:
        triplet = self._triplet_inputs(out.feat, pids)
        return dpm_loss(
            feat=out.feat,
            feat_bn=out.feat_bn,
            mask=out.mask,
            attn_logits=out.attn_logits,
            labels=pids,
            prototypes=None,
            id_terms=self.head.classification_terms(out.feat_bn, out.mask, pids),
            triplet_feat=triplet.get("triplet_feat"),
            triplet_labels=triplet.get("triplet_labels"),
            **self.options.loss,
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
        seeds = batch.get("sample_seeds") if self._draws is not None else None
        if self._draws is not None and seeds is None:
            raise ValueError("engine.invariant: the batch has no sample_seeds to key its drop-path draws by")
        mode = self.options.update_mode
        self.model.train()
        self.head.begin_iteration()

        # Step 1: train the holistic prototypes (and backbone); the HMG is not stepped.
        _set_requires_grad(self._main_params, True)
        _set_requires_grad(self._mask_params, mode == "reference")
        self.main.zero_grad()
        self.head.zero_grad()
        stats = [b.clone() for b in self._buffers]
        with self._autocast(), self._keyed(seeds, 1):
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
        self.head.step()  # a sharded head's own update; fp16 (the only non-stopping cause) is refused with one
        if self.options.loss.get("masked_branch") == "off":  # no masked branch: nothing trains the HMG
            self._count(main_causes)
            return self._metrics(losses, out)

        # Step 2: train the mask generator; everything else is not stepped.
        _set_requires_grad(self._main_params, mode == "reference")
        _set_requires_grad(self._mask_params, True)
        self.mask.zero_grad()
        stats = [b.clone() for b in self._buffers]
        with self._autocast(), self._keyed(seeds, 2):  # step 2's forward: fresh draws, keyed the same way
            loss2 = self._step2_loss(mode, images, camids, pids, enc, out)
        mask_causes, stop = self._update("mask", self.mask, self._mask_params, loss2, {"loss_step2": loss2})
        if mode == "reference":
            self.main.zero_grad()  # the discarded step-2 backbone grads must not leak into the next step 1
            self.head.zero_grad()
        if stop:  # step 1 stays applied (it was finite); the HMG is not updated
            return self._skipped(main_causes + mask_causes, stats, self._metrics(losses, out, loss2))
        _set_requires_grad(self._main_params, True)
        self._count(main_causes + mask_causes)  # fp16: GradScaler may have skipped an engine's update
        return self._metrics(losses, out, loss2)

    def _step2_loss(self, mode: str, images: torch.Tensor, camids: torch.Tensor, pids: torch.Tensor, enc, out):
        """Step 2's loss: the whole loss again (``reference``), else (1−α)·the masked ArcFace CE against fixed W
        of a new HMG forward on a no-grad backbone pass (``exact``) or on step 1's taps (``approx``)."""
        if mode == "reference":
            return self._loss(self.model(images, camids), pids)["loss"]
        if mode == "exact":
            with torch.no_grad():
                enc2 = self.model.encode(images, camids)
                feat_bn2 = self.model.bottleneck(enc2.feat)
            taps = enc2.taps
        else:  # approx
            taps, feat_bn2 = enc.taps.detach(), out.feat_bn.detach()
        mask2 = self.model.mask_gen(taps)
        return (1.0 - self.options.loss["alpha"]) * self.head.masked_arcface_ce(feat_bn2, mask2, pids)

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
        if self.options.invariant and self.env.distributed:
            # The mean over ranks of the local means: the global batch's (equal per-rank batches). Collective.
            keys = list(metrics)
            values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
            values = dist.all_reduce_sum(values)
            metrics = {k: float(v) / self.env.world_size for k, v in zip(keys, values.tolist())}
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
        zero = self.options.zero_stage > 0
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
        """The whole model's state dict on rank 0 (W from the head: a sharded head's rows gathered), None
        elsewhere. Collective."""
        weight = self.head.full_weight()
        if not self.env.is_main:
            return None
        return dict(self.model.state_dict(), **{"classifier.weight": weight})

    def modules(self) -> Iterator[tuple[str, Any]]:
        """The DeepSpeed engines by name (also their checkpoint sub-folder)."""
        yield "main", self.main
        yield "mask", self.mask

    def save(self, folder: str) -> None:
        """The engines' part of a checkpoint: each DeepSpeed engine's files in ``folder/<name>`` (every rank its
        ZeRO shard), then the head's own (``folder/head`` for a sharded head). Collective."""
        for name, ds_engine in self.modules():
            ds_engine.save_checkpoint(folder, tag=name, save_latest=False)
        self.head.save(folder)

    def load(self, folder: str, saved_world_size: int) -> None:
        """What :meth:`save` wrote into ``folder`` on ``saved_world_size`` ranks. Collective.

        On another world size with ZeRO >= 1 every rank reads the module weights and takes its own slice of the
        consolidated fp32 weights and optimiser state (:func:`zero_reshard.load_resharded_zero_state`).
        """
        reshard = saved_world_size != self.env.world_size and self.options.zero_stage > 0
        if reshard and self.env.is_main:
            print(
                f"resharding the ZeRO-{self.options.zero_stage} optimiser state of "
                f"{os.path.basename(os.path.normpath(folder))} from {saved_world_size} to {self.env.world_size} ranks",
                flush=True,
            )
        for name, ds_engine in self.modules():
            path, _ = ds_engine.load_checkpoint(
                folder,
                tag=name,
                load_module_only=reshard,
                load_optimizer_states=not reshard,
                load_lr_scheduler_states=False,
            )
            if path is None:
                raise RuntimeError(f"checkpoint {folder}/{name} could not be loaded")
            if reshard:
                load_resharded_zero_state(ds_engine, os.path.join(folder, name))
        self.head.load(folder, saved_world_size)  # its own files, or the slices of its rows on another world size

    def scaler_state(self) -> dict[str, Any]:
        """The fp16 GradScalers' state (DeepSpeed keeps them out of its files; the checkpoint stores it per rank)."""
        return {name: scaler.state_dict() for name, scaler in self._scalers()}

    def load_scaler_state(self, state: dict[str, Any]) -> None:
        for name, scaler in self._scalers():
            if name in state:
                scaler.load_state_dict(state[name])
