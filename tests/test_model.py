"""DPM network: grids, SIE, taps, HEM logits, HMG, BNNeck, batch size 1 (docs/method.md §1-2, §4.1-4.2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpm_dist.model.dpm import DPMNet, create_model

TINY = dict(backbone="vit_base_patch16_224", embed_dim=32, depth=4, num_heads=4, tap_blocks=(1, 2, 3, 4), drop_path=0.0)


def tiny(**kw) -> DPMNet:
    args = dict(TINY, num_classes=7, num_cams=3)
    args.update(kw)
    torch.manual_seed(0)
    return create_model(**args)


@pytest.mark.parametrize(
    "img_size,stride,grid",
    [
        ((256, 128), (11, 11), (22, 11)),
        ((256, 128), (12, 12), (21, 10)),
        ((256, 128), (16, 16), (16, 8)),
        ((384, 128), (12, 12), (31, 10)),
    ],
)
def test_grid_and_token_count(img_size, stride, grid):
    model = tiny(img_size=img_size, stride=stride)
    assert model.backbone.grid == grid
    assert model.backbone.pos_embed.shape == (1, grid[0] * grid[1] + 1, 32)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *img_size), torch.tensor([0, 2]))
    assert out.attn_logits.shape == (2, 4, grid[0] * grid[1])
    assert out.feat.shape == out.feat_bn.shape == out.mask.shape == (2, 32)


def test_taps_are_row_major_grid_of_raw_block_outputs():
    model = tiny(img_size=(64, 32), stride=(6, 6), patch_size=8)
    model.eval()
    images, cams = torch.randn(2, 3, 64, 32), torch.tensor([1, 0])
    enc = model.encode(images, cams)
    # Recompute the blocks by hand: tap i = raw output of block i (1-based), patch tokens only.
    bb = model.backbone
    x = bb._embed(images, cams)
    outs = []
    for block in bb.blocks:
        x = block(x)
        outs.append(x)
    h, w = bb.grid
    assert enc.taps.shape == (2, 4 * 32, h, w)
    for i, raw in enumerate(outs):
        t = raw[:, 1:]  # (B, P, D)
        tap = enc.taps[:, i * 32 : (i + 1) * 32]  # (B, D, h, w)
        torch.testing.assert_close(tap[:, :, 1, 2], t[:, 1 * w + 2])  # token t sits at row t//w, col t%w
    torch.testing.assert_close(enc.feat, bb.norm(outs[-1])[:, 0])


def test_hem_logits_equal_full_score_matrix_slice():
    model = tiny(img_size=(64, 32), stride=(6, 6), patch_size=8)
    model.eval()
    images, cams = torch.randn(3, 3, 64, 32), torch.tensor([0, 1, 2])
    enc = model.encode(images, cams)
    bb = model.backbone
    x = bb._embed(images, cams)
    for block in bb.blocks[:-1]:
        x = block(x)
    attn = bb.blocks[-1].attn
    u = bb.blocks[-1].norm1(x)
    B, N, D = u.shape
    q, k, _ = attn.qkv(u).reshape(B, N, 3, attn.num_heads, D // attn.num_heads).permute(2, 0, 3, 1, 4)
    full = (q @ k.transpose(-2, -1)) * (D // attn.num_heads) ** -0.5  # (B, H, N, N)
    torch.testing.assert_close(enc.attn_logits, full[:, :, 0, 1:])


def test_sie_is_added_to_every_token_including_cls():
    model = tiny(img_size=(64, 32), stride=(6, 6), patch_size=8, sie_coe=3.0)
    bb = model.backbone
    images = torch.randn(1, 3, 64, 32)
    a = bb._embed(images, torch.tensor([0]))
    b = bb._embed(images, torch.tensor([2]))
    expected = 3.0 * (bb.sie_embed[2] - bb.sie_embed[0])  # (1, D)
    torch.testing.assert_close(b - a, expected.expand_as(a))


def test_camera_outside_trained_range_is_a_clear_error():
    model = tiny(img_size=(64, 32), stride=(6, 6), patch_size=8)
    with pytest.raises(ValueError, match=r"camera ids \[3\] are outside the trained range 0..2"):
        model(torch.randn(2, 3, 64, 32), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="camids are required"):
        model(torch.randn(2, 3, 64, 32))


def test_sie_off_gives_camera_agnostic_model():
    model = tiny(img_size=(64, 32), stride=(6, 6), patch_size=8, sie=False)
    assert model.backbone.sie_embed is None
    model.eval()
    out = model(torch.randn(1, 3, 64, 32))
    assert out.feat.shape == (1, 32)


def test_zero_init_mask_is_one_half_and_batch_size_one_works():
    model = tiny(img_size=(64, 32), stride=(6, 6), patch_size=8)
    model.train()
    out = model(torch.randn(2, 3, 64, 32), torch.tensor([1, 0]))
    assert torch.equal(out.mask, torch.full_like(out.mask, 0.5))
    # The HMG alone runs in train mode at batch 1 (its BNs see h×w values); the BNNeck, like any
    # BatchNorm1d, needs two samples in train mode, so batch 1 is an eval-time case.
    enc = model.encode(torch.randn(1, 3, 64, 32), torch.tensor([1]))
    assert model.mask_gen(enc.taps).shape == (1, 32)
    model.eval()
    out = model(torch.randn(1, 3, 64, 32), torch.tensor([1]))
    assert out.mask.shape == out.feat.shape == (1, 32)
    assert torch.equal(out.mask, torch.full((1, 32), 0.5))


@pytest.mark.slow
def test_hmg_layer_stack_for_vit_b_widths():
    model = create_model(num_classes=702, num_cams=8, stride=(11, 11), drop_path=0.1)
    layers = model.mask_gen.layers
    convs = [layers[i][0] for i in (0, 2, 4)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3072, 1536, (3, 3), (1, 1)),
        (1536, 768, (3, 3), (1, 1)),
        (768, 768, (3, 3), (1, 1)),
    ]
    assert all(c.bias is not None for c in convs)
    assert isinstance(layers[1], torch.nn.MaxPool2d) and isinstance(model.mask_gen.pool, torch.nn.AdaptiveMaxPool2d)
    assert torch.count_nonzero(model.mask_gen.fc.weight) == 0
    total = sum(p.numel() for p in model.parameters())
    hmg = sum(p.numel() for p in model.mask_gen.parameters())
    assert hmg == 58_992_384  # docs/method.md §2.2: ≈ 58.99 M
    assert total == 145_373_184  # ViT 85.8 M + HMG 59.0 M + W 0.54 M (the official count adds the dead 0.77 M fc)
    # LN eps 1e-6, qkv bias, linearly increasing drop path (docs/method.md §1.1)
    blocks = model.backbone.blocks
    assert blocks[0].norm1.eps == 1e-6 and model.backbone.norm.eps == 1e-6
    assert blocks[0].attn.qkv.bias is not None
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.1, 12))


def test_bnneck_and_prototypes_init():
    model = tiny()
    assert not model.bottleneck.bias.requires_grad
    assert torch.count_nonzero(model.bottleneck.bias) == 0
    bound = (6 / (32 + 7)) ** 0.5
    w = model.prototypes
    assert w.shape == (7, 32) and w.abs().max() <= bound
    assert model.classifier.bias is None


def test_parameter_split_by_submodule_covers_everything_once():
    model = tiny()
    main, mask = model.non_mask_parameters(), model.mask_parameters()
    assert len(mask) == 14  # 3 convs × 2 + 3 BNs × 2 + fc × 2 (docs/method.md §2.2)
    ids = [id(p) for p in main + mask]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable)


def test_gradient_flows_through_hmg_into_backbone_taps():
    model = tiny(img_size=(64, 32), stride=(6, 6), patch_size=8)
    torch.nn.init.normal_(model.mask_gen.fc.weight, std=0.1)
    out = model(torch.randn(4, 3, 64, 32), torch.tensor([0, 1, 2, 0]))
    out.mask.sum().backward()
    assert model.backbone.blocks[0].mlp.fc2.weight.grad.abs().sum() > 0


def test_wrong_input_size_and_tiny_grid_are_clear_errors():
    model = tiny(img_size=(64, 32), stride=(6, 6), patch_size=8)
    with pytest.raises(ValueError, match="model.img_size"):
        model(torch.randn(1, 3, 64, 48), torch.tensor([0]))
    with pytest.raises(ValueError, match="too small for the HMG"):
        tiny(img_size=(32, 32), stride=(16, 16), patch_size=16)


def test_drop_path_fresh_sample_in_train_mode():
    model = tiny(img_size=(64, 32), stride=(6, 6), patch_size=8, drop_path=0.5)
    model.train()
    x, c = torch.randn(8, 3, 64, 32), torch.zeros(8, dtype=torch.long)
    with torch.no_grad():
        a, b = model.encode(x, c).feat, model.encode(x, c).feat
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x, c).feat, model.encode(x, c).feat)
    assert F.mse_loss(a, b) > 0
