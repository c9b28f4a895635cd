"""docs/method.md §6.1/§6.2 transforms against torchvision's own, and the erasing/flip/crop semantics."""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from dpm_dist.data.transforms import eval_transform, random_erase, train_transform


def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (70, 30, 3), dtype=np.uint8))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


NORM = [T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]


def test_deterministic_parts_match_torchvision() -> None:
    ours = train_transform(image(), gen(), size=(32, 16), flip_prob=0.0, padding=0, erase_prob=0.0)
    ref = T.Compose([T.Resize((32, 16), interpolation=T.InterpolationMode.BICUBIC)] + NORM)(image())
    assert torch.allclose(ours, ref, atol=1e-6)
    flipped = train_transform(image(), gen(), size=(32, 16), flip_prob=1.0, padding=0, erase_prob=0.0)
    assert torch.allclose(flipped, ref.flip(-1), atol=1e-6)
    test = T.Compose([T.Resize((32, 16))] + NORM)(image())  # torchvision default: bilinear
    assert torch.allclose(eval_transform(image(), size=(32, 16)), test, atol=1e-6)
    assert not torch.allclose(test, ref, atol=1e-3)  # train bicubic != test bilinear


def test_pad_and_crop_is_a_shifted_window_with_black_border() -> None:
    plain = train_transform(image(), gen(), size=(32, 16), flip_prob=0.0, padding=0, erase_prob=0.0)
    padded = torch.nn.functional.pad(plain, (4, 4, 4, 4), value=-1.0)
    offsets = set()
    for seed in range(40):
        out = train_transform(image(), gen(seed), size=(32, 16), flip_prob=0.0, padding=4, erase_prob=0.0)
        match = [(t, x) for t in range(9) for x in range(9) if torch.equal(out, padded[:, t : t + 32, x : x + 16])]
        assert match
        offsets.add(match[0])
    assert len(offsets) > 15  # uniform offsets in 0..2·padding


def test_random_erasing_is_per_pixel_normal_in_one_box() -> None:
    x = torch.zeros(3, 64, 32)
    assert torch.equal(random_erase(x.clone(), gen(), 0.0), x)
    areas = []
    for seed in range(30):
        out = random_erase(x.clone(), gen(seed), 1.0)
        rows, cols = torch.nonzero(out.abs().sum(0)).unbind(1)
        assert len(rows) > 0
        box = out[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert (box != 0).float().mean() > 0.99  # the whole box is filled, every channel independently
        assert not torch.equal(box[0], box[1])
        areas.append(box[0].numel() / (64 * 32))
    assert min(areas) > 0.015 and max(areas) < 0.36  # area in [0.02, 1/3] up to rounding
    assert 0.3 < np.mean([random_erase(x.clone(), gen(s), 0.5).abs().sum() > 0 for s in range(200)]) < 0.7


def test_augmentation_depends_only_on_the_generator() -> None:
    kw = dict(size=(32, 16), jitter=True)
    a, b = train_transform(image(), gen(3), **kw), train_transform(image(), gen(3), **kw)
    torch.manual_seed(123)  # global RNG state must not matter
    c = train_transform(image(), gen(3), **kw)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, train_transform(image(), gen(4), **kw))
