"""Train and test image transforms (docs/method.md §6.1, §6.2) as pure functions of (image, generator).

Every random draw comes from the ``torch.Generator`` passed in, so a sample's augmentation depends
only on the stream seed, not on the DataLoader's worker count or on global RNG state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

ERASE_AREA = (0.02, 1.0 / 3.0)  # timm RandomErasing defaults (min_area, max_area)
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1.0 / 0.3))
JITTER = (0.3, 0.3, 0.2, 0.2)  # brightness, contrast, saturation, hue (the Occluded-REID recipe)


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high], both inclusive (``random.randint`` semantics)."""
    return int(torch.randint(low, high + 1, (), generator=gen))


def color_jitter(img: Image.Image, gen: torch.Generator) -> Image.Image:
    """torchvision ColorJitter(0.3, 0.3, 0.2, 0.2): the four adjustments in random order."""
    brightness, contrast, saturation, hue = JITTER
    factors = [
        _uniform(gen, 1 - brightness, 1 + brightness),
        _uniform(gen, 1 - contrast, 1 + contrast),
        _uniform(gen, 1 - saturation, 1 + saturation),
        _uniform(gen, -hue, hue),
    ]
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in torch.randperm(4, generator=gen).tolist():
        img = ops[i](img, factors[i])
    return img


def random_erase(x: torch.Tensor, gen: torch.Generator, probability: float) -> torch.Tensor:
    """timm RandomErasing(mode='pixel', max_count=1) in place on a normalised (C, H, W) tensor."""
    if probability <= 0.0 or float(torch.rand((), generator=gen)) > probability:
        return x
    chans, height, width = x.shape
    for _ in range(10):
        area = _uniform(gen, *ERASE_AREA) * height * width
        aspect = math.exp(_uniform(gen, *ERASE_LOG_ASPECT))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if w < width and h < height:
            top, left = _randint(gen, 0, height - h), _randint(gen, 0, width - w)
            x[:, top : top + h, left : left + w] = torch.randn((chans, h, w), generator=gen, dtype=x.dtype)
            break
    return x


def to_normalised(img: Image.Image) -> torch.Tensor:
    """ToTensor then Normalize(0.5, 0.5): values in [-1, 1], shape (3, H, W)."""
    return TF.to_tensor(img).sub_(0.5).div_(0.5)


def train_transform(
    img: Image.Image,
    gen: torch.Generator,
    *,
    size: Sequence[int],
    flip_prob: float = 0.5,
    padding: int = 10,
    erase_prob: float = 0.5,
    jitter: bool = False,
) -> torch.Tensor:
    """Bicubic resize, [ColorJitter], flip, zero pad + random crop, normalise, per-pixel random erasing."""
    height, width = int(size[0]), int(size[1])
    img = img.resize((width, height), Image.Resampling.BICUBIC)
    if jitter:
        img = color_jitter(img, gen)
    if float(torch.rand((), generator=gen)) < flip_prob:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = to_normalised(img)
    if padding > 0:
        # pad in pixel space with black (0 -> -1 after normalisation), as Pad(10) before ToTensor does
        x = torch.nn.functional.pad(x, (padding, padding, padding, padding), value=-1.0)
        top, left = _randint(gen, 0, 2 * padding), _randint(gen, 0, 2 * padding)
        x = x[:, top : top + height, left : left + width].contiguous()
    return random_erase(x, gen, erase_prob)


def eval_transform(img: Image.Image, *, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (the torchvision default, unlike train's bicubic), normalise."""
    return to_normalised(TF.resize(img, [int(size[0]), int(size[1])], interpolation=InterpolationMode.BILINEAR))
