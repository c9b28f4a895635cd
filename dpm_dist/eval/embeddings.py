"""The rows an evaluation passes around: each sample's key, role, identity, camera, feature and mask.

Its own module so that the evaluator (:mod:`dpm_dist.eval.evaluator`), the gallery-sharded path
(:mod:`dpm_dist.eval.sharded`) and deployment can all name the type without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Embeddings:
    """Test-time outputs of a set of samples; rows line up with ``keys``."""

    keys: list[str]
    roles: list[str]
    pids: torch.Tensor  # (N,) int64
    camids: torch.Tensor  # (N,) int64
    feats: torch.Tensor  # (N, D) feature before the BNNeck
    masks: torch.Tensor  # (N, D) HMG mask

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, index: list[int]) -> Embeddings:
        rows = torch.as_tensor(index, dtype=torch.long, device=self.feats.device)
        return Embeddings(
            [self.keys[i] for i in index],
            [self.roles[i] for i in index],
            self.pids[rows],
            self.camids[rows],
            self.feats[rows],
            self.masks[rows],
        )
