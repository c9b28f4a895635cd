"""The DPM network (docs/method.md §1-2, §4.1-4.2): pure torch, no process group, no config objects.

    image ─► overlapping patch embedding (kernel p, stride s) ─► [CLS; tokens] + pos + λ·SIE[cam]
          ─► ViT blocks ─┬─ raw outputs of the tap blocks (patch tokens, before the final LN)
                         │      ─► concat (n·D)×h×w ─► Hierarchical Mask Generator ─► mask ∈ (0,1)^D
                         ├─ last block: CLS-query × patch-key logits before softmax (HEM)
                         └─ final LN ─► CLS feature f ─► BNNeck (bias frozen at 0) ─► f_bn
    prototypes W (C×D, xavier) are the classifier weight shared by the plain and the masked branch.

The backbone is any timm ViT built with ``pretrained=False``; weights come from local files
(:mod:`dpm_dist.model.weights`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


@dataclass
class BackboneOutput:
    feat: torch.Tensor  # (B, D) CLS token after the final LayerNorm
    taps: torch.Tensor  # (B, n_taps·D, h, w) raw tap-block outputs, patch tokens only
    attn_logits: torch.Tensor  # (B, H, P) last block CLS→patch logits, scaled, before softmax


@dataclass
class DPMOutput:
    feat: torch.Tensor  # (B, D) before the BNNeck: the test feature and the triplet input
    feat_bn: torch.Tensor  # (B, D) after the BNNeck: the classifier input
    mask: torch.Tensor  # (B, D) HMG mask in (0, 1)
    attn_logits: torch.Tensor  # (B, H, P) HEM input


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    # The conv keeps its bias although BN follows: the official checkpoints carry it.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=True),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MaskGenerator(nn.Module):
    """Hierarchical Mask Generator (docs/method.md §2.2): max-pools everywhere, zero-initialised ``fc``.

    ``layers`` indices 0, 2, 4 are the conv blocks, matching the official ``ConvLayer.{0,2,4}`` keys.
    For ViT-B with 4 taps the widths are 3072→1536→768→768.
    """

    def __init__(self, *, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        hidden = 2 * embed_dim
        self.layers = nn.Sequential(
            _conv_bn_relu(in_channels, hidden),
            nn.MaxPool2d(kernel_size=2, stride=2),
            _conv_bn_relu(hidden, embed_dim),
            nn.MaxPool2d(kernel_size=2, stride=2),
            _conv_bn_relu(embed_dim, embed_dim),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(embed_dim, embed_dim)  # official name: attfc
        nn.init.zeros_(self.fc.weight)  # mask = sigmoid(0) = 0.5 at step 0
        nn.init.zeros_(self.fc.bias)

    def forward(self, taps: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layers(taps)).flatten(1)  # flatten, not squeeze: batch size 1 stays 2-D
        return torch.sigmoid(self.fc(x))


class ViTBackbone(nn.Module):
    """timm ViT with an overlapping patch embedding, SIE, block taps and the HEM logits."""

    def __init__(
        self,
        vit: Any,  # a timm VisionTransformer (duck-typed: patch_embed, cls_token, blocks, norm, embed_dim)
        *,
        img_size: Sequence[int],
        stride: Sequence[int],
        num_cams: int,
        sie_coe: float,
        tap_blocks: Sequence[int],
    ) -> None:
        super().__init__()
        if getattr(vit, "num_prefix_tokens", 1) != 1 or getattr(vit, "cls_token", None) is None:
            raise ValueError("model.backbone: DPM needs a ViT with exactly one class token and no register tokens")
        if getattr(vit, "no_embed_class", False):
            raise ValueError("model.backbone: DPM needs a position embedding that covers the class token")
        depth = len(vit.blocks)
        if max(tap_blocks) > depth:
            raise ValueError(f"model.tap_blocks: block {max(tap_blocks)} exceeds the backbone depth {depth}")
        old_proj = vit.patch_embed.proj
        patch = tuple(old_proj.kernel_size)
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.grid = ((self.img_size[0] - patch[0]) // stride[0] + 1, (self.img_size[1] - patch[1]) // stride[1] + 1)
        self.num_patches = self.grid[0] * self.grid[1]
        self.embed_dim = int(vit.embed_dim)
        self.num_heads = int(vit.blocks[-1].attn.num_heads)
        self.tap_indices = tuple(int(b) - 1 for b in tap_blocks)  # 0-based

        self.patch_embed = vit.patch_embed
        self.patch_embed.proj = nn.Conv2d(
            3, self.embed_dim, kernel_size=patch, stride=(stride[0], stride[1]), bias=True
        )
        self.cls_token = vit.cls_token
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, self.embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.sie_coe = float(sie_coe)
        self.num_cams = int(num_cams)
        self.sie_embed: nn.Parameter | None
        if num_cams > 1:  # official: SIE exists only with more than one camera
            self.sie_embed = nn.Parameter(torch.zeros(num_cams, 1, self.embed_dim))
            nn.init.trunc_normal_(self.sie_embed, std=0.02)
        else:
            self.sie_embed = None
        self.blocks = vit.blocks
        self.norm = vit.norm

    def _embed(self, images: torch.Tensor, camids: torch.Tensor | None) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.img_size:
            raise ValueError(
                f"input images are {tuple(images.shape[-2:])}, the model was built for {self.img_size} (model.img_size)"
            )
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (B, P, D), row-major grid
        x = self.patch_embed.norm(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if self.sie_embed is not None:
            if camids is None:
                raise ValueError("camids are required: the model has an SIE camera embedding")
            # A data-dependent check cannot be exported or traced; an exported graph's Gather rejects a bad index.
            exporting = torch.compiler.is_exporting() or torch.jit.is_tracing()
            if not exporting and camids.numel() and (int(camids.min()) < 0 or int(camids.max()) >= self.num_cams):
                bad = sorted({int(c) for c in camids.tolist() if not 0 <= int(c) < self.num_cams})
                raise ValueError(
                    f"camera ids {bad} are outside the trained range 0..{self.num_cams - 1} (model.num_cams={self.num_cams})"
                )
            x = x + self.sie_coe * self.sie_embed[camids]  # (B, 1, D) broadcast to every token incl. CLS
        return x

    def forward(self, images: torch.Tensor, camids: torch.Tensor | None = None) -> BackboneOutput:
        x = self._embed(images, camids)
        taps: list[torch.Tensor] = []
        last = len(self.blocks) - 1
        qkv_out: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            if i == last:
                # Capture the last block's qkv projection; the block itself still runs fused SDPA.
                handle = block.attn.qkv.register_forward_hook(lambda _m, _i, out: qkv_out.append(out))
                try:
                    x = block(x)
                finally:
                    handle.remove()
            else:
                x = block(x)
            if i in self.tap_indices:
                taps.append(x[:, 1:])
        attn_logits = self._cls_patch_logits(self.blocks[last].attn, qkv_out[0])
        h, w = self.grid
        tap = torch.cat([t.transpose(1, 2).reshape(t.shape[0], self.embed_dim, h, w) for t in taps], dim=1)
        feat = self.norm(x)[:, 0]
        return BackboneOutput(feat=feat, taps=tap, attn_logits=attn_logits)

    @staticmethod
    def _cls_patch_logits(attn: Any, qkv: torch.Tensor) -> torch.Tensor:  # a timm Attention
        """(q_cls · k_patchᵀ) · scale for every head: one query row, the same values as slicing S."""
        batch, tokens, _ = qkv.shape
        qkv = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # (B, H, N, hd)
        return (q[:, :, :1] @ k[:, :, 1:].transpose(-2, -1)).squeeze(2) * attn.scale  # (B, H, P)


class DPMNet(nn.Module):
    """Backbone + mask generator + BNNeck + prototypes. ``forward`` returns :class:`DPMOutput`."""

    def __init__(self, backbone: ViTBackbone, *, num_classes: int, num_taps: int) -> None:
        super().__init__()
        dim = backbone.embed_dim
        self.backbone = backbone
        self.mask_gen = MaskGenerator(in_channels=num_taps * dim, embed_dim=dim)
        self.bottleneck = nn.BatchNorm1d(dim)
        self.bottleneck.bias.requires_grad_(False)  # BNNeck bias frozen at 0
        self.classifier: nn.Linear | None = nn.Linear(dim, num_classes, bias=False)  # W: the holistic prototypes
        nn.init.xavier_uniform_(self.classifier.weight)

    @property
    def prototypes(self) -> torch.Tensor:
        if self.classifier is None:
            raise ValueError(
                "the prototypes were taken out of this model (take_prototype_rows): a sharded head holds them"
            )
        return self.classifier.weight  # (C, D)

    def take_prototype_rows(self, start: int, stop: int) -> nn.Parameter:
        """Rows ``[start, stop)`` of W as a parameter of their own; the model keeps no prototypes afterwards.

        A model-parallel shard must live outside the module a data-parallel wrapper broadcasts and averages.
        The rows are sliced from the full initialisation, so a sharded run starts from the replicated W.
        """
        rows = nn.Parameter(self.prototypes.detach()[start:stop].clone())
        self.classifier = None
        return rows

    def encode(self, images: torch.Tensor, camids: torch.Tensor | None = None) -> BackboneOutput:
        return self.backbone(images, camids)

    def forward(self, images: torch.Tensor, camids: torch.Tensor | None = None) -> DPMOutput:
        return self.head(self.encode(images, camids))

    def head(self, enc: BackboneOutput) -> DPMOutput:
        """BNNeck and mask generator on top of a backbone output."""
        return DPMOutput(
            feat=enc.feat,
            feat_bn=self.bottleneck(enc.feat),
            mask=self.mask_gen(enc.taps),
            attn_logits=enc.attn_logits,
        )

    def non_mask_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of step 1 (everything but the HMG), split by submodule, not by name."""
        mask_ids = {id(p) for p in self.mask_gen.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in mask_ids]

    def mask_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.mask_gen.parameters() if p.requires_grad]


def prototype_rows(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of W that ``rank`` owns in a sharded head: contiguous, the first
    ``num_classes % world_size`` ranks one row more (``torch.tensor_split``'s split)."""
    if num_classes < world_size:
        raise ValueError(
            f"{num_classes} classes cannot be sharded over {world_size} ranks: every rank needs a prototype"
        )
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def create_model(
    *,
    backbone: str = "vit_base_patch16_224",
    num_classes: int,
    num_cams: int,
    img_size: Sequence[int] = (256, 128),
    stride: Sequence[int] = (11, 11),
    patch_size: int = 16,
    drop_path: float = 0.1,
    sie: bool = True,
    sie_coe: float = 3.0,
    tap_blocks: Sequence[int] = (2, 4, 10, 12),
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
) -> DPMNet:
    """Build DPM around ``timm.create_model(backbone, pretrained=False)`` (no network access)."""
    import timm

    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    overrides: dict[str, Any] = {
        k: v for k, v in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)) if v is not None
    }
    vit = timm.create_model(
        backbone,
        pretrained=False,
        num_classes=0,
        img_size=tuple(img_size),
        patch_size=patch_size,
        drop_path_rate=drop_path,
        **overrides,
    )
    grid = [(int(img_size[i]) - patch_size) // int(stride[i]) + 1 for i in range(2)]
    if min(grid) < 4:
        raise ValueError(
            f"token grid {grid[0]}x{grid[1]} is too small for the HMG's two 2x2 max-pools; need >= 4x4 (model.img_size / model.stride)"
        )
    body = ViTBackbone(
        vit,
        img_size=img_size,
        stride=stride,
        num_cams=num_cams if sie else 0,
        sie_coe=sie_coe,
        tap_blocks=tap_blocks,
    )
    return DPMNet(body, num_classes=num_classes, num_taps=len(tap_blocks))


def build_model(model_cfg: Any, *, num_classes: int, num_cams: int) -> DPMNet:
    """Map a :class:`dpm_dist.config.ModelConfig` to :func:`create_model` arguments.

    ``model_cfg.num_classes`` / ``num_cams`` override the dataset's counts when non-zero.
    """
    return create_model(
        backbone=model_cfg.backbone,
        num_classes=model_cfg.num_classes or num_classes,
        num_cams=model_cfg.num_cams or num_cams,
        img_size=model_cfg.img_size,
        stride=model_cfg.stride,
        patch_size=model_cfg.patch_size,
        drop_path=model_cfg.drop_path,
        sie=model_cfg.sie,
        sie_coe=model_cfg.sie_coe,
        tap_blocks=model_cfg.tap_blocks,
        embed_dim=model_cfg.embed_dim,
        depth=model_cfg.depth,
        num_heads=model_cfg.num_heads,
    )
