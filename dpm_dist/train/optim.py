"""Optimisers and the learning-rate schedule of the official code (docs/method.md §5.1-5.2).

Two SGD optimisers (AdamW as an option): one for everything but the HMG ("main"), one for the HMG ("mask"). The
official code makes one group per tensor; groups here are merged by (lr, weight decay), which is the
same update. Biases get ``base_lr × bias_lr_factor`` and ``weight_decay_bias``; nothing else is
exempt from weight decay (no LayerNorm/pos_embed exemption, as in the official code).

The schedule is timm's ``CosineLRScheduler`` stepped once per epoch with t = epoch (1-based), warmup
from ``base_lr·warmup_lr_factor``, floor ``base_lr·min_lr_factor``. Only the main optimiser is
scheduled by default: the official HMG optimiser runs at a constant lr (``optim.schedule_mask_generator``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from dpm_dist.model.dpm import DPMNet


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]],
    *,
    base_lr: float,
    bias_lr_factor: float,
    weight_decay: float,
    weight_decay_bias: float,
    all_bias_decay: bool = False,
) -> list[dict[str, Any]]:
    """SGD groups: weights at ``base_lr``/``weight_decay``; names containing 'bias' at the bias settings.

    ``all_bias_decay`` gives every parameter ``weight_decay_bias`` (the official HMG optimiser).
    """
    weights: list[nn.Parameter] = []
    biases: list[nn.Parameter] = []
    for name, param in named:
        if param.requires_grad:
            (biases if "bias" in name else weights).append(param)
    wd = weight_decay_bias if all_bias_decay else weight_decay
    groups = [
        {"params": weights, "lr": base_lr, "weight_decay": wd, "name": "weight"},
        {"params": biases, "lr": base_lr * bias_lr_factor, "weight_decay": weight_decay_bias, "name": "bias"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizers(model: DPMNet, optim_cfg: Any) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """(main, mask) optimisers over ``model.non_mask_parameters()`` and ``model.mask_parameters()``.

    ``optim.name=sgd`` (default) is the official SGD; ``adamw`` uses the same groups with AdamW
    (decoupled weight decay; ``momentum`` unused), for ViTs trained from scratch, where SGD barely
    fits the training set (the tiny CPU demo has no ImageNet weights to start from).
    """
    mask_ids = {id(p) for p in model.mask_parameters()}
    named = list(model.named_parameters())
    common = dict(
        base_lr=optim_cfg.base_lr,
        bias_lr_factor=optim_cfg.bias_lr_factor,
        weight_decay=optim_cfg.weight_decay,
        weight_decay_bias=optim_cfg.weight_decay_bias,
    )
    main = param_groups([(n, p) for n, p in named if id(p) not in mask_ids], **common)
    mask = param_groups([(n, p) for n, p in named if id(p) in mask_ids], all_bias_decay=True, **common)
    return make_optimizer(main, optim_cfg), make_optimizer(mask, optim_cfg)


def make_optimizer(groups: list[dict[str, Any]], optim_cfg: Any) -> torch.optim.Optimizer:
    """The configured optimiser (SGD or AdamW) over ``groups`` (:func:`param_groups`)."""
    # optim.fused: one fused kernel per step instead of torch's default multi-tensor (foreach) loop; the
    # same formula, rounded in another order, so it is off by default.
    fused: dict[str, Any] = {"fused": True} if optim_cfg.fused else {}
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim_cfg.base_lr, **fused)
    return torch.optim.SGD(
        groups, lr=optim_cfg.base_lr, momentum=optim_cfg.momentum, dampening=0.0, nesterov=False, **fused
    )


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: Any):
    """timm CosineLRScheduler with the official arguments; call ``.step(epoch)`` at each epoch start."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(
        optimizer,
        t_initial=optim_cfg.epochs,
        lr_min=optim_cfg.base_lr * optim_cfg.min_lr_factor,
        warmup_t=optim_cfg.warmup_epochs,
        warmup_lr_init=optim_cfg.base_lr * optim_cfg.warmup_lr_factor,
        cycle_limit=1,
        t_in_epochs=True,
    )
