"""The built-in synthetic occluded-person dataset (deterministic by seed; numpy drawing, no assets).

Identities differ by clothing colours and textures per body region (hair, shirt, sleeves, trousers,
shoes, an optional bag) and body build. Each camera has its own background, colour gain and
illumination; every image jitters position, scale and facing (mirror). Occluders are objects (boxes,
poles, bushes, car-like blocks) or person-like distractors drawn in front, in the Occluded-Duke manner:
every query is occluded, the gallery mostly holistic, training a mix. Training and test identities
are disjoint. File names are Market-style (``0007_c2s1_000003_00.jpg``), camids 0-based.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from dpm_dist.data.layouts import MARKET_FOLDERS, make_key
from dpm_dist.data.shards import Sample, write_dataset

TEXTURES = ("plain", "hstripes", "vstripes", "checks", "dots")


@dataclass(frozen=True)
class SynthSpec:
    seed: int = 0
    num_ids: int = 50  # training identities
    num_test_ids: int = 30  # disjoint query/gallery identities
    images_per_id: int = 12  # training images per identity
    query_per_id: int = 2
    gallery_per_id: int = 6
    num_cams: int = 4
    height: int = 128
    width: int = 64
    train_occluded: float = 0.3  # fraction of occluded training images
    gallery_occluded: float = 0.1
    quality: int = 92


def _identity(rng: np.random.Generator) -> dict[str, Any]:
    def colour() -> np.ndarray:
        return rng.uniform(0.05, 0.95, 3)

    return {
        "shirt": colour(),
        "shirt2": colour(),
        "shirt_tex": TEXTURES[rng.integers(len(TEXTURES))],
        "sleeve": colour() if rng.random() < 0.3 else None,
        "pants": colour(),
        "pants2": colour(),
        "pants_tex": TEXTURES[rng.integers(3)],
        "shoes": colour() * 0.6,
        "hair": rng.uniform(0.0, 0.5, 3),
        "skin": np.array([0.85, 0.65, 0.5]) * rng.uniform(0.6, 1.1),
        "bag": colour() if rng.random() < 0.4 else None,
        "build": rng.uniform(0.8, 1.15),
    }


def _texture(name: str, yy: np.ndarray, xx: np.ndarray, period: int) -> np.ndarray:
    if name == "hstripes":
        return (yy // period) % 2 == 0
    if name == "vstripes":
        return (xx // period) % 2 == 0
    if name == "checks":
        return ((yy // period) + (xx // period)) % 2 == 0
    if name == "dots":
        return ((yy % period) - period / 2) ** 2 + ((xx % period) - period / 2) ** 2 < (period / 3) ** 2
    return np.zeros_like(yy, dtype=bool)


def _paint(
    canvas: np.ndarray,
    mask: np.ndarray,
    colour: np.ndarray,
    second: np.ndarray | None = None,
    tex: str = "plain",
    period: int = 6,
) -> None:
    canvas[mask] = colour
    if second is not None and tex != "plain":
        yy, xx = np.nonzero(mask)
        alt = _texture(tex, yy, xx, period)
        canvas[yy[alt], xx[alt]] = second


def _draw_person(canvas: np.ndarray, who: dict[str, Any], cx: float, top: float, scale: float) -> None:
    """A frontal person figure centred at column ``cx``, head top at row ``top``, ``scale`` × image height."""
    height, width = canvas.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    unit = height * scale / 128.0  # body measures below are for a 128-pixel person
    half = 13 * unit * who["build"]

    def rows(a: float, b: float) -> np.ndarray:
        return (yy >= top + a * unit) & (yy < top + b * unit)

    torso = rows(24, 66) & (np.abs(xx - cx) < half)
    arms = rows(26, 62) & (np.abs(xx - cx) >= half) & (np.abs(xx - cx) < half + 5 * unit)
    legs = rows(66, 116) & (np.abs(xx - cx) < half * 0.9) & (np.abs(xx - cx) > 1.5 * unit)
    shoes = rows(116, 122) & (np.abs(xx - cx) < half * 0.95) & (np.abs(xx - cx) > 1.0 * unit)
    head = ((yy - (top + 13 * unit)) / (11 * unit)) ** 2 + ((xx - cx) / (8 * unit)) ** 2 < 1
    hair = head & (yy < top + 9 * unit)
    period = max(2, int(round(6 * unit)))
    _paint(canvas, arms, who["sleeve"] if who["sleeve"] is not None else who["shirt"])
    _paint(canvas, torso, who["shirt"], who["shirt2"], who["shirt_tex"], period)
    _paint(canvas, legs, who["pants"], who["pants2"], who["pants_tex"], period)
    _paint(canvas, shoes, who["shoes"])
    _paint(canvas, head, who["skin"])
    _paint(canvas, hair, who["hair"])
    if who["bag"] is not None:
        bag = rows(30, 58) & (xx >= cx + half - 2 * unit) & (xx < cx + half + 7 * unit)
        _paint(canvas, bag, who["bag"])


def _camera(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "bg": rng.uniform(0.2, 0.8, 3),
        "bg2": rng.uniform(0.2, 0.8, 3),
        "gain": rng.uniform(0.75, 1.25, 3),
        "light": rng.uniform(0.75, 1.2),
        "gradient": rng.uniform(-0.25, 0.25),
    }


def _occlude(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """An object or a person-like distractor in front of the person."""
    height, width = canvas.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    kind = rng.integers(4)
    colour = rng.uniform(0.0, 1.0, 3)
    if kind == 0:  # box / car-like block covering the lower body
        top = rng.uniform(0.45, 0.7) * height
        _paint(canvas, yy >= top, colour, rng.uniform(0, 1, 3), "hstripes", int(rng.integers(3, 9)))
    elif kind == 1:  # pole or tree trunk
        x0 = rng.uniform(0.15, 0.65) * width
        _paint(canvas, (xx >= x0) & (xx < x0 + rng.uniform(0.15, 0.35) * width), colour)
    elif kind == 2:  # bush: a blob from a lower corner
        cy, cx = rng.uniform(0.75, 1.0) * height, rng.choice([0.0, width])
        _paint(
            canvas,
            ((yy - cy) / (0.35 * height)) ** 2 + ((xx - cx) / (0.7 * width)) ** 2 < 1,
            np.array([0.1, rng.uniform(0.3, 0.7), 0.1]),
            np.array([0.05, 0.3, 0.05]),
            "dots",
            4,
        )
    else:  # another pedestrian passing in front
        side = rng.choice([-1.0, 1.0])
        _draw_person(
            canvas,
            _identity(rng),
            width / 2 + side * rng.uniform(0.35, 0.6) * width,
            rng.uniform(0.0, 0.15) * height,
            rng.uniform(0.9, 1.1),
        )


def render(
    who: dict[str, Any], cam: dict[str, Any], rng: np.random.Generator, *, height: int, width: int, occluded: bool
) -> np.ndarray:
    """One uint8 (H, W, 3) image of identity ``who`` seen by camera ``cam``."""
    yy = np.linspace(0.0, 1.0, height)[:, None, None]
    blocks = rng.random((height // 8 + 1, width // 8 + 1, 1)) < 0.5  # a coarse background pattern
    pattern = np.kron(blocks, np.ones((8, 8, 1)))[:height, :width]
    canvas = np.where(pattern > 0, cam["bg"], cam["bg2"]) * (1 + cam["gradient"] * (yy - 0.5))
    scale = rng.uniform(0.85, 1.02)
    _draw_person(canvas, who, width / 2 + rng.normal(0, 0.06) * width, rng.uniform(0.0, 0.06) * height, scale)
    if occluded:
        _occlude(canvas, rng)
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1]  # facing the other way
    canvas = canvas * cam["gain"] * cam["light"] * rng.uniform(0.85, 1.15) + rng.normal(0, 0.03, canvas.shape)
    return (np.clip(canvas, 0.0, 1.0) * 255).astype(np.uint8)


def synth_samples(spec: SynthSpec = SynthSpec()) -> Iterator[Sample]:
    """Every image of the dataset as an encoded :class:`~dpm_dist.data.shards.Sample`, in a fixed order."""
    rng = np.random.default_rng(spec.seed)
    cams = [_camera(rng) for _ in range(spec.num_cams)]
    people = [_identity(rng) for _ in range(spec.num_ids + spec.num_test_ids)]
    for p, who in enumerate(people):
        pid = p + 1
        plan: list[tuple[str, int, bool]] = []
        if p < spec.num_ids:
            for i in range(spec.images_per_id):
                cam = i % spec.num_cams if i < 2 else int(rng.integers(spec.num_cams))  # >= 2 cameras
                plan.append(("train", cam, bool(rng.random() < spec.train_occluded)))
        else:
            qcam = int(rng.integers(spec.num_cams))
            others = [c for c in range(spec.num_cams) if c != qcam]
            plan += [("query", qcam, True) for _ in range(spec.query_per_id)]
            plan += [
                (
                    "gallery",
                    int(rng.choice(others)) if i else int(rng.integers(spec.num_cams)),
                    bool(rng.random() < spec.gallery_occluded),
                )
                for i in range(spec.gallery_per_id)
            ]
        for idx, (role, cam, occluded) in enumerate(plan):
            pixels = render(who, cams[cam], rng, height=spec.height, width=spec.width, occluded=occluded)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=spec.quality)
            source = f"{MARKET_FOLDERS[role]}/{pid:04d}_c{cam + 1}s1_{idx:06d}_00.jpg"
            yield Sample(make_key(role, source), buf.getvalue(), pid, cam, role, source)


def write_synthetic_folder(folder: str, spec: SynthSpec = SynthSpec()) -> str:
    """The dataset as a Market-style folder (bounding_box_train/, query/, bounding_box_test/)."""
    for sample in synth_samples(spec):
        path = os.path.join(folder, sample.source)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(sample.jpg)
    return folder


def write_synthetic_shards(
    out_dir: str,
    *,
    seed: int = 0,
    num_ids: int = 50,
    num_test_ids: int = 30,
    max_count: int = 64,
    max_bytes: int = 64 << 20,
    **spec: Any,
) -> str:
    """Generate the synthetic dataset straight into shards + ``index.json`` in ``out_dir``; returns ``out_dir``.

    The defaults (50 training ids × 12 images, 30 test ids × 2 occluded queries + 6 gallery images,
    4 cameras, 128×64) generate in a few seconds. Extra keywords are :class:`SynthSpec` fields.
    """
    full = SynthSpec(seed=seed, num_ids=num_ids, num_test_ids=num_test_ids, **spec)
    write_dataset(
        synth_samples(full),
        out_dir,
        dataset="synthetic",
        max_count=max_count,
        max_bytes=max_bytes,
        seed=seed,
        extra={"synthetic": dict(vars(full))},
    )
    return out_dir
