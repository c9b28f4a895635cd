"""Model-parallel prototype head (``model.classifier=sharded``; docs/training.md, "Sharded prototype head").

Rank r of R owns the rows ``[start, stop)`` of W (:func:`dpm_dist.model.dpm.prototype_rows`); nobody holds
all of it. For both classification branches:

* f_bn, the mask and the labels of every rank are all-gathered (N = R·B rows, equal B on every rank);
* every rank computes the plain logits F·W_rᵀ and the masked cosines (:func:`losses.masked_cosine`, the same
  two matrix products on its rows) of all N samples; the ArcFace margin (:func:`losses.arcface_target`) is
  applied to the target column by the rank that owns it;
* the softmax CE is distributed (:class:`_ShardCrossEntropy`): all-reduce of the row max and of the sum of
  exponentials, the target logit from its owner. Its gradient w.r.t. the local logits (softmax − one-hot)
  needs no communication.

Each branch's loss is the mean over the N samples, so W_r's gradient is rows ``[start, stop)`` of the
replicated head's rank-averaged gradient. The gathers' backward sends each rank the summed gradient of its
own rows times R: DeepSpeed then averages the backbone and HMG gradients over the R ranks, and every rank
ends with the gradient its replicated loss gives. So with the same batches a sharded run is the replicated
run up to fp32 rounding (tests/test_sharded_head.py).

The shard is trained by its own torch optimiser, not by DeepSpeed: DeepSpeed takes every parameter of its
module to be data-parallel (it broadcasts them from rank 0 at start and, at ZeRO-0, averages their gradients),
which would mix the shards. The optimiser is the main one's: same kind, the parameter-group rule of W (a
"weight": ``optim.base_lr``, ``optim.weight_decay``), the same schedule stepped at each epoch, and it steps
exactly when step 1 of the main engine is applied (a skipped non-finite step skips it too).

Partial FC (``loss.sample_rate < 1``, insightface's PartialFC_V2 rule): each iteration every rank keeps the
classes of its shard that the global batch names plus negatives drawn with a generator seeded by (seed,
iteration, rank), ``max(1, int(rate · C_r))`` rows in all. Both branches of step 1 and step 2's masked CE use
the same rows: each softmax runs over the sampled classes of every rank. An unsampled row gets a zero
gradient, so the optimiser still applies its momentum and weight decay to it, as PartialFC_V2 does.

Checkpoints: each rank saves its rows, their optimiser state and the iteration count (``head/rank_<r>.pt``);
on another world size every rank reads the slices of the files overlapping its new rows. Model files hold
the whole W, gathered onto rank 0 (:meth:`ShardedHead.full_weight`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F

from dpm_dist.dist import DistEnv
from dpm_dist.model.dpm import DPMNet, prototype_rows
from dpm_dist.train.losses import _fp32, arcface_target, masked_cosine
from dpm_dist.train.optim import build_scheduler, make_optimizer, param_groups


def _all_gather_cat(x: torch.Tensor, world_size: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size)]
    tdist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0; backward: the sum over ranks of the gradient of this rank's rows, times ``grad_scale``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, world_size: int, grad_scale: float) -> torch.Tensor:
        ctx.rows, ctx.grad_scale = x.shape[0], grad_scale
        return _all_gather_cat(x, world_size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad)  # gloo has no reduce-scatter; the gathered rows are few (R·B × D)
        return grad.narrow(0, tdist.get_rank() * ctx.rows, ctx.rows) * ctx.grad_scale, None, None


def gather_rows(x: torch.Tensor, world_size: int, *, grad_scale: float | None = None) -> torch.Tensor:
    """Every rank's ``x`` (the same shape on every rank) concatenated in rank order. Collective.

    With autograd, the backward returns to each rank the sum over ranks of its rows' gradient times ``grad_scale``
    (default ``world_size``, undoing the data-parallel average that follows).
    """
    if world_size == 1:
        return x
    if not x.requires_grad:
        return _all_gather_cat(x, world_size)
    return _GatherRows.apply(x, world_size, float(world_size if grad_scale is None else grad_scale))


def _all_reduce(t: torch.Tensor, op: Any) -> torch.Tensor:
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t, op=op)
    return t


def _targets(
    labels: torch.Tensor, start: int, width: int, rows: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) "this rank owns the label" and (N, 1) its column among the shard's ``width`` rows, or among ``rows``
    (Partial FC's sorted selection, which holds every owned label); clamped where not owned."""
    mine = (labels >= start) & (labels < start + width)
    col = (labels - start).clamp(0, width - 1)
    if rows is not None:
        col = torch.searchsorted(rows, col).clamp_max(rows.numel() - 1)
    return mine, col.view(-1, 1)


class _ShardCrossEntropy(torch.autograd.Function):
    """Per-sample softmax CE over classes spread across ranks; each rank passes its (N, C_r) logit columns.

    Returns (ce, correct), both (N,) and the same on every rank; ``correct``: the target logit is the max.
    """

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, mine: torch.Tensor, col: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        top = _all_reduce(logits.amax(1), tdist.ReduceOp.MAX)
        exp = (logits - top[:, None]).exp()
        total = _all_reduce(exp.sum(1), tdist.ReduceOp.SUM)
        target = _all_reduce(torch.where(mine, logits.gather(1, col).squeeze(1), 0.0), tdist.ReduceOp.SUM)
        ce = total.log() - (target - top)  # as log_softmax: log Σ exp(z − max) − (z_y − max)
        correct = target >= top
        ctx.save_for_backward(exp.div_(total[:, None]), mine, col)
        ctx.mark_non_differentiable(correct)
        return ce, correct

    @staticmethod
    def backward(ctx: Any, grad_ce: torch.Tensor, _grad_correct: Any) -> tuple[torch.Tensor, None, None]:
        prob, mine, col = ctx.saved_tensors
        grad = prob * grad_ce[:, None]
        grad.scatter_add_(1, col, -(grad_ce * mine).view(-1, 1))  # the one-hot, where this rank owns the label
        return grad, None, None


def shard_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    start: int,
    *,
    width: int | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE over the N rows and their accuracy. The logits' columns are this rank's classes ``start..start+width``,
    or the sampled ``rows`` of them (Partial FC; ``width`` is then the shard's size)."""
    mine, col = _targets(labels, start, logits.shape[1] if width is None else width, rows)
    ce, correct = _ShardCrossEntropy.apply(logits, mine, col)
    return ce.mean(), correct.float().mean()


def shard_masked_arcface_ce(
    feats: torch.Tensor,
    masks: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    start: int,
    *,
    margin: float,
    scale: float,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`losses.masked_arcface_ce` of all N gathered rows against this rank's prototype rows (or the sampled ``rows``)."""
    width = weight.shape[0]
    cos = masked_cosine(feats, masks, weight if rows is None else weight.index_select(0, rows))  # (N, C_r) fp32
    mine, col = _targets(labels, start, width, rows)
    cos_t = cos.gather(1, col)
    phi = torch.where(mine.view(-1, 1), arcface_target(cos_t, margin=margin), cos_t)  # not owned: unchanged
    return shard_cross_entropy(scale * cos.scatter(1, col, phi), labels, start, width=width, rows=rows)[0]


def shard_classification_terms(
    feats: torch.Tensor,
    masks: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    start: int,
    *,
    margin: float,
    scale: float,
    rows: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Step 1's ``loss_id``, ``loss_mask_id`` and ``acc`` of the N gathered rows against this rank's prototype rows
    ``weight`` (the whole shard, from class ``start``) or the sampled ``rows`` of them (:meth:`ShardedHead.classification_terms`;
    benchmarks/head_scale.py times it alone)."""
    w = weight if rows is None else weight.index_select(0, rows)  # unsampled rows: zero gradient
    loss_id, acc = shard_cross_entropy(_fp32(F.linear(feats, w)), labels, start, width=weight.shape[0], rows=rows)
    loss_mask_id = shard_masked_arcface_ce(feats, masks, weight, labels, start, margin=margin, scale=scale, rows=rows)
    return {"loss_id": loss_id, "loss_mask_id": loss_mask_id, "acc": acc.detach()}


def sample_rows(labels: torch.Tensor, start: int, width: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Partial FC's rows of one shard for one step, sorted: every class of the shard that a label of the global batch
    names (the positives), plus negatives drawn uniformly without replacement from ``generator`` up to
    ``max(1, int(rate · width))`` rows in all (insightface's rule; more when the positives alone exceed it)."""
    owned = labels[(labels >= start) & (labels < start + width)].cpu() - start
    positive = torch.unique(owned)
    num = max(1, int(rate * width))
    if positive.numel() >= num:
        return positive
    score = torch.rand(width, generator=generator)
    score[positive] = 2.0  # above every draw: the positives are always kept
    return score.topk(num).indices.sort().values


def sample_seed(seed: int, iteration: int, rank: int) -> int:
    """The negatives' seed of (``engine.seed``, iteration, rank): a resumed run draws the same rows."""
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1, np.uint64)[0] >> 1)


HEAD_DIR = "head"  # in a checkpoint folder: rank_<r>.pt, each rank's rows, optimiser state and iteration count


def _is_rows(value: Any, rows: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows


class ShardedHead:
    """This rank's prototype rows, their optimiser and schedule, and the two sharded classification terms.

    A :class:`dpm_dist.train.heads.PrototypeHead`, as the replicated head is.
    """

    def __init__(self, model: DPMNet, cfg: Any, env: DistEnv) -> None:
        self.rank, self.world_size = env.rank, env.world_size
        self.num_classes = int(model.prototypes.shape[0])
        self.start, self.stop = prototype_rows(self.num_classes, env.rank, env.world_size)
        self.weight = model.take_prototype_rows(self.start, self.stop)
        oc = cfg.optim
        groups = param_groups(
            [("classifier.weight", self.weight)],
            base_lr=oc.base_lr,
            bias_lr_factor=oc.bias_lr_factor,
            weight_decay=oc.weight_decay,
            weight_decay_bias=oc.weight_decay_bias,
        )
        self.optimizer = make_optimizer(groups, oc)
        self.scheduler = build_scheduler(self.optimizer, oc)
        self.margin, self.scale = cfg.loss.margin, cfg.loss.scale
        self.sample_rate, self.seed = cfg.loss.sample_rate, cfg.engine.seed
        self.iteration = 0  # iterations begun (seeds Partial FC's negatives; saved with the shard)
        self._rows: torch.Tensor | None = None  # this iteration's sampled rows

    # ------------------------------------------------------------------ the two classification terms
    def begin_iteration(self) -> None:
        """A new iteration: Partial FC draws new negatives (the same ones for both steps of the iteration)."""
        self.iteration += 1
        self._rows = None

    def sampled_rows(self, labels: torch.Tensor) -> torch.Tensor | None:
        """This iteration's rows of the shard (None: all of them, ``loss.sample_rate=1``); ``labels`` are global."""
        if self.sample_rate >= 1.0:
            return None
        if self._rows is None:
            gen = torch.Generator().manual_seed(sample_seed(self.seed, self.iteration, self.rank))
            self._rows = sample_rows(labels, self.start, self.stop - self.start, self.sample_rate, gen).to(
                self.weight.device
            )
        return self._rows

    def classification_terms(
        self, feat_bn: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``loss_id``, ``loss_mask_id`` and ``acc`` over the global batch (the same on every rank). Collective."""
        feats, masks = gather_rows(feat_bn, self.world_size), gather_rows(mask, self.world_size)
        labels = gather_rows(labels, self.world_size)
        return shard_classification_terms(
            feats,
            masks,
            self.weight,
            labels,
            self.start,
            margin=self.margin,
            scale=self.scale,
            rows=self.sampled_rows(labels),
        )

    def masked_arcface_ce(self, feat_bn: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Step 2's masked ArcFace CE with W held fixed: only the mask receives a gradient. Collective."""
        labels = gather_rows(labels, self.world_size)
        return shard_masked_arcface_ce(
            gather_rows(feat_bn, self.world_size),
            gather_rows(mask, self.world_size),
            self.weight.detach(),
            labels,
            self.start,
            margin=self.margin,
            scale=self.scale,
            rows=self.sampled_rows(labels),
        )

    def step(self) -> None:
        self.optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def start_epoch(self, epoch: int) -> None:
        self.scheduler.step(epoch)

    def optimizers(self) -> tuple[tuple[str, torch.optim.Optimizer], ...]:
        return (("head", self.optimizer),)

    # ------------------------------------------------------------------ checkpoints and model files
    def save(self, folder: str) -> None:
        """This rank's rows, their optimiser state and the iteration count into ``folder/head/rank_<r>.pt``."""
        os.makedirs(os.path.join(folder, HEAD_DIR), exist_ok=True)
        torch.save(
            {
                "rows": [self.start, self.stop],
                "num_classes": self.num_classes,
                "iteration": self.iteration,
                "weight": self.weight.detach().cpu(),
                "optimizer": self.optimizer.state_dict(),
            },
            os.path.join(folder, HEAD_DIR, f"rank_{self.rank}.pt"),
        )

    def load(self, folder: str, saved_world_size: int) -> None:
        """Rows ``[start, stop)`` and their optimiser state from the shards that ``saved_world_size`` ranks wrote:
        this rank's own file on the same world size, else the slices of every file overlapping its rows."""
        if saved_world_size != self.world_size and self.rank == 0:
            print(
                f"resharding the prototype head of {os.path.basename(os.path.normpath(folder))} from "
                f"{saved_world_size} to {self.world_size} ranks",
                flush=True,
            )
        pieces = []
        for rank in range(saved_world_size):
            start, stop = prototype_rows(self.num_classes, rank, saved_world_size)
            lo, hi = max(start, self.start), min(stop, self.stop)
            if lo >= hi:
                continue
            path = os.path.join(folder, HEAD_DIR, f"rank_{rank}.pt")
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)  # mmap: only the slice is read
            if state["num_classes"] != self.num_classes or list(state["rows"]) != [start, stop]:
                raise ValueError(
                    f"{path}: rows {state['rows']} of {state['num_classes']} classes, expected [{start}, {stop}) "
                    f"of {self.num_classes}"
                )
            pieces.append((state, lo - start, hi - lo))
        first = pieces[0][0]
        optim = first["optimizer"]
        param_state = {}
        for key, value in optim["state"].get(0, {}).items():
            if _is_rows(value, first["weight"].shape[0]):
                value = torch.cat([s["optimizer"]["state"][0][key].narrow(0, at, n) for s, at, n in pieces])
            param_state[key] = value.clone() if torch.is_tensor(value) else value
        weight = torch.cat([s["weight"].narrow(0, at, n) for s, at, n in pieces])
        with torch.no_grad():
            self.weight.copy_(weight)
        self.optimizer.load_state_dict(
            {"state": {0: param_state} if param_state else {}, "param_groups": optim["param_groups"]}
        )
        self.iteration, self._rows = int(first["iteration"]), None

    def full_weight(self) -> torch.Tensor | None:
        """All of W (C × D, on CPU) on rank 0, None elsewhere. Collective."""
        local = self.weight.detach()
        if self.world_size == 1:
            return local.cpu()
        widths = [
            b - a for a, b in (prototype_rows(self.num_classes, r, self.world_size) for r in range(self.world_size))
        ]
        padded = torch.zeros(max(widths), local.shape[1], dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in widths] if self.rank == 0 else None
        tdist.gather(padded, parts, dst=0)
        return torch.cat([p[:w] for p, w in zip(parts, widths)]).cpu() if self.rank == 0 else None
