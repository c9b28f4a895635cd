"""Pictures of an evaluation (matplotlib, Agg backend; no display needed).

- :func:`save_ranked_list`: the query, then its top-k gallery items (same-pid-same-camera items removed,
  as the protocol does), green frame = true match, red = not.
- :func:`head_correlation` / :func:`save_head_correlation`: the last block's 12×12 head cross-correlation
  ``Â Âᵀ`` of the CLS→patch attention logits, Â row-normalised with eps 1e-6 inside the root exactly as
  the HEM loss does (docs/method.md §3.2; paper Figures 3a and 4). HEM pushes it towards the identity.
- :func:`save_mask_plot`: the query's HMG mask, one bar per channel, and the same values sorted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

PIXEL_MEAN = PIXEL_STD = 0.5  # dpm_dist.data.transforms.to_normalised (the official PIXEL_MEAN/STD)
MATCH, NON_MATCH = "#1a9850", "#d73027"


def camera_label(camid: int) -> str:
    """``c3`` for camera 3: shards hold 0-based camids (``0007_c3s1_...`` -> 2); show the file name's 1-based id."""
    return f"c{int(camid) + 1}"


def to_display(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) normalised image -> (H, W, 3) in [0, 1]."""
    return (image.detach().float().cpu() * PIXEL_STD + PIXEL_MEAN).clamp(0, 1).permute(1, 2, 0)


def head_correlation(attn_logits: torch.Tensor) -> torch.Tensor:
    """(..., H, P) logits -> (..., H, H) ``Â Âᵀ`` with ``Â = A / √(Σ_p A² + 1e-6)`` (the HEM normalisation)."""
    a = attn_logits.detach().float()
    a_hat = a / torch.sqrt((a * a).sum(-1, keepdim=True) + 1e-6)
    return a_hat @ a_hat.transpose(-1, -2)


def _frame(ax, colour: str | None, width: float = 4.0) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(colour is not None)
        if colour is not None:
            spine.set_edgecolor(colour)
            spine.set_linewidth(width)


def save_ranked_list(
    path: str,
    query_image: torch.Tensor,
    gallery_images: Sequence[torch.Tensor],
    is_match: Sequence[bool],
    *,
    query_title: str,
    gallery_titles: Sequence[str],
) -> str:
    """Query, then the ranked gallery items (framed green for a true match, red otherwise)."""
    num = len(gallery_images)
    fig, axes = plt.subplots(1, num + 1, figsize=(1.25 * (num + 1), 2.6))
    axes[0].imshow(to_display(query_image))
    axes[0].set_title(query_title, fontsize=7)
    _frame(axes[0], "#4575b4")
    for rank, (ax, image, match, title) in enumerate(zip(axes[1:], gallery_images, is_match, gallery_titles), start=1):
        ax.imshow(to_display(image))
        ax.set_title(f"#{rank} {title}", fontsize=6, color=MATCH if match else NON_MATCH)
        _frame(ax, MATCH if match else NON_MATCH)
    fig.tight_layout()
    return _save(fig, path)


def save_head_correlation(path: str, correlation: torch.Tensor, *, title: str) -> str:
    """Heat map of an (H, H) head cross-correlation matrix on [-1, 1]."""
    corr = correlation.detach().float().cpu()
    heads = corr.shape[-1]
    fig, ax = plt.subplots(figsize=(3.8, 3.5))
    image = ax.imshow(corr, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(heads))
    ax.set_yticks(range(heads))
    ax.set_xticklabels([str(h) for h in range(1, heads + 1)], fontsize=6)
    ax.set_yticklabels([str(h) for h in range(1, heads + 1)], fontsize=6)
    ax.set_xlabel("head")
    ax.set_ylabel("head")
    off = corr - torch.eye(heads)
    ax.set_title(
        f"head cross-correlation Â Âᵀ\n{title}\nmean |off-diagonal| = {off.abs().sum() / max(heads * heads - heads, 1):.3f}",
        fontsize=7,
    )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, path)


def save_mask_plot(path: str, mask: torch.Tensor, *, title: str) -> str:
    """The (D,) mask per channel (bars) and sorted (line), on [0, 1]."""
    values = mask.detach().float().cpu()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 2.4), gridspec_kw={"width_ratios": [3, 1]})
    left.bar(range(values.numel()), values.numpy(), width=1.0, color="#4575b4")
    left.set_xlim(0, values.numel())
    left.set_ylim(0, 1)
    left.set_xlabel("channel")
    left.set_ylabel("mask")
    left.set_title(f"{title}  (mean {values.mean():.3f}, min {values.min():.3f}, max {values.max():.3f})", fontsize=7)
    right.plot(values.sort(descending=True).values.numpy(), color="#4575b4")
    right.set_ylim(0, 1)
    right.set_xlabel("channels, sorted")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # tight_layout alone let a two-line caption at the figure's edge run off the canvas; a tight bounding box
    # grows the canvas to hold every title.
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.06)
    plt.close(fig)
    return path
