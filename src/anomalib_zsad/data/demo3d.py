"""Offline 3D demo data set in MVTec 3D-AD's layout: organized point clouds and RGB renders of
simple shapes, with bumps, dents and stains and their masks.

Why: M3DM (RGB + point cloud) must run end to end here, and MVTec 3D-AD cannot be downloaded.
This writes a tiny, deterministic set that anomalib's ``MVTec3D`` datamodule reads unchanged::

    <root>/<category>/train/good/rgb/000.png         8-bit RGB render
    <root>/<category>/train/good/xyz/000.tiff        float32 [H, W, 3] organized cloud, metres
    <root>/<category>/test/good/{rgb,xyz,gt}/000.*   gt: all-zero masks, as in MVTec 3D-AD
    <root>/<category>/test/<defect>/{rgb,xyz,gt}/000.*   gt: 0 / 255
    <root>/.zsad_demo.json                           parameters; marks a complete set

The clouds are what MVTec 3D-AD's clouds are after M3DM's preprocessing (``utils/preprocessing.py``:
supporting plane removed, background exactly 0), so no preprocessing step is needed: a camera
about 0.4 m above the object, x/y on a 0.4 mm grid (scaled to the image size) with a little jitter,
the object's height subtracted from z, a smooth random relief and sensor noise. Shapes
(categories): ``dome`` (an elliptic cap), ``ring`` (a torus, bagel-like) and ``tablet`` (a
rounded box). Defects: ``bump`` and ``dent`` (Gaussian, 2-3 mm, shading changes with them; mask
where the surface moved by more than a quarter of the depth), and ``stain`` (colour only; mask the
spot): a geometric defect that the RGB image hardly shows, and one that the points cannot see.

Generation is seeded per (seed, category) and atomic (a temporary folder renamed into place when
complete, as :mod:`anomalib_zsad.data.demo`). Command line:
``python -m anomalib_zsad.data.demo3d --root datasets/zsad_demo3d``, then
``anomalib train --model M3DM --data MVTec3D --data.root datasets/zsad_demo3d --data.category dome``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from anomalib_zsad.data.demo import (
    MANIFEST,
    _already_there,
    _cannot_write,
    _make_temporary,
    _swap_into_place,
    _unlock,
    sample_plan,
)
from anomalib_zsad.data.errors import DatasetError

FORMAT_VERSION = 1
CAMERA_DISTANCE = 0.4  # metres
PIXEL_PITCH_256 = 0.0004  # metres per pixel at 256 px
HEIGHT = 0.012  # metres: the objects' height
DEFECT_TYPES: tuple[str, ...] = ("bump", "dent", "stain")
COLOURS: dict[str, tuple[float, float, float]] = {
    "dome": (0.85, 0.62, 0.35),
    "ring": (0.80, 0.55, 0.30),
    "tablet": (0.55, 0.65, 0.80),
}
DEFAULT_CATEGORIES: tuple[str, ...] = ("dome", "ring", "tablet")

__all__ = ["DEFAULT_CATEGORIES", "DEFECT_TYPES", "make_demo3d_dataset", "main", "render_sample"]


# ---------------------------------------------------------------- shapes: height maps in metres
def _dome(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    a, b = rng.uniform(0.62, 0.72), rng.uniform(0.5, 0.6)
    r = 1 - (u / a) ** 2 - (v / b) ** 2
    return np.where(r > 0, HEIGHT * np.sqrt(np.clip(r, 0, None)), 0.0)


def _ring(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    radius, tube = rng.uniform(0.42, 0.48), rng.uniform(0.2, 0.24)
    d = np.sqrt(u**2 + (v * rng.uniform(1.0, 1.15)) ** 2) - radius
    r = 1 - (d / tube) ** 2
    return np.where(r > 0, HEIGHT * 0.8 * np.sqrt(np.clip(r, 0, None)), 0.0)


def _tablet(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    half_u, half_v, edge = rng.uniform(0.55, 0.65), rng.uniform(0.4, 0.5), 0.12
    du, dv = np.abs(u) - (half_u - edge), np.abs(v) - (half_v - edge)
    outside = np.sqrt(np.clip(du, 0, None) ** 2 + np.clip(dv, 0, None) ** 2)
    r = 1 - (outside / edge) ** 2
    return np.where(r > 0, HEIGHT * 0.6 * np.sqrt(np.clip(r, 0, None)), 0.0)


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]] = {
    "dome": _dome, "ring": _ring, "tablet": _tablet}


def _smooth_field(size: int, rng: np.random.Generator, cells: int = 6) -> np.ndarray:
    """A smooth random field in [-1, 1] (bicubic upsampling of a coarse random grid)."""
    coarse = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
    image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    field = np.asarray(image, dtype=np.float64)
    return field / max(np.abs(field).max(), 1e-9)


def _gaussian(size: int, centre: tuple[float, float], sigma: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return np.exp(-((x - centre[1]) ** 2 + (y - centre[0]) ** 2) / (2 * sigma**2))


def render_sample(category: str, size: int, rng: np.random.Generator, defect: str | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample: ``(rgb uint8 [H, W, 3], xyz float32 [H, W, 3], mask uint8 [H, W] 0/255)``."""
    pitch = PIXEL_PITCH_256 * 256 / size
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    shift = rng.uniform(-0.04, 0.04, size=2) * size
    angle = rng.uniform(-0.3, 0.3)
    cu, cv = (x - size / 2 - shift[1]) / (size / 2), (y - size / 2 - shift[0]) / (size / 2)
    u = np.cos(angle) * cu + np.sin(angle) * cv
    v = -np.sin(angle) * cu + np.cos(angle) * cv
    height = SHAPES[category](u, v, rng)
    inside = height > 0
    relief = _smooth_field(size, rng) * 0.0003
    height = np.where(inside, height + relief, 0.0)
    inside = height > 0
    texture = 1 + 0.08 * _smooth_field(size, rng, cells=10)
    mask = np.zeros((size, size), dtype=bool)
    stain = np.ones((size, size))
    if defect is not None:
        candidates = np.argwhere(inside & (height > 0.4 * height.max()))
        centre = candidates[rng.integers(len(candidates))]
        sigma = size * rng.uniform(0.03, 0.045)
        blob = _gaussian(size, tuple(centre), sigma)
        if defect in ("bump", "dent"):
            depth = rng.uniform(0.002, 0.003) * (1 if defect == "bump" else -1)
            height = np.where(inside, height + depth * blob, 0.0)
            mask = inside & (np.abs(depth * blob) > 0.25 * abs(depth)) & (height > 0)
        elif defect == "stain":
            spot = blob > 0.3
            stain = np.where(spot, rng.uniform(0.35, 0.55), 1.0)
            mask = inside & spot
        else:
            msg = f"unknown defect type {defect!r}; choose from {list(DEFECT_TYPES)}"
            raise ValueError(msg)
        inside = height > 0
    # organized cloud: x/y on the grid (with jitter), z = camera distance - height, background 0
    jitter = rng.uniform(-0.05, 0.05, size=(2, size, size)) * pitch
    xs = (x - size / 2) * pitch + jitter[0]
    ys = (y - size / 2) * pitch + jitter[1]
    zs = CAMERA_DISTANCE - height + rng.normal(0, 2e-5, size=(size, size))
    xyz = np.stack([xs, ys, zs], axis=-1).astype(np.float32)
    xyz[~inside] = 0
    # RGB: Lambertian shading of the height map's normals, the category's colour, texture, stain
    gy, gx = np.gradient(height, pitch)
    normal = np.stack([-gx, -gy, np.ones_like(gx)], axis=-1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    light = np.array([-0.35, -0.45, 1.0])
    light /= np.linalg.norm(light)
    shade = 0.3 + 0.7 * np.clip(normal @ light, 0, None)
    colour = np.asarray(COLOURS[category])[None, None] * (shade * texture * stain)[..., None]
    rgb = np.clip(colour * 255 + rng.normal(0, 1.5, size=colour.shape), 0, 255)
    rgb[~inside] = 0
    return rgb.astype(np.uint8), xyz, (mask & inside).astype(np.uint8) * 255


def _write_sample(folder: Path, index: int, rgb: np.ndarray, xyz: np.ndarray, mask: np.ndarray | None) -> int:
    import tifffile

    name = f"{index:03d}"
    for sub in ("rgb", "xyz") + (("gt",) if mask is not None else ()):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(folder / "rgb" / f"{name}.png")
    tifffile.imwrite(folder / "xyz" / f"{name}.tiff", xyz, photometric="rgb")  # as MVTec 3D-AD: [H, W, 3]
    if mask is not None:
        Image.fromarray(mask).save(folder / "gt" / f"{name}.png")
    return 2 if mask is not None else 1  # png files written


def _write_category(out: Path, category: str, params: dict) -> int:
    rng = np.random.default_rng([params["seed"], zlib.crc32(category.encode())])
    size, written = params["image_size"], 0
    for split, label, index in sample_plan(params):
        rgb, xyz, mask = render_sample(category, size, rng, None if label == "good" else label)
        written += _write_sample(out / category / split / label, index, rgb, xyz, None if split == "train" else mask)
    return written


def make_demo3d_dataset(
    root: str | Path = "datasets/zsad_demo3d",
    seed: int = 0,
    categories: Sequence[str] = DEFAULT_CATEGORIES,
    image_size: int = 128,
    n_train: int = 8,
    n_test_good: int = 3,
    n_test_defect: int = 6,
    defect_types: Sequence[str] = DEFECT_TYPES,
    overwrite: bool = False,
) -> Path:
    """Create (or re-use) the 3D demo set at ``root`` and return it as an absolute path.

    Idempotent like :func:`anomalib_zsad.data.demo.make_demo_dataset`: a complete set made with
    the same parameters is returned untouched; other parameters or foreign files raise
    :class:`DatasetError` unless ``overwrite=True`` (demo sets only).

    Args:
        root: output folder; categories become its sub-folders (MVTec 3D-AD layout).
        seed: base seed; each category is seeded by ``(seed, crc32(category))``.
        categories: shapes, from :data:`SHAPES`.
        image_size: side of the square images and clouds in pixels (>= 32).
        n_train, n_test_good, n_test_defect: samples per category; defects round-robin over ``defect_types``.
        overwrite: replace an existing demo set made with different parameters.
    """
    root = Path(root).expanduser().resolve()
    unknown = [c for c in categories if c not in SHAPES]
    bad_defects = [d for d in defect_types if d not in DEFECT_TYPES]
    if unknown or bad_defects or not categories or not defect_types:
        msg = (f"Unknown 3D demo categories {unknown} / defect types {bad_defects} (or an empty list). Choose "
               f"categories from {sorted(SHAPES)} and defect types from {list(DEFECT_TYPES)}.")
        raise DatasetError(msg)
    if image_size < 32 or min(n_train, n_test_good, n_test_defect) < 0 or n_train == 0 or \
            n_test_defect + n_test_good == 0:
        msg = ("image_size must be >= 32, the sample counts non-negative, with at least one training and one "
               "test sample.")
        raise DatasetError(msg)
    params = {"version": FORMAT_VERSION, "kind": "mvtec3d", "seed": int(seed), "categories": list(categories),
              "image_size": int(image_size), "n_train": int(n_train), "n_test_good": int(n_test_good),
              "n_test_defect": int(n_test_defect), "defect_types": list(defect_types)}
    if _already_there(root, params, overwrite):
        return root
    try:
        tmp, lock = _make_temporary(root)
    except OSError as error:
        raise DatasetError(_cannot_write(root, error)) from error
    try:
        try:
            num_files = sum(_write_category(tmp, c, params) for c in categories)
            (tmp / MANIFEST).write_text(json.dumps({"params": params, "num_files": num_files}, indent=2))
            _swap_into_place(tmp, root, params)
        except OSError as error:
            raise DatasetError(_cannot_write(root, error)) from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _unlock(lock)
    return root


def main(argv: Sequence[str] | None = None) -> Path:
    """Command-line entry point (``python -m anomalib_zsad.data.demo3d``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="datasets/zsad_demo3d")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--categories", nargs="+", default=list(DEFAULT_CATEGORIES))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=8)
    parser.add_argument("--n-test-good", type=int, default=3)
    parser.add_argument("--n-test-defect", type=int, default=6)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        root = make_demo3d_dataset(args.root, seed=args.seed, categories=args.categories, image_size=args.image_size,
                                   n_train=args.n_train, n_test_good=args.n_test_good,
                                   n_test_defect=args.n_test_defect, overwrite=args.overwrite)
    except DatasetError as error:
        raise SystemExit(f"error: {error}") from None
    print(root)
    return root


if __name__ == "__main__":
    main()
