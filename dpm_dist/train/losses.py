"""DPM losses as pure functions (docs/method.md §3, §4.3-4.6): no process group, no config objects, no devices.

    L = α·CE(f_bn·Wᵀ, y) + (1−α)·CE(ArcFace(masked_cos(f_bn, m, W)), y) + β·L_hem(A) + w_tri·L_tri(f)

The cosine, ArcFace, HEM and triplet arithmetic runs in fp32 even under autocast (float64 inputs stay
float64, which the parity tests use). Only the masked ArcFace term depends on the mask generator, so
the engine's step-2 update backpropagates :func:`masked_arcface_ce` alone (docs/method.md §5.4).

Cross-rank behaviour is the caller's choice, expressed through plain arguments: ``hem_ref_batch``
fixes the HEM scale whatever the per-rank batch (docs/method.md §5.6), and ``triplet_feat``/``triplet_labels``
let the engine pass features all-gathered from every rank for the mining.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from dpm_dist.config import MASK_PLACEMENTS

if TYPE_CHECKING:
    from dpm_dist.config import LossConfig

HEM_EPS = 1e-6  # inside the square root of the row norm, as the official featureL2Norm
NORM_EPS = 1e-12  # F.normalize's clamp, also used for the masked-prototype norm
DIST_EPS = 1e-12  # squared-distance clamp before the square root (TransReID euclidean_dist)


def _no_autocast(t: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=t.device.type, enabled=False)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 → fp32; fp32 and fp64 are kept."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def masked_cosine(
    feat_bn: torch.Tensor, mask: torch.Tensor, prototypes: torch.Tensor, placement: str = "P_n"
) -> torch.Tensor:
    """Cosine between each feature and every prototype masked by that sample's mask (docs/method.md §4.4).

    Equals the official per-sample loop ``⟨f̂_b, normalize(m_b ⊙ Ŵ_c)⟩`` with two matmuls:
    ``((f̂ ⊙ m) · Ŵᵀ) ⊘ max(√((m ⊙ m) · (Ŵ ⊙ Ŵ)ᵀ), 1e-12)``; no (B, C, D) tensor is formed.

    ``placement`` (``loss.mask_placement``, paper Table 5, docs/method.md §4.7): ``P_n`` (the final model,
    above); ``P_n+F_n`` masks the feature too, renormalised: ``⟨normalize(m ⊙ f̂), normalize(m ⊙ Ŵ_c)⟩``;
    ``P`` and ``P+F`` apply the mask to the normalised vectors without renormalising:
    ``⟨f̂, m ⊙ Ŵ_c⟩`` and ``⟨m ⊙ f̂, m ⊙ Ŵ_c⟩``.

    Args:
        feat_bn: (B, D) features after the BNNeck.
        mask: (B, D) mask-generator output in (0, 1).
        prototypes: (C, D) classifier weight W.
        placement: where the mask acts: P_n | P | P_n+F_n | P+F.

    Returns:
        (B, C) cosines in fp32 (fp64 for fp64 inputs).
    """
    if placement not in MASK_PLACEMENTS:
        raise ValueError(f"unknown mask placement {placement!r}; expected one of {', '.join(MASK_PLACEMENTS)}")
    with _no_autocast(feat_bn):
        f = F.normalize(_fp32(feat_bn), dim=1, eps=NORM_EPS)  # (B, D)
        w = F.normalize(_fp32(prototypes), dim=1, eps=NORM_EPS)  # (C, D)
        m = _fp32(mask)  # (B, D)
        if placement in ("P", "P+F"):  # the mask scales the unit vectors; nothing renormalises them
            return ((f * m * m) if placement == "P+F" else (f * m)) @ w.t()
        if placement == "P_n+F_n":
            f = F.normalize(f * m, dim=1, eps=NORM_EPS)  # the masked feature, renormalised
        num = (f * m) @ w.t()  # (B, C)
        den = ((m * m) @ (w * w).t()).sqrt().clamp_min(NORM_EPS)  # (B, C) = ‖m_b ⊙ Ŵ_c‖
        return num / den


def plain_cosine(feat_bn: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(B, C) cosines of the features and the unmasked prototypes in fp32 (``loss.plain_branch=arcface``)."""
    with _no_autocast(feat_bn):
        f = F.normalize(_fp32(feat_bn), dim=1, eps=NORM_EPS)
        return f @ F.normalize(_fp32(prototypes), dim=1, eps=NORM_EPS).t()


def arcface_logits(cos: torch.Tensor, labels: torch.Tensor, *, margin: float, scale: float) -> torch.Tensor:
    """Insightface ArcFace logits (easy_margin off, no label smoothing), computed in fp32.

    The target column becomes ``s·cos(θ+m)`` where ``cos θ > cos(π−m)`` and ``s·(cos θ − m·sin m)``
    elsewhere; the other columns are ``s·cos θ``. The sine is ``√(1−cos²)`` clamped at 0, unlike the
    official MArcface whose unclamped sine turns a rounded cos > 1 into NaN.

    Args:
        cos: (B, C) cosines.
        labels: (B,) class indices.
        margin: additive angular margin m.
        scale: logit scale s.

    Returns:
        (B, C) logits in fp32 (fp64 for fp64 inputs).
    """
    with _no_autocast(cos):
        cos = _fp32(cos)
        index = labels.view(-1, 1)
        # Target column only: the margin never touches the rest.
        return scale * cos.scatter(1, index, arcface_target(cos.gather(1, index), margin=margin))


def arcface_target(cos_t: torch.Tensor, *, margin: float) -> torch.Tensor:
    """The target column of :func:`arcface_logits` before the scale, from the target cosines ``cos_t``.

    Separate so that a sharded head applies it on the rank that owns each target class.
    """
    th = math.cos(math.pi - margin)
    mm = math.sin(math.pi - margin) * margin
    sin_sq = 1.0 - cos_t * cos_t
    positive = sin_sq > 0
    # Double where: sine = 0 at |cos| >= 1 with a zero (not inf/NaN) gradient through the sqrt.
    sine = torch.where(positive, sin_sq.where(positive, 1.0).sqrt(), 0.0)
    phi = cos_t * math.cos(margin) - sine * math.sin(margin)
    return torch.where(cos_t > th, phi, cos_t - mm)


def masked_arcface_ce(
    feat_bn: torch.Tensor,
    mask: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float,
    scale: float,
    masked_branch: str = "arcface",
    mask_placement: str = "P_n",
) -> torch.Tensor:
    """CE of the masked ArcFace logits ("L_M-cls"), mean over the batch: the only mask-dependent term.

    Args:
        feat_bn: (B, D) features after the BNNeck.
        mask: (B, D) mask-generator output.
        prototypes: (C, D) classifier weight W.
        labels: (B,) class indices.
        margin: ArcFace m.
        scale: ArcFace s.
        masked_branch: ``arcface`` (the paper) or ``softmax``: the logits ``s·cos``, no margin (Table 4's S).
        mask_placement: see :func:`masked_cosine`.

    Returns:
        Scalar loss in fp32.
    """
    cos = masked_cosine(feat_bn, mask, prototypes, mask_placement)
    if masked_branch == "arcface":
        logits = arcface_logits(cos, labels, margin=margin, scale=scale)
    elif masked_branch == "softmax":
        logits = scale * cos
    else:
        raise ValueError(f"masked branch {masked_branch!r} has no loss; expected arcface or softmax")
    return F.cross_entropy(logits, labels)


def hem_loss(attn_logits: torch.Tensor, *, ref_batch: int | None = 64) -> torch.Tensor:
    """Head Enrich Module loss (docs/method.md §3.2): heads pushed towards orthogonal CLS→patch attention.

    Rows are normalised as ``A / √(Σ_p A² + 1e-6)``, ``G_b = Â_b Â_bᵀ`` and the per-sample term is
    ``‖G_b − I‖²_F``. The official code sums it over the batch and divides by H². Here the sum is
    taken over ``ref_batch`` samples: ``(ref_batch / H²) · mean_b ‖G_b − I‖²_F``, so the weight does
    not drift with the per-rank batch size; under gradient averaging across ranks it is the official
    value of a ``ref_batch``-sample batch (equal to it exactly when the local batch is ``ref_batch``).

    Args:
        attn_logits: (B, H, P) last-block CLS→patch attention logits before the softmax.
        ref_batch: number of samples the sum stands for; None gives the official plain sum over the
            local batch.

    Returns:
        Scalar loss in fp32.
    """
    with _no_autocast(attn_logits):
        a = _fp32(attn_logits)  # (B, H, P)
        num_heads = a.shape[1]
        a_hat = a / (a.pow(2).sum(-1, keepdim=True) + HEM_EPS).sqrt()
        gram = a_hat @ a_hat.transpose(1, 2)  # (B, H, H)
        eye = torch.eye(num_heads, dtype=a.dtype, device=a.device)
        per_sample = (gram - eye).pow(2).sum((1, 2))  # (B,)
        total = per_sample.sum() if ref_batch is None else ref_batch * per_sample.mean()
        return total / num_heads**2


def batch_hard_distances(feat: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hardest positive and hardest negative Euclidean distance of every anchor (docs/method.md §4.5).

    Distances use ``√(max(‖a‖² + ‖b‖² − 2ab, 1e-12))`` over the full N×N matrix; the diagonal counts as
    a positive (at distance 1e-6, so it never wins the max when the anchor has another positive).

    Args:
        feat: (N, D) features before the BNNeck, not normalised.
        labels: (N,) identities.

    Returns:
        ``(d_ap, d_an)``, each (N,) in fp32.
    """
    with _no_autocast(feat):
        x = _fp32(feat)
        sq = x.pow(2).sum(1)  # (N,)
        dist = (sq[:, None] + sq[None, :] - 2.0 * x @ x.t()).clamp_min(DIST_EPS).sqrt()  # (N, N)
        same = labels[:, None] == labels[None, :]
        d_ap = dist.masked_fill(~same, float("-inf")).max(dim=1).values
        d_an = dist.masked_fill(same, float("inf")).min(dim=1).values
        return d_ap, d_an


def soft_margin_triplet(feat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft-margin batch-hard triplet loss ``mean_i log(1 + exp(d_ap(i) − d_an(i)))``.

    Args:
        feat: (N, D) features before the BNNeck.
        labels: (N,) identities; every anchor needs a positive and a negative (P×K batches).

    Returns:
        Scalar loss in fp32.
    """
    d_ap, d_an = batch_hard_distances(feat, labels)
    # softplus is the stable form of SoftMarginLoss(d_an − d_ap, 1).
    return F.softplus(d_ap - d_an).mean()


def classification_terms(
    feat_bn: torch.Tensor,
    mask: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float,
    scale: float,
    plain_branch: str = "softmax",
    masked_branch: str = "arcface",
    mask_placement: str = "P_n",
) -> dict[str, torch.Tensor]:
    """``loss_id`` (plain CE of f_bn·Wᵀ), ``loss_mask_id`` (masked ArcFace CE) and the detached plain ``acc``.

    The ablations of docs/method.md §4.7: ``plain_branch=arcface`` makes ``loss_id`` the ArcFace CE of the
    unmasked cosines (``acc`` then from the cosines); ``masked_branch=softmax`` drops the margin of the masked
    branch; ``masked_branch=off`` makes ``loss_mask_id`` a constant 0 (no mask-dependent term).
    """
    if plain_branch == "softmax":
        logits = _fp32(F.linear(feat_bn, prototypes))  # (B, C) raw dot products: no norm, no scale
        loss_id = F.cross_entropy(logits, labels)
    elif plain_branch == "arcface":
        logits = plain_cosine(feat_bn, prototypes)
        loss_id = F.cross_entropy(arcface_logits(logits, labels, margin=margin, scale=scale), labels)
    else:
        raise ValueError(f"unknown plain branch {plain_branch!r}; expected softmax or arcface")
    if masked_branch == "off":
        loss_mask_id = torch.zeros((), dtype=logits.dtype, device=logits.device)
    else:
        loss_mask_id = masked_arcface_ce(
            feat_bn,
            mask,
            prototypes,
            labels,
            margin=margin,
            scale=scale,
            masked_branch=masked_branch,
            mask_placement=mask_placement,
        )
    return {
        "loss_id": loss_id,
        "loss_mask_id": loss_mask_id,
        "acc": (logits.detach().argmax(1) == labels).float().mean(),
    }


def dpm_loss(
    *,
    feat: torch.Tensor,
    feat_bn: torch.Tensor,
    mask: torch.Tensor,
    attn_logits: torch.Tensor,
    prototypes: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    margin: float,
    scale: float,
    triplet_weight: float = 1.0,
    hem_ref_batch: int | None = 64,
    triplet_feat: torch.Tensor | None = None,
    triplet_labels: torch.Tensor | None = None,
    id_terms: dict[str, torch.Tensor] | None = None,
    masked_branch: str = "arcface",
) -> dict[str, torch.Tensor]:
    """The full DPM objective (docs/method.md §4.6) and its named terms.

    Args:
        feat: (B, D) features before the BNNeck (triplet input).
        feat_bn: (B, D) features after the BNNeck (classifier input).
        mask: (B, D) mask-generator output.
        attn_logits: (B, H, P) HEM input.
        prototypes: (C, D) classifier weight W, shared by both classification branches.
        labels: (B,) class indices.
        alpha: weight of the plain CE; the masked ArcFace CE gets 1 − alpha.
        beta: HEM weight.
        margin: ArcFace m.
        scale: ArcFace s.
        triplet_weight: triplet weight.
        hem_ref_batch: see :func:`hem_loss`.
        triplet_feat: (N, D) features to mine over instead of ``feat``, e.g. all-gathered from every
            rank (the local rows among them); every row is an anchor.
        triplet_labels: (N,) identities of ``triplet_feat``.
        id_terms: the two classification terms computed elsewhere (``loss_id``, ``loss_mask_id``, ``acc``:
            a sharded head); ``prototypes`` is then unused.
        masked_branch: ``off`` (Table 3's baseline, docs/method.md §4.7): no masked term, and the plain CE
            weighs 1 instead of α; otherwise the loss of the masked branch (:func:`masked_arcface_ce`).

    Returns:
        ``loss`` (total), ``loss_id`` (plain CE), ``loss_mask_id`` (masked ArcFace CE), ``loss_hem``,
        ``loss_triplet``, the detached ``acc`` of the plain logits and the detached mean hardest
        distances ``dist_ap`` / ``dist_an``.
    """
    if (triplet_feat is None) != (triplet_labels is None):
        raise ValueError("triplet_feat and triplet_labels must be given together")
    if triplet_feat is None or triplet_labels is None:  # both None (checked above)
        triplet_feat, triplet_labels = feat, labels

    if id_terms is None:
        if prototypes is None:
            raise ValueError("dpm_loss needs the prototypes, or id_terms computed elsewhere")
        id_terms = classification_terms(
            feat_bn, mask, prototypes, labels, margin=margin, scale=scale, masked_branch=masked_branch
        )
    loss_id, loss_mask_id = id_terms["loss_id"], id_terms["loss_mask_id"]
    loss_hem = hem_loss(attn_logits, ref_batch=hem_ref_batch)
    d_ap, d_an = batch_hard_distances(triplet_feat, triplet_labels)
    loss_triplet = F.softplus(d_ap - d_an).mean()
    if masked_branch == "off":
        loss = loss_id + beta * loss_hem + triplet_weight * loss_triplet
    else:
        loss = alpha * loss_id + (1.0 - alpha) * loss_mask_id + beta * loss_hem + triplet_weight * loss_triplet
    return {
        "loss": loss,
        "loss_id": loss_id,
        "loss_mask_id": loss_mask_id,
        "loss_hem": loss_hem,
        "loss_triplet": loss_triplet,
        "acc": id_terms["acc"],
        "dist_ap": d_ap.detach().mean(),
        "dist_an": d_an.detach().mean(),
    }


def loss_terms_from_config(loss_cfg: LossConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`dpm_loss` taken from a ``LossConfig``."""
    return {
        "alpha": loss_cfg.alpha,
        "beta": loss_cfg.beta,
        "margin": loss_cfg.margin,
        "scale": loss_cfg.scale,
        "triplet_weight": loss_cfg.triplet_weight,
        "hem_ref_batch": loss_cfg.hem_ref_batch,
    }


def branch_options(loss_cfg: LossConfig) -> dict[str, str]:
    """The ablation keywords of :func:`classification_terms` taken from a ``LossConfig`` (docs/method.md §4.7)."""
    return {
        "plain_branch": loss_cfg.plain_branch,
        "masked_branch": loss_cfg.masked_branch,
        "mask_placement": loss_cfg.mask_placement,
    }
