"""World-size invariance (``engine.invariant``; docs/training.md, "World-size invariance"): the pieces that make a
step on R ranks compute what one rank computes on the same global batch.

* :func:`global_batchnorm`: every BatchNorm of the model (the BNNeck, the HMG's three) normalises with the
  statistics of the global batch and updates its running statistics with them, on every backend. torch's
  ``SyncBatchNorm`` runs on CUDA only (its kernels ``batch_norm_stats`` & co. have no CPU implementation), so on
  CPU (gloo) :class:`GlobalBatchNorm` does the same with plain tensor arithmetic and two collectives: the forward
  all-gathers each rank's per-channel count, mean and sum of squared deviations (combined exactly, as Chan et
  al.'s parallel variance), the backward all-reduces the per-channel sums of the output gradient and of its
  product with the normalised input, as ``SyncBatchNorm``'s backward does. One rank (or no process group) runs
  torch's own ``BatchNorm``, bit for bit.
* :func:`key_drop_paths`: every drop-path of the ViT blocks draws its per-sample keep mask from the sample's
  own seed (the loader's ``sample_seeds``, :func:`dpm_dist.data.sampling.draw_seed`) and the place of the draw
  (the forward pass, the block, the branch), never from the process RNG (timm's ``DropPath``
  ``bernoulli_``): a sample keeps or drops a branch whatever rank holds it and wherever it sits in the batch.

The gradient convention is the data-parallel one: each rank's loss is its local mean, and the ranks' gradients
are averaged (DeepSpeed). With equal per-rank batches the average of the local means is the global mean, and a
term computed on the global batch (the gathered triplet mining, a global BN's statistics) sends each rank the
sum over ranks of its inputs' gradient, which the average turns into the global gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn as nn

from dpm_dist import dist
from dpm_dist.data.sampling import draw_place_seed

# ---- global BatchNorm -------------------------------------------------------------------------------------------


def _channel_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) tensor shaped to broadcast over ``x`` (N, C, ...)."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


class _GlobalBatchNormFn(torch.autograd.Function):
    """Batch normalisation over the union of every rank's batch (fp32 arithmetic; the output in the input's dtype).

    The per-element work is torch's own fused CPU kernels: ``batch_norm`` in evaluation form with the global
    statistics (forward), ``native_batch_norm_backward`` in evaluation form for the per-channel sums and two
    ``addcmul`` for the input's gradient (backward), as ``SyncBatchNorm``'s ``batch_norm_elemt`` /
    ``batch_norm_backward_reduce`` / ``batch_norm_backward_elemt`` do on CUDA.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        eps: float,
        momentum: float,
    ) -> torch.Tensor:
        xf = x.contiguous().float()
        dims, channels = _channel_dims(x), x.shape[1]
        count = x.numel() // channels
        # two passes, the sum and then the centred squares: torch.var_mean's single Welford pass is 2-17x slower on
        # CPU for these maps (4.4 ms against 0.26 ms for the HMG's first map of a ViT-S-sized model)
        mean = xf.sum(dims) / count
        m2 = (xf - _per_channel(mean, xf)).square_().sum(dims)
        local = torch.cat([mean, m2, mean.new_full((1,), float(count))])
        parts = [torch.empty_like(local) for _ in range(tdist.get_world_size())]
        tdist.all_gather(parts, local)  # gather, not reduce: an exact combination of the ranks' variances
        stats = torch.stack(parts)  # (R, 2C + 1), the same on every rank, combined in rank order
        means, m2s, counts = stats[:, :channels], stats[:, channels : 2 * channels], stats[:, -1:]
        total = counts.sum()
        mean = (means * counts).sum(0) / total
        var = (m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)) / total
        if running_mean is not None and running_var is not None:
            with torch.no_grad():  # torch's update: the biased variance normalises, the unbiased one is tracked
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = var * (total / (total - 1).clamp_min(1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        w = weight.float() if weight is not None else torch.ones_like(mean)
        b = bias.float() if bias is not None else torch.zeros_like(mean)
        y = torch.nn.functional.batch_norm(xf, mean, var, w, b, False, 0.0, eps)  # (x − μ)/√(σ² + ε)·w + b, fused
        ctx.save_for_backward(xf, w, mean, var)
        ctx.eps, ctx.total, ctx.dtype, ctx.affine = eps, float(total), x.dtype, weight is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xf, w, mean, var = ctx.saved_tensors
        dy = grad.contiguous().float()
        # Σ dy·x̂ and Σ dy per channel (x̂ from the global statistics), one fused pass
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, xf, w, mean, var, None, None, False, ctx.eps, [False, True, True]
        )
        needs = ctx.needs_input_grad
        grad_weight = sum_dy_xhat if ctx.affine and needs[1] else None
        grad_bias = sum_dy if ctx.affine and needs[2] else None
        grad_x = None
        if needs[0]:
            channels = xf.shape[1]
            sums = torch.cat([sum_dy, sum_dy_xhat])
            tdist.all_reduce(sums)  # every rank's samples moved the statistics this rank's samples were normalised by
            mean_dy, mean_dy_xhat = sums[:channels] / ctx.total, sums[channels:] / ctx.total
            invstd = torch.rsqrt(var + ctx.eps)
            # dx = w·invstd·(dy − mean(dy) − x̂·mean(dy·x̂)) = a·dy + b·x + c, per channel
            a = w * invstd
            b = -a * invstd * mean_dy_xhat
            c = -a * mean_dy - b * mean
            grad_x = torch.addcmul(_per_channel(c, xf), xf, _per_channel(b, xf))
            grad_x = grad_x.addcmul_(dy, _per_channel(a, xf)).to(ctx.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm (1d, 2d, ...) whose training statistics are those of the global batch, on any backend.

    Evaluation, and training without a process group of more than one rank, is torch's BatchNorm unchanged.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_active()):
            return super().forward(input)
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as torch's BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        track = self.track_running_stats
        return _GlobalBatchNormFn.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.eps,
            momentum,
        )


def _global_copy(bn: nn.modules.batchnorm._BatchNorm, cuda: bool) -> nn.Module:
    """``bn`` as a global BatchNorm sharing its parameters and buffers (names and state dict unchanged)."""
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(bn)  # torch's fused CUDA kernels
    new = GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias  # the same Parameter objects: requires_grad (BNNeck bias) kept
    new.running_mean, new.running_var, new.num_batches_tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
    new.train(bn.training)
    return new


def global_batchnorm(module: nn.Module, *, cuda: bool = False) -> nn.Module:
    """``module`` with every BatchNorm replaced by a global one (``cuda``: torch's ``SyncBatchNorm``, for a module
    that will run on CUDA; else :class:`GlobalBatchNorm`), in place for children; returns the (maybe new) module."""
    done = (GlobalBatchNorm, nn.SyncBatchNorm)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, done):
        return _global_copy(module, cuda)
    for name, child in module.named_children():
        new = global_batchnorm(child, cuda=cuda)
        if new is not child:
            setattr(module, name, new)
    return module


# ---- sample-keyed drop-path ------------------------------------------------------------------------------------


class SampleDraws:
    """The per-sample uniforms of the forward pass under way: row b holds sample b's draws, one per place."""

    def __init__(self, num_places: int) -> None:
        self.num_places = num_places
        self.uniforms: torch.Tensor | None = None

    def for_samples(self, seeds: torch.Tensor, place: int) -> torch.Tensor:
        """(B, num_places) uniforms in [0, 1): sample b's from its own generator, seeded by (its seed, ``place``)."""
        rows = [
            torch.rand(self.num_places, generator=torch.Generator().manual_seed(draw_place_seed(int(s), place)))
            for s in seeds.tolist()
        ]
        return torch.stack(rows) if rows else torch.empty(0, self.num_places)

    @contextlib.contextmanager
    def keyed(self, seeds: torch.Tensor, place: int, device: torch.device) -> Iterator[None]:
        """Within: the drop-paths draw from ``seeds`` (one per sample of the batch) at ``place`` (the pass)."""
        self.uniforms = self.for_samples(seeds, place).to(device)
        try:
            yield
        finally:
            self.uniforms = None


class KeyedDropPath(nn.Module):
    """timm's ``DropPath`` (per-sample stochastic depth, kept paths scaled by 1/keep) with each sample's keep mask
    drawn from its own seed: uniform ``u`` at this module's place, kept when ``u < keep_prob``."""

    def __init__(self, drop_prob: float, scale_by_keep: bool, draws: SampleDraws, place: int) -> None:
        super().__init__()
        self.drop_prob, self.scale_by_keep, self.place = float(drop_prob), scale_by_keep, place
        self.draws = draws

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        uniforms = self.draws.uniforms
        if uniforms is None or uniforms.shape[0] != x.shape[0]:
            raise RuntimeError(
                "engine.invariant: a training forward without the batch's sample seeds (DPMEngine.step sets them)"
            )
        keep_prob = 1.0 - self.drop_prob
        mask = (uniforms[:, self.place] < keep_prob).to(x.dtype).view(x.shape[0], *([1] * (x.dim() - 1)))
        if keep_prob > 0.0 and self.scale_by_keep:
            mask = mask.div_(keep_prob)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:0.3f}, place={self.place}"


def key_drop_paths(blocks: nn.Module) -> SampleDraws | None:
    """Replace every timm ``DropPath`` under ``blocks`` by a :class:`KeyedDropPath`, each with its own place;
    returns the draws they share (None: there is none, e.g. ``model.drop_path=0``)."""
    from timm.layers import DropPath

    found = [(parent, name, child) for parent in blocks.modules() for name, child in parent.named_children()]
    drops = [(parent, name, child) for parent, name, child in found if isinstance(child, DropPath)]
    if not drops:
        return None
    draws = SampleDraws(len(drops))
    for place, (parent, name, child) in enumerate(drops):
        setattr(parent, name, KeyedDropPath(child.drop_prob, child.scale_by_keep, draws, place))
    return draws
