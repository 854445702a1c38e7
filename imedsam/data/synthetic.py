"""Synthetic polyp-like images with masks: the project's built-in demo data."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from .splits import seeded_split

__all__ = ["synthetic_polyp", "write_synthetic_dataset"]


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    coarse = rng.random((cells, cells)).astype(np.float32)
    image = Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    return np.asarray(image, dtype=np.float32) / 255.0


def synthetic_polyp(size: tuple[int, int] = (256, 256), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One endoscopy-like RGB image (``H x W x 3`` uint8) and its polyp mask (``H x W`` uint8, 0/255).

    Mucosa-coloured background with smooth texture and vignetting; a polyp with a wobbly elliptical outline,
    a little redder and brighter than the mucosa, shaded and with a specular highlight. Deterministic in ``seed``.
    """
    height, width = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)

    base = np.array([0.78, 0.45, 0.38]) + rng.normal(0, 0.04, 3)
    texture = _smooth_noise(rng, height, width, 6) - 0.5
    fine = _smooth_noise(rng, height, width, 24) - 0.5
    radius = np.hypot((yy - height / 2) / height, (xx - width / 2) / width)
    vignette = np.clip(1.15 - 1.3 * radius, 0.25, 1.0)
    image = (base[None, None] + 0.18 * texture[..., None] + 0.06 * fine[..., None]) * vignette[..., None]

    cy = rng.uniform(0.3, 0.7) * height
    cx = rng.uniform(0.3, 0.7) * width
    ry = rng.uniform(0.08, 0.2) * height
    rx = ry * rng.uniform(0.7, 1.4) * width / height
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + sum(rng.uniform(0, 0.08) * np.sin(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    distance = np.hypot((yy - cy) / ry, (xx - cx) / rx) / wobble
    mask = distance <= 1.0

    shade = np.clip(1.0 - distance, 0, 1) ** 0.5
    tint = np.array([0.12, -0.06, -0.04]) + rng.normal(0, 0.02, 3)
    image = image + mask[..., None] * (tint[None, None] + 0.12 * shade[..., None])
    highlight = np.exp(-(((yy - (cy - 0.4 * ry)) / (0.15 * ry)) ** 2 + ((xx - (cx - 0.3 * rx)) / (0.2 * rx)) ** 2))
    image = image + 0.5 * (mask * highlight)[..., None]
    image = image + rng.normal(0, 0.015, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask.astype(np.uint8) * 255


def write_synthetic_dataset(
    directory: str | os.PathLike,
    count: int = 24,
    size: tuple[int, int] = (256, 256),
    seed: int = 0,
    fractions: tuple[float, float] = (0.6, 0.2),
) -> dict[str, list[str]]:
    """Write ``images/``, ``masks/`` (PNG, same names) and ``split.json`` (train/val/test) to ``directory``."""
    if count < 3:
        raise ValueError(f"a dataset needs at least 3 images (one per split), got {count}")
    directory = os.fspath(directory)
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    os.makedirs(os.path.join(directory, "masks"), exist_ok=True)
    names = []
    for index in range(count):
        image, mask = synthetic_polyp(size, seed=seed * 100003 + index)
        name = f"synthetic_{index:04d}.png"
        Image.fromarray(image).save(os.path.join(directory, "images", name))
        Image.fromarray(mask).save(os.path.join(directory, "masks", name))
        names.append(name)
    split = seeded_split(names, seed, fractions)
    with open(os.path.join(directory, "split.json"), "w") as f:
        json.dump(split, f, indent=2)
    return split
