"""Synthetic defects for the offline demo set, each returning the exact changed-pixel mask.

Every painter takes a float RGB image in ``[0, 1]`` (``HxWx3``) and a seeded
``numpy.random.Generator`` and returns ``(image, mask)`` where ``mask`` is a boolean ``HxW``
array that is True exactly where pixels were replaced. Hard edges (no feathering) are used on
purpose: a soft edge would make "exact" ground truth ill-defined.

The Perlin noise here is a small NumPy re-implementation of the one in
``anomalib.data.utils.generators.perlin`` (same gradient-noise idea, same quintic fade) so that
the generator is deterministic from a NumPy seed and does not import torch/anomalib.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from skimage.draw import ellipse, line

Painter = Callable[[np.ndarray, np.random.Generator, np.ndarray], tuple[np.ndarray, np.ndarray]]

MIN_AREA_FRACTION = 0.004  # defects smaller than this are invisible at 518 px after up-scaling
MAX_AREA_FRACTION = 0.2


def perlin_noise(height: int, width: int, scale: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin noise in roughly ``[-1, 1]`` with ``scale`` gradient cells along (y, x)."""
    cells_y, cells_x = scale
    angles = rng.uniform(0.0, 2.0 * np.pi, (cells_y + 1, cells_x + 1))
    grads = np.stack([np.sin(angles), np.cos(angles)], axis=-1)
    ys = np.arange(height) * cells_y / height
    xs = np.arange(width) * cells_x / width
    yi, xi = np.meshgrid(ys.astype(int), xs.astype(int), indexing="ij")
    yf, xf = np.meshgrid(ys % 1.0, xs % 1.0, indexing="ij")

    def corner(dy: int, dx: int) -> np.ndarray:
        grad = grads[yi + dy, xi + dx]
        return grad[..., 0] * (yf - dy) + grad[..., 1] * (xf - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(xf), fade(yf)
    top = corner(0, 0) * (1 - u) + corner(0, 1) * u
    bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
    return np.sqrt(2.0) * (top * (1 - v) + bottom * v)


def _random_ellipse(shape: tuple[int, int], rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    height, width = shape
    mask = np.zeros(shape, dtype=bool)
    r_radius = rng.uniform(lo, hi) * height
    c_radius = rng.uniform(lo, hi) * width
    center_r = rng.uniform(0.25, 0.75) * height
    center_c = rng.uniform(0.25, 0.75) * width
    rr, cc = ellipse(center_r, center_c, r_radius, c_radius, shape=shape, rotation=rng.uniform(0, np.pi))
    mask[rr, cc] = True
    return mask


def _perlin_blob(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """An irregular, localised region: thresholded Perlin noise inside a random ellipse."""
    for _ in range(20):
        scale = int(rng.choice([2, 4, 8]))
        noise = perlin_noise(shape[0], shape[1], (scale, scale), rng)
        region = (noise > rng.uniform(0.0, 0.3)) & _random_ellipse(shape, rng, 0.12, 0.3)
        if MIN_AREA_FRACTION <= region.mean() <= MAX_AREA_FRACTION:
            return region
    return _random_ellipse(shape, rng, 0.08, 0.15)  # fallback keeps generation total


def paint_patch(image: np.ndarray, rng: np.random.Generator, foreign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paste a Perlin-shaped piece of another texture (a 'foreign material' defect)."""
    mask = _perlin_blob(image.shape[:2], rng)
    out = image.copy()
    out[mask] = foreign[mask]
    return out, mask


def paint_scratch(image: np.ndarray, rng: np.random.Generator, _foreign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Draw 1-3 thin straight/polyline scratches, much brighter or darker than the surface."""
    height, width = image.shape[:2]
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        points = rng.uniform(0.1, 0.9, (int(rng.integers(2, 4)), 2)) * (height - 1, width - 1)
        thickness = int(rng.integers(1, max(2, height // 64) + 1))
        for (r0, c0), (r1, c1) in zip(points[:-1], points[1:], strict=True):
            for offset in range(thickness):
                rr, cc = line(int(r0) + offset, int(c0), int(r1) + offset, int(c1))
                keep = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
                mask[rr[keep], cc[keep]] = True
    out = image.copy()
    level = 0.97 if image[mask].mean() < 0.5 else 0.03
    out[mask] = level + rng.uniform(-0.02, 0.02, (int(mask.sum()), 1))
    return out, mask


def paint_color(image: np.ndarray, rng: np.random.Generator, _foreign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stain an elliptical spot with a saturated colour (keeps some surface structure)."""
    mask = _random_ellipse(image.shape[:2], rng, 0.06, 0.16)
    colour = np.zeros(3)
    colour[int(rng.integers(0, 3))] = 1.0
    colour[int(rng.integers(0, 3))] += rng.uniform(0.0, 0.6)
    out = image.copy()
    out[mask] = 0.35 * image[mask] + 0.65 * np.clip(colour, 0, 1)
    return out, mask


def paint_hole(image: np.ndarray, rng: np.random.Generator, _foreign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Punch an irregular dark hole (near-black with faint noise)."""
    mask = _perlin_blob(image.shape[:2], rng)
    out = image.copy()
    out[mask] = rng.uniform(0.0, 0.06, (int(mask.sum()), 3))
    return out, mask


PAINTERS: dict[str, Painter] = {
    "patch": paint_patch,
    "scratch": paint_scratch,
    "color": paint_color,
    "hole": paint_hole,
}
