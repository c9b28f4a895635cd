"""The prototype head W behind one interface, chosen once (:func:`build_head`) from ``model.classifier``.

* ``replicated`` (the paper's default, :class:`ReplicatedHead`): W is the model's ``classifier.weight``, inside
  the main DeepSpeed engine, which trains, saves and loads it with every other parameter. The head only computes
  the classification terms; everything else it is asked to do is already done by the engine.
* ``sharded`` (:class:`dpm_dist.train.sharded_head.ShardedHead`): each rank owns rows of W outside DeepSpeed,
  with its own optimiser, schedule and checkpoint files.

The engine and the checkpoint code call the same methods on either, in the same places, so neither has a
branch on the kind of head.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from dpm_dist.dist import DistEnv
from dpm_dist.model.dpm import DPMNet
from dpm_dist.train.losses import branch_options, classification_terms, masked_arcface_ce


class PrototypeHead(Protocol):
    """What the engine asks of W: the classification terms of both steps, its own update, its own state."""

    def begin_iteration(self) -> None:
        """A new iteration begins (Partial FC draws its rows here)."""

    def classification_terms(
        self, feat_bn: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Step 1's ``loss_id``, ``loss_mask_id`` and ``acc`` (gradients reach W, f_bn and the mask)."""

    def masked_arcface_ce(self, feat_bn: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Step 2's masked ArcFace CE with W held fixed."""

    def step(self) -> None:
        """Apply W's update, when it is not the main engine's (called once step 1 was applied)."""

    def zero_grad(self) -> None: ...

    def start_epoch(self, epoch: int) -> None: ...

    def optimizers(self) -> tuple[tuple[str, torch.optim.Optimizer], ...]:
        """``(tag, optimiser)`` of W when it has its own (for the logged learning rates)."""

    def save(self, folder: str) -> None:
        """W's own state into a checkpoint folder (nothing when DeepSpeed saves it). Every rank calls it."""

    def load(self, folder: str, saved_world_size: int) -> None:
        """W's own state from a checkpoint folder that ``saved_world_size`` ranks wrote. Every rank calls it."""

    def full_weight(self) -> torch.Tensor | None:
        """All of W (C × D) for model files, on rank 0 at least. Collective."""


class ReplicatedHead:
    """W inside the DeepSpeed-wrapped model: the main engine updates, saves and loads it; this only computes."""

    def __init__(self, model: DPMNet, *, margin: float, scale: float, branches: dict[str, str] | None = None) -> None:
        """``branches``: the ablations of :func:`losses.branch_options` (docs/method.md §4.7); None: the paper's."""
        self.model, self.margin, self.scale = model, margin, scale
        self.branches = branches or {}

    def begin_iteration(self) -> None:
        pass

    def classification_terms(
        self, feat_bn: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return classification_terms(
            feat_bn, mask, self.model.prototypes, labels, margin=self.margin, scale=self.scale, **self.branches
        )

    def masked_arcface_ce(self, feat_bn: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        masked = {k: v for k, v in self.branches.items() if k != "plain_branch"}
        return masked_arcface_ce(
            feat_bn, mask, self.model.prototypes.detach(), labels, margin=self.margin, scale=self.scale, **masked
        )

    def step(self) -> None:
        pass  # the main engine's step

    def zero_grad(self) -> None:
        pass  # the main engine's zero_grad

    def start_epoch(self, epoch: int) -> None:
        pass  # the main engine's schedule

    def optimizers(self) -> tuple[tuple[str, torch.optim.Optimizer], ...]:
        return ()

    def save(self, folder: str) -> None:
        pass  # in the main engine's files

    def load(self, folder: str, saved_world_size: int) -> None:
        pass  # with the main engine's files

    def full_weight(self) -> torch.Tensor:
        return self.model.prototypes.detach()


def build_head(model: DPMNet, cfg: Any, env: DistEnv) -> PrototypeHead:
    """The head ``model.classifier`` names. ``sharded`` takes this rank's rows of W out of ``model``, so call it
    before the model's parameters are handed to an optimiser or to DeepSpeed."""
    if cfg.model.classifier == "sharded":
        from dpm_dist.train.sharded_head import ShardedHead

        return ShardedHead(model, cfg, env)
    return ReplicatedHead(model, margin=cfg.loss.margin, scale=cfg.loss.scale, branches=branch_options(cfg.loss))
