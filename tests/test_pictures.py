"""Evaluation pictures: the head cross-correlation formula, and the PNGs themselves."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dpm_dist.data.layouts import parse_market_name
from dpm_dist.eval.pictures import (
    MATCH,
    NON_MATCH,
    camera_label,
    head_correlation,
    save_head_correlation,
    save_mask_plot,
    save_ranked_list,
    to_display,
)


def test_head_correlation_is_the_hem_gram_matrix():
    a = torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [6.0, 8.0, 0.0]]])  # heads 1 and 3 parallel, 2 orthogonal
    corr = head_correlation(a)[0]
    norm = torch.sqrt(torch.tensor([25.0, 4.0, 100.0]) + 1e-6)  # eps inside the root (docs/method.md §3.2)
    expected = (a[0] / norm[:, None]) @ (a[0] / norm[:, None]).T
    torch.testing.assert_close(corr, expected)
    assert corr[0, 2] > 0.9999 and corr[0, 1] == 0 and torch.allclose(corr.diagonal(), torch.ones(3), atol=1e-6)
    assert head_correlation(torch.randn(5, 12, 40)).shape == (5, 12, 12)


def test_to_display_undoes_the_normalisation():
    image = torch.tensor([-1.0, 0.0, 1.0, 3.0]).reshape(1, 2, 2).expand(3, 2, 2)
    shown = to_display(image)
    assert shown.shape == (2, 2, 3) and shown[..., 0].flatten().tolist() == [0.0, 0.5, 1.0, 1.0]


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])


def test_ranked_list_marks_matches_green_and_non_matches_red(tmp_path):
    images = [torch.zeros(3, 32, 16) for _ in range(4)]
    path = save_ranked_list(
        str(tmp_path / "ranked.png"),
        torch.zeros(3, 32, 16),
        images,
        [True, False, True, False],
        query_title="q",
        gallery_titles=["a", "b", "c", "d"],
    )
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)

    def count(colour):
        return int((np.abs(pixels - _rgb(colour)).sum(1) < 30).sum())

    assert count(MATCH) > 100 and count(NON_MATCH) > 100  # both frame colours are drawn
    only_matches = save_ranked_list(
        str(tmp_path / "green.png"),
        torch.zeros(3, 32, 16),
        images[:2],
        [True, True],
        query_title="q",
        gallery_titles=["a", "b"],
    )
    pixels = np.asarray(Image.open(only_matches).convert("RGB")).reshape(-1, 3).astype(int)
    assert count(NON_MATCH) == 0


def test_correlation_and_mask_pictures_are_written(tmp_path):
    corr = save_head_correlation(str(tmp_path / "sub" / "corr.png"), head_correlation(torch.randn(12, 50)), title="t")
    mask = save_mask_plot(str(tmp_path / "mask.png"), torch.rand(768), title="m")
    for path in (corr, mask):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 150


def _border_is_blank(path: str, width: int = 2) -> bool:
    """Nothing drawn in the outermost pixels: no caption runs off the canvas."""
    grey = np.asarray(Image.open(path).convert("L")).astype(int)
    edges = np.concatenate(
        [grey[:width].ravel(), grey[-width:].ravel(), grey[:, :width].ravel(), grey[:, -width:].ravel()]
    )
    return bool((edges > 240).all())


def test_captions_are_not_clipped_at_the_edge_of_the_picture(tmp_path):
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 32) * 2 - 1 for _ in range(10)]
    path = save_ranked_list(
        str(tmp_path / "ranked.png"),
        images[0],
        images,
        [i % 3 == 0 for i in range(10)],
        query_title="query\npid 1234 c5\nAP 0.123",
        gallery_titles=[f"d=1.234\npid {1000 + i} c{i + 1}" for i in range(10)],
    )
    assert _border_is_blank(path)
    corr = save_head_correlation(
        str(tmp_path / "corr.png"), head_correlation(torch.randn(12, 50)), title="a long title " * 3
    )
    mask = save_mask_plot(
        str(tmp_path / "mask.png"), torch.rand(768), title="HMG mask, query query_0007_c3s1_000003_00"
    )
    assert _border_is_blank(corr) and _border_is_blank(mask)


def test_cameras_are_shown_as_in_the_file_names():
    _, camid = parse_market_name("0007_c3s1_000003_00.jpg")  # shards hold 0-based camids
    assert camid == 2 and camera_label(camid) == "c3"
