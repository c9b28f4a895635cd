"""The paper's ablations as options (docs/method.md §4.7): the defaults are the final model bit for bit, and each
option computes what its table row says (Table 3's masked branch off, Table 4's S/A per branch, Table 5's
mask placements), against per-sample definitions in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpm_dist.config import MASK_PLACEMENTS, DPMConfig, LossConfig, to_config
from dpm_dist.train.losses import (
    arcface_logits,
    branch_options,
    classification_terms,
    dpm_loss,
    hem_loss,
    masked_arcface_ce,
    masked_cosine,
    plain_cosine,
    soft_margin_triplet,
)

B, C, D, H, P = 6, 5, 16, 4, 10


def _inputs(dtype=torch.float64, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "feat": torch.randn(B, D, generator=g, dtype=dtype),
        "feat_bn": torch.randn(B, D, generator=g, dtype=dtype),
        "mask": torch.rand(B, D, generator=g, dtype=dtype),
        "attn_logits": torch.randn(B, H, P, generator=g, dtype=dtype),
        "prototypes": torch.randn(C, D, generator=g, dtype=dtype),
        "labels": torch.tensor([0, 0, 1, 1, 2, 2]),
    }


def _paper_masked_cosine(feat_bn, mask, prototypes):
    """The expression masked_cosine computed before the ablations existed (docs/method.md §4.4), verbatim."""
    f = F.normalize(feat_bn.float(), dim=1, eps=1e-12)
    w = F.normalize(prototypes.float(), dim=1, eps=1e-12)
    m = mask.float()
    return ((f * m) @ w.t()) / ((m * m) @ (w * w).t()).sqrt().clamp_min(1e-12)


def test_the_defaults_are_the_paper_model_bit_for_bit():
    x = _inputs(torch.float32)
    assert branch_options(LossConfig()) == {
        "plain_branch": "softmax",
        "masked_branch": "arcface",
        "mask_placement": "P_n",
    }
    assert torch.equal(masked_cosine(x["feat_bn"], x["mask"], x["prototypes"]), _paper_masked_cosine(**_pick(x)))
    args = (x["feat_bn"], x["mask"], x["prototypes"], x["labels"])
    default = classification_terms(*args, margin=0.5, scale=30.0)
    named = classification_terms(*args, margin=0.5, scale=30.0, **branch_options(LossConfig()))
    assert all(torch.equal(default[k], named[k]) for k in default)
    assert torch.equal(default["loss_id"], F.cross_entropy(F.linear(x["feat_bn"], x["prototypes"]), x["labels"]))
    paper_arc = F.cross_entropy(
        arcface_logits(_paper_masked_cosine(**_pick(x)), x["labels"], margin=0.5, scale=30.0), x["labels"]
    )
    assert torch.equal(default["loss_mask_id"], paper_arc)
    kw = dict(alpha=0.5, beta=0.1, margin=0.5, scale=30.0)
    a, b = dpm_loss(**x, **kw), dpm_loss(**x, **kw, masked_branch="arcface")
    assert torch.equal(a["loss"], b["loss"])
    want = 0.5 * default["loss_id"] + 0.5 * paper_arc + 0.1 * hem_loss(x["attn_logits"])
    torch.testing.assert_close(a["loss"], want + soft_margin_triplet(x["feat"], x["labels"]), rtol=0, atol=1e-6)


def _pick(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: x[k] for k in ("feat_bn", "mask", "prototypes")}


def _per_sample(feat_bn, mask, prototypes, placement):
    """Table 5's placements one (sample, prototype) pair at a time: the mask on the unit prototype (P) and on the
    unit feature too (F); subscript n: the masked vector renormalised."""
    out = torch.empty(len(feat_bn), len(prototypes), dtype=feat_bn.dtype)
    for b in range(len(feat_bn)):
        f = feat_bn[b] / feat_bn[b].norm()
        m = mask[b]
        for c in range(len(prototypes)):
            w = prototypes[c] / prototypes[c].norm()
            pw = m * w
            pf = m * f if "F" in placement else f
            if placement.startswith("P_n"):
                pw = pw / pw.norm()
                pf = pf / pf.norm() if "F" in placement else pf
            out[b, c] = pf @ pw
    return out


@pytest.mark.parametrize("placement", MASK_PLACEMENTS)
def test_each_mask_placement_is_its_per_sample_definition(placement):
    x = _inputs()
    got = masked_cosine(x["feat_bn"], x["mask"], x["prototypes"], placement)
    torch.testing.assert_close(
        got, _per_sample(x["feat_bn"], x["mask"], x["prototypes"], placement), rtol=0, atol=1e-12
    )


def test_placements_differ_as_the_table_says_under_a_constant_mask():
    x = _inputs()
    half = torch.full_like(x["mask"], 0.5)
    plain = plain_cosine(x["feat_bn"], x["prototypes"])
    got = {p: masked_cosine(x["feat_bn"], half, x["prototypes"], p) for p in MASK_PLACEMENTS}
    torch.testing.assert_close(got["P_n"], plain, rtol=0, atol=1e-12)  # renormalised: the mask's scale cancels
    torch.testing.assert_close(got["P_n+F_n"], plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(got["P"], 0.5 * plain, rtol=0, atol=1e-12)  # not renormalised: the scale stays
    torch.testing.assert_close(got["P+F"], 0.25 * plain, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="mask placement 'Pn'"):
        masked_cosine(x["feat_bn"], half, x["prototypes"], "Pn")


def test_masked_softmax_is_the_masked_branch_without_its_margin():
    x = _inputs()
    args = (x["feat_bn"], x["mask"], x["prototypes"], x["labels"])
    soft = masked_arcface_ce(*args, margin=0.5, scale=30.0, masked_branch="softmax")
    cos = masked_cosine(x["feat_bn"], x["mask"], x["prototypes"])
    assert torch.equal(soft, F.cross_entropy(30.0 * cos, x["labels"]))
    torch.testing.assert_close(soft, masked_arcface_ce(*args, margin=0.0, scale=30.0), rtol=0, atol=1e-12)
    assert not torch.isclose(soft, masked_arcface_ce(*args, margin=0.5, scale=30.0))  # A ≠ S
    with pytest.raises(ValueError, match="masked branch 'off' has no loss"):
        masked_arcface_ce(*args, margin=0.5, scale=30.0, masked_branch="off")


def test_plain_arcface_is_arcface_on_the_unmasked_cosine():
    x = _inputs()
    args = (x["feat_bn"], x["mask"], x["prototypes"], x["labels"])
    terms = classification_terms(*args, margin=0.5, scale=30.0, plain_branch="arcface")
    ones = torch.ones_like(x["mask"])  # an all-ones mask leaves the masked cosine the plain one
    want = masked_arcface_ce(x["feat_bn"], ones, x["prototypes"], x["labels"], margin=0.5, scale=30.0)
    torch.testing.assert_close(terms["loss_id"], want, rtol=0, atol=1e-12)
    cos = plain_cosine(x["feat_bn"], x["prototypes"])
    assert terms["acc"] == (cos.argmax(1) == x["labels"]).double().mean()
    default = classification_terms(*args, margin=0.5, scale=30.0)
    assert torch.equal(terms["loss_mask_id"], default["loss_mask_id"])  # the masked branch is untouched
    assert not torch.isclose(terms["loss_id"], default["loss_id"])


def test_masked_branch_off_is_the_baseline_loss_and_leaves_the_mask_without_gradient():
    x = _inputs()
    mask = x.pop("mask").requires_grad_(True)
    x["feat_bn"].requires_grad_(True)
    kw = dict(alpha=0.5, beta=0.1, margin=0.5, scale=30.0)
    out = dpm_loss(**x, mask=mask, **kw, masked_branch="off")
    assert float(out["loss_mask_id"]) == 0.0
    want = out["loss_id"] + 0.1 * out["loss_hem"] + out["loss_triplet"]  # CE weighs 1 (the ID + triplet baseline)
    assert torch.equal(out["loss"], want)
    (grad,) = torch.autograd.grad(out["loss"], mask, allow_unused=True)
    assert grad is None  # nothing trains the mask generator
    full = dpm_loss(**x, mask=mask, **kw)
    (grad,) = torch.autograd.grad(full["loss"], mask)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("plain_branch", "cosface", "config field `loss.plain_branch`: unknown value 'cosface'"),
        ("masked_branch", "none", "config field `loss.masked_branch`: unknown value 'none'"),
        ("mask_placement", "Pn", "config field `loss.mask_placement`: unknown value 'Pn'"),
    ],
)
def test_a_bad_option_names_its_field(field, value, expected):
    with pytest.raises(ValueError, match=expected):
        LossConfig(**{field: value})


@pytest.mark.parametrize(
    "field,value", [("plain_branch", "arcface"), ("masked_branch", "off"), ("mask_placement", "P")]
)
def test_the_sharded_head_refuses_the_ablations(field, value):
    with pytest.raises(ValueError, match=f"config field `loss.{field}`: '{value}' is an ablation of the replicated"):
        to_config({"model": {"classifier": "sharded"}, "loss": {field: value}})


def test_paper_row_is_checked_against_the_known_rows():
    assert to_config({"paper_row": "table3/baseline"}).paper_row == "table3/baseline"
    assert DPMConfig().paper_row == ""
    with pytest.raises(ValueError, match="config field `paper_row`: unknown row 'table3/basline'"):
        to_config({"paper_row": "table3/basline"})


# ---- the engine: masked_branch=off takes no step 2 -------------------------------------------------------------


@pytest.fixture(scope="module")
def single_process():
    from dpm_dist.dist import DistEnv, init_process_group

    init_process_group(DistEnv())  # a world of one over an in-memory store (once per process)
    return DistEnv()


def _engine_cfg(**loss):
    return to_config(
        {
            "model": {"img_size": [64, 32], "stride": [6, 6], "patch_size": 8, "drop_path": 0.0},
            "data": {"img_size": [64, 32], "num_ids": 3, "num_instances": 2},
            "optim": {"epochs": 4, "warmup_epochs": 1, "base_lr": 0.05},
            "loss": {"hem_ref_batch": 6, **loss},
        }
    )


@pytest.mark.parametrize("masked_branch", ["arcface", "off"])
def test_without_the_masked_branch_the_mask_generator_never_moves(single_process, masked_branch):
    from dpm_dist.train.engine import DPMEngine
    from tests import engine_worker as W

    engine = DPMEngine.from_config(_engine_cfg(masked_branch=masked_branch), single_process, W.fresh_model())
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    engine.start_epoch(2)
    for batch in W.batches(single_process, 2):
        metrics = engine.step(batch)
    after = engine.model.state_dict()
    assert all(math.isfinite(v) for v in metrics.values())
    hmg = [k for k in before if k.startswith("mask_gen.") and "running" not in k and "num_batches" not in k]
    moved = [k for k in hmg if not torch.equal(before[k], after[k])]
    assert not torch.equal(before["backbone.blocks.0.attn.qkv.weight"], after["backbone.blocks.0.attn.qkv.weight"])
    if masked_branch == "off":
        assert moved == [] and "loss_step2" not in metrics and metrics["loss_mask_id"] == 0.0
    else:
        assert "mask_gen.fc.weight" in moved and "loss_step2" in metrics
