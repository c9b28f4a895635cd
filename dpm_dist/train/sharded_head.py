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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from dpm_dist.dist import DistEnv
from dpm_dist.model.dpm import DPMNet, prototype_rows
from dpm_dist.train.losses import _fp32, arcface_target, masked_cosine
from dpm_dist.train.optim import build_scheduler, make_optimizer, param_groups


def gather_rows(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's ``x`` (the same shape on every rank) concatenated in rank order. Collective.

    With autograd, the backward returns to each rank the sum over ranks of its rows' gradient times
    ``world_size`` (undoing the data-parallel average that follows).
    """
    if world_size == 1:
        return x
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(world_size)]
        tdist.all_gather(parts, x.contiguous())
        return torch.cat(parts)
    from torch.distributed.nn.functional import all_gather

    out = torch.cat(all_gather(x))
    out.register_hook(lambda grad: grad * world_size)
    return out


def _all_reduce(t: torch.Tensor, op: Any) -> torch.Tensor:
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t, op=op)
    return t


def _target_column(labels: torch.Tensor, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) "this rank owns the label" and (N, 1) the label's local column (clamped where not owned)."""
    mine = (labels >= start) & (labels < start + width)
    return mine, (labels - start).clamp(0, width - 1).view(-1, 1)


class _ShardCrossEntropy(torch.autograd.Function):
    """Per-sample softmax CE over classes spread across ranks; each rank passes its (N, C_r) logit columns.

    Returns (ce, correct), both (N,) and the same on every rank; ``correct``: the target logit is the max.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        mine, col = _target_column(labels, start, logits.shape[1])
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


def shard_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE over the N rows and their accuracy, the logits' columns being classes ``start..`` of this rank."""
    ce, correct = _ShardCrossEntropy.apply(logits, labels, start)
    return ce.mean(), correct.float().mean()


def shard_masked_arcface_ce(feats: torch.Tensor, masks: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, start: int,
                            *, margin: float, scale: float) -> torch.Tensor:
    """:func:`losses.masked_arcface_ce` of all N gathered rows against this rank's prototype rows."""
    cos = masked_cosine(feats, masks, weight)  # (N, C_r) fp32
    mine, col = _target_column(labels, start, cos.shape[1])
    cos_t = cos.gather(1, col)
    phi = torch.where(mine.view(-1, 1), arcface_target(cos_t, margin=margin), cos_t)  # not owned: unchanged
    return shard_cross_entropy(scale * cos.scatter(1, col, phi), labels, start)[0]


class ShardedHead:
    """This rank's prototype rows, their optimiser and schedule, and the two sharded classification terms."""

    def __init__(self, model: DPMNet, cfg: Any, env: DistEnv) -> None:
        if cfg.engine.precision == "fp16":
            raise ValueError("config field `engine.precision`: fp16's loss scaling does not cover the sharded head's "
                             "optimiser; use bf16 or fp32 with model.classifier=sharded")
        if cfg.engine.gradient_clipping > 0:
            raise ValueError("config field `engine.gradient_clipping`: the global norm would leave out the sharded "
                             "prototypes; use 0 with model.classifier=sharded")
        self.world_size = env.world_size
        self.num_classes = int(model.prototypes.shape[0])
        self.start, self.stop = prototype_rows(self.num_classes, env.rank, env.world_size)
        self.weight = model.take_prototype_rows(self.start, self.stop)
        oc = cfg.optim
        groups = param_groups([("classifier.weight", self.weight)], base_lr=oc.base_lr, bias_lr_factor=oc.bias_lr_factor,
                              weight_decay=oc.weight_decay, weight_decay_bias=oc.weight_decay_bias)
        self.optimizer = make_optimizer(groups, oc)
        self.scheduler = build_scheduler(self.optimizer, oc)
        self.margin, self.scale = cfg.loss.margin, cfg.loss.scale

    def classification_terms(self, feat_bn: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss_id``, ``loss_mask_id`` and ``acc`` over the global batch (the same on every rank). Collective."""
        feats, masks = gather_rows(feat_bn, self.world_size), gather_rows(mask, self.world_size)
        labels = gather_rows(labels, self.world_size)
        loss_id, acc = shard_cross_entropy(_fp32(F.linear(feats, self.weight)), labels, self.start)
        loss_mask_id = shard_masked_arcface_ce(feats, masks, self.weight, labels, self.start, margin=self.margin, scale=self.scale)
        return {"loss_id": loss_id, "loss_mask_id": loss_mask_id, "acc": acc.detach()}

    def masked_arcface_ce(self, feat_bn: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Step 2's masked ArcFace CE with W held fixed: only the mask receives a gradient. Collective."""
        return shard_masked_arcface_ce(gather_rows(feat_bn, self.world_size), gather_rows(mask, self.world_size),
                                       self.weight.detach(), gather_rows(labels, self.world_size), self.start,
                                       margin=self.margin, scale=self.scale)

    def step(self) -> None:
        self.optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def start_epoch(self, epoch: int) -> None:
        self.scheduler.step(epoch)
