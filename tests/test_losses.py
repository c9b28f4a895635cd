"""DPM losses against the official code's arithmetic and hand-computed values (docs/method.md §3, §4.3-4.6)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpm_dist.config import LossConfig
from dpm_dist.train.losses import (
    arcface_logits,
    batch_hard_distances,
    dpm_loss,
    hem_loss,
    loss_terms_from_config,
    masked_arcface_ce,
    masked_cosine,
    soft_margin_triplet,
)


def official_masked_cosine(feat: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The loop of the official ``MArcface.forward`` (loss/metric_learning.py), growing torch.cat included."""
    for i in range(feat.shape[0]):
        query_vector = F.normalize(feat[i, :].unsqueeze(0))
        gallery_prototype = mask[i, :].unsqueeze(0) * F.normalize(weight)
        cosine_single = F.linear(F.normalize(query_vector), F.normalize(gallery_prototype))
        cosine = cosine_single if i == 0 else torch.cat((cosine, cosine_single), 0)
    return cosine


def official_arcface(cosine: torch.Tensor, label: torch.Tensor, s: float, m: float) -> torch.Tensor:
    """The rest of ``MArcface.forward``: unclamped sine, th/mm fallback, one-hot mix."""
    sine = torch.sqrt(1.0 - torch.pow(cosine, 2))
    phi = cosine * math.cos(m) - sine * math.sin(m)
    phi = torch.where(cosine > math.cos(math.pi - m), phi, cosine - math.sin(math.pi - m) * m)
    one_hot = torch.zeros(cosine.size(), dtype=cosine.dtype).scatter_(1, label.view(-1, 1).long(), 1)
    return s * ((one_hot * phi) + ((1.0 - one_hot) * cosine))


def official_orthonomal_loss(w: torch.Tensor) -> torch.Tensor:
    """``orthonomal_loss`` of loss/make_loss.py (featureL2Norm + summed MSE / K²), without ``.cuda()``."""
    batch, heads, _ = w.shape
    w_norm = w / torch.pow(torch.sum(torch.pow(w, 2), 2) + 1e-6, 0.5).unsqueeze(2).expand_as(w)
    wwt = torch.matmul(w_norm, w_norm.transpose(1, 2))
    zeros = torch.zeros(batch, heads, heads)
    return F.mse_loss(wwt - torch.eye(heads).unsqueeze(0), zeros, reduction="sum") / (heads * heads)


def official_triplet(feat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """TransReID ``TripletLoss(margin=None)``: euclidean_dist, hard_example_mining, SoftMarginLoss."""
    n = feat.shape[0]
    xx = torch.pow(feat, 2).sum(1, keepdim=True).expand(n, n)
    dist = (xx + xx.t()).addmm(feat, feat.t(), beta=1, alpha=-2).clamp(min=1e-12).sqrt()
    is_pos = target.expand(n, n).eq(target.expand(n, n).t())
    dist_ap = torch.max(dist[is_pos].contiguous().view(n, -1), 1, keepdim=True)[0].squeeze(1)
    dist_an = torch.min(dist[~is_pos].contiguous().view(n, -1), 1, keepdim=True)[0].squeeze(1)
    return F.soft_margin_loss(dist_an - dist_ap, torch.ones_like(dist_an))


def _inputs(
    batch: int = 8,
    classes: int = 5,
    dim: int = 16,
    heads: int = 3,
    patches: int = 7,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch) // 2 % classes  # P×K with K = 2
    return {
        "feat": torch.randn(batch, dim, generator=g, dtype=dtype),
        "feat_bn": torch.randn(batch, dim, generator=g, dtype=dtype),
        "mask": torch.rand(batch, dim, generator=g, dtype=dtype),
        "attn_logits": torch.randn(batch, heads, patches, generator=g, dtype=dtype),
        "prototypes": torch.randn(classes, dim, generator=g, dtype=dtype) * 0.1,
        "labels": labels,
    }


# ---- masked cosine


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_masked_cosine_equals_the_official_loop(dtype, atol):
    x = _inputs(batch=12, classes=30, dim=64, dtype=dtype)
    got = masked_cosine(x["feat_bn"], x["mask"], x["prototypes"])
    want = official_masked_cosine(x["feat_bn"], x["mask"], x["prototypes"])
    assert got.dtype == dtype and got.shape == (12, 30)
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


def test_masked_cosine_batch_of_one():
    x = _inputs(batch=1)
    got = masked_cosine(x["feat_bn"], x["mask"], x["prototypes"])
    assert got.shape == (1, 5)
    torch.testing.assert_close(got, official_masked_cosine(x["feat_bn"], x["mask"], x["prototypes"]), atol=1e-6, rtol=0)
    logits = arcface_logits(got, x["labels"], margin=0.5, scale=30.0)
    assert logits.shape == (1, 5) and torch.isfinite(logits).all()


def test_constant_mask_gives_the_plain_cosine():
    x = _inputs()
    half = torch.full_like(x["mask"], 0.5)  # sigmoid(0): the zero-initialised HMG at step 0
    plain = F.linear(F.normalize(x["feat_bn"]), F.normalize(x["prototypes"]))
    torch.testing.assert_close(masked_cosine(x["feat_bn"], half, x["prototypes"]), plain, atol=1e-6, rtol=0)


# ---- ArcFace


def test_arcface_margin_and_fallback_branches():
    m, s = 0.5, 30.0
    th = math.cos(math.pi - m)  # -0.87758
    cos = torch.tensor([[0.3, 0.1], [th - 0.05, 0.2], [-0.99, 0.4], [0.2, 0.7]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])
    got = arcface_logits(cos, labels, margin=m, scale=s)
    want_target = [
        math.cos(math.acos(0.3) + m),  # above th: cos(θ + m)
        (th - 0.05) - m * math.sin(m),  # below th: cos − m·sin m
        -0.99 - m * math.sin(m),
        math.cos(math.acos(0.7) + m),
    ]
    torch.testing.assert_close(got[torch.arange(4), labels], s * torch.tensor(want_target, dtype=torch.float64))
    others = torch.ones_like(cos, dtype=torch.bool).scatter(1, labels[:, None], False)
    torch.testing.assert_close(got[others], s * cos[others])  # non-target columns are s·cos, no margin
    torch.testing.assert_close(got, official_arcface(cos, labels, s, m))
    assert abs(m * math.sin(m) - 0.23971) < 1e-5 and abs(th + 0.87758) < 1e-5  # docs/method.md §4.4 constants


@pytest.mark.parametrize("value", [1.0 + 1e-6, 1.0, -1.0, -1.0 - 1e-6])
def test_arcface_clamped_sine_has_no_nan(value):
    cos = torch.tensor([[value, 0.2], [0.1, value]], requires_grad=True)
    labels = torch.tensor([0, 0])  # one target at |cos| ≥ 1, one non-target at |cos| ≥ 1
    logits = arcface_logits(cos, labels, margin=0.5, scale=30.0)
    F.cross_entropy(logits, labels).backward()
    assert torch.isfinite(logits).all() and torch.isfinite(cos.grad).all()
    if value > 0:
        assert logits[0, 0].item() == pytest.approx(30.0 * value * math.cos(0.5), rel=1e-6)  # sine clamped to 0
    # What the clamp fixes: the official NaN at cos > 1 (below th the fallback branch hides it).
    assert official_arcface(cos.detach(), labels, 30.0, 0.5).isnan().any() == (value > 1)


def test_arcface_is_fp32_under_bf16_autocast():
    x = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos = masked_cosine(x["feat_bn"].bfloat16(), x["mask"].bfloat16(), x["prototypes"].bfloat16())
        logits = arcface_logits(cos.bfloat16(), x["labels"], margin=0.5, scale=30.0)
        out = dpm_loss(
            **{k: v.bfloat16() if v.is_floating_point() else v for k, v in x.items()},
            alpha=0.5,
            beta=0.1,
            margin=0.5,
            scale=30.0,
        )
    assert cos.dtype == logits.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.values())


def test_masked_arcface_gradcheck_wrt_mask():
    x = _inputs(batch=3, classes=4, dim=5, dtype=torch.float64)
    mask = x["mask"].clone().requires_grad_(True)

    def fn(m: torch.Tensor) -> torch.Tensor:
        return masked_arcface_ce(x["feat_bn"], m, x["prototypes"], x["labels"] % 4, margin=0.5, scale=30.0)

    assert torch.autograd.gradcheck(fn, (mask,))


# ---- HEM


def test_hem_closed_formula_at_reference_batch():
    x = _inputs(batch=6, heads=4, patches=9, dtype=torch.float64)
    a = x["attn_logits"]
    want = 0.0
    for b in range(6):
        norms = [math.sqrt(float((a[b, i] ** 2).sum()) + 1e-6) for i in range(4)]
        for i in range(4):
            for j in range(4):
                g = float(a[b, i] @ a[b, j]) / (norms[i] * norms[j])
                want += (g - (i == j)) ** 2
    want /= 16
    assert hem_loss(a, ref_batch=6).item() == pytest.approx(want, rel=1e-12)
    assert hem_loss(a, ref_batch=None).item() == pytest.approx(want, rel=1e-12)
    assert hem_loss(a, ref_batch=None).item() == pytest.approx(official_orthonomal_loss(a).item(), rel=1e-12)


def test_hem_extreme_values():
    orthogonal = 10.0 * torch.eye(3, 5, dtype=torch.float64).expand(2, 3, 5)
    assert hem_loss(orthogonal, ref_batch=None).item() < 1e-12
    identical = torch.ones(2, 3, 5, dtype=torch.float64)  # every off-diagonal cosine is 1
    assert hem_loss(identical, ref_batch=None).item() == pytest.approx(2 * (9 - 3) / 9, rel=1e-6)


def test_hem_scale_does_not_drift_with_the_per_rank_batch():
    a = _inputs(batch=64, heads=12, patches=20, dtype=torch.float64)["attn_logits"]
    full = hem_loss(a, ref_batch=64)
    halves = (hem_loss(a[:32], ref_batch=64) + hem_loss(a[32:], ref_batch=64)) / 2  # 2 ranks, averaged grads
    quarters = sum(hem_loss(chunk, ref_batch=64) for chunk in a.chunk(4)) / 4
    torch.testing.assert_close(halves, full)
    torch.testing.assert_close(quarters, full)
    torch.testing.assert_close(full, official_orthonomal_loss(a))  # = the official sum/144 at 64 per process


# ---- triplet


def test_triplet_by_hand():
    # ids 0: (0,0), (0,2); ids 1: (3,0), (3,4). Pairwise distances: d01 = 2, d02 = 3, d03 = 5,
    # d12 = d13 = √13, d23 = 4.
    feat = torch.tensor([[0.0, 0.0], [0.0, 2.0], [3.0, 0.0], [3.0, 4.0]])
    labels = torch.tensor([0, 0, 1, 1])
    r13 = math.sqrt(13.0)
    d_ap, d_an = batch_hard_distances(feat, labels)
    torch.testing.assert_close(d_ap, torch.tensor([2.0, 2.0, 4.0, 4.0]))
    torch.testing.assert_close(d_an, torch.tensor([3.0, r13, 3.0, r13]))
    want = (
        math.log1p(math.exp(-1.0))
        + math.log1p(math.exp(2.0 - r13))
        + math.log1p(math.exp(1.0))
        + math.log1p(math.exp(4.0 - r13))
    ) / 4
    assert soft_margin_triplet(feat, labels).item() == pytest.approx(want, rel=1e-6)


def test_triplet_matches_transreid_and_gathered_rows():
    x = _inputs(batch=8, dim=16)
    torch.testing.assert_close(soft_margin_triplet(x["feat"], x["labels"]), official_triplet(x["feat"], x["labels"]))
    kw = dict(alpha=0.5, beta=0.1, margin=0.5, scale=30.0)
    local = dpm_loss(**x, **kw)
    same = dpm_loss(**x, **kw, triplet_feat=x["feat"], triplet_labels=x["labels"])
    torch.testing.assert_close(local["loss_triplet"], same["loss_triplet"], atol=0, rtol=0)
    other = _inputs(batch=8, dim=16, seed=1)  # a second "rank": mining runs over both
    gathered = torch.cat([x["feat"], other["feat"]]), torch.cat([x["labels"], other["labels"] + 10])
    out = dpm_loss(**x, **kw, triplet_feat=gathered[0], triplet_labels=gathered[1])
    torch.testing.assert_close(out["loss_triplet"], official_triplet(*gathered))
    with pytest.raises(ValueError, match="together"):
        dpm_loss(**x, **kw, triplet_feat=gathered[0])


# ---- total


def test_total_matches_the_official_make_loss():
    x = _inputs(batch=16, classes=8, dim=32, heads=4, patches=6, dtype=torch.float64)
    out = dpm_loss(**x, alpha=0.5, beta=0.1, margin=0.5, scale=30.0, hem_ref_batch=16)
    score = F.linear(x["feat_bn"], x["prototypes"])
    mscore = official_arcface(official_masked_cosine(x["feat_bn"], x["mask"], x["prototypes"]), x["labels"], 30.0, 0.5)
    id_loss = (
        0.5 * F.cross_entropy(score, x["labels"])
        + 0.5 * F.cross_entropy(mscore, x["labels"])
        + 0.1 * official_orthonomal_loss(x["attn_logits"])
    )
    want = 1.0 * id_loss + 1.0 * official_triplet(x["feat"], x["labels"])
    torch.testing.assert_close(out["loss"], want, atol=1e-12, rtol=0)
    assert out["acc"].item() == (score.argmax(1) == x["labels"]).double().mean().item()
    assert not out["acc"].requires_grad


def test_alpha_selects_the_classification_branch():
    x = _inputs()
    kw = dict(beta=0.1, margin=0.5, scale=30.0, triplet_weight=0.7)
    plain = dpm_loss(**x, alpha=1.0, **kw)
    torch.testing.assert_close(plain["loss_id"], F.cross_entropy(F.linear(x["feat_bn"], x["prototypes"]), x["labels"]))
    want = plain["loss_id"] + 0.1 * plain["loss_hem"] + 0.7 * plain["loss_triplet"]
    torch.testing.assert_close(plain["loss"], want, atol=0, rtol=0)
    arc = dpm_loss(**x, alpha=0.0, beta=0.0, margin=0.5, scale=30.0, triplet_weight=0.0)
    torch.testing.assert_close(arc["loss"], arc["loss_mask_id"], atol=0, rtol=0)
    want_arc = masked_arcface_ce(x["feat_bn"], x["mask"], x["prototypes"], x["labels"], margin=0.5, scale=30.0)
    torch.testing.assert_close(arc["loss_mask_id"], want_arc, atol=0, rtol=0)


def test_only_the_masked_term_reaches_the_mask():
    x = _inputs()
    mask = x.pop("mask").requires_grad_(True)
    kw = dict(alpha=0.5, beta=0.1, margin=0.5, scale=30.0)
    (g_total,) = torch.autograd.grad(dpm_loss(**x, mask=mask, **kw)["loss"], mask)
    masked = masked_arcface_ce(x["feat_bn"], mask, x["prototypes"], x["labels"], margin=0.5, scale=30.0)
    (g_masked,) = torch.autograd.grad(0.5 * masked, mask)
    torch.testing.assert_close(g_total, g_masked)  # docs/method.md §5.4: the step-2 gradient of the HMG


def test_loss_terms_from_config():
    cfg = LossConfig(alpha=0.4, beta=0.01, margin=0.3, scale=20.0, triplet_weight=2.0, hem_ref_batch=32)
    kw = loss_terms_from_config(cfg)
    assert kw == dict(alpha=0.4, beta=0.01, margin=0.3, scale=20.0, triplet_weight=2.0, hem_ref_batch=32)
    out = dpm_loss(**_inputs(), **kw)
    assert set(out) >= {"loss", "loss_id", "loss_mask_id", "loss_hem", "loss_triplet", "acc"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
