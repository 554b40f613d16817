"""What the up-front data checks cost: header checks of every image on a generated MVTec-layout tree.

    python benchmarks/validate_headers.py                      # 10,000 images (+ masks), 256 px PNG
    python benchmarks/validate_headers.py --images 2000 --size 128 --repeats 1   # quick run

``CrossDataset(validate=True)`` (the default) opens every image and mask with Pillow without
decoding its pixels (``validate_mvtec_category(..., decode=False)``). This script writes a tree of
``--images`` test images (60 % good, 40 % anomalous with a mask each) in ``--categories``
categories, then times, best of ``--repeats`` runs (warm page cache: the files were just written):

* ``image_size`` on every image and mask - the header reads alone;
* ``validate_folder_dataset(root, decode=False)`` - the same plus listing folders and pairing masks
  (what ``validate=True`` runs per category);
* ``validate_folder_dataset(root, decode=True)`` - every pixel decoded, for comparison (one run);
* ``CrossDataset.setup()`` with ``validate=False`` and ``validate=True`` (train on all categories but
  the last, test on the last; includes anomalib's indexing and the target-overlap guard).

It prints a table (seconds, microseconds per file) and removes the tree unless ``--keep``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="test images in the tree (default %(default)s)")
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--size", type=int, default=256, help="side of the square PNGs in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is kept)")
    parser.add_argument("--root", type=Path, help="where to write the tree (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated tree")
    parser.add_argument("--no-datamodule", action="store_true", help="skip the CrossDataset rows (no anomalib)")
    return parser.parse_args(argv)


def write_tree(root: Path, images: int, categories: int, size: int) -> tuple[list[Path], list[Path], list[Path]]:
    """``root/cat<k>/test/{good,dent}/`` + ``ground_truth/dent/*_mask.png``; returns (good, anomalous, masks)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    base = np.dstack([x, y, (x + y) // 2]).astype(np.int32) * 255 // max(1, size - 1)
    good, anomalous, masks = [], [], []
    for index in range(images):
        category = root / f"cat{index % categories:02d}"
        number = index // categories
        pixels = np.clip(base + rng.integers(-12, 13, (1, 1, 3)), 0, 255).astype(np.uint8)
        top, left = (int(v) for v in rng.integers(0, size // 2, 2))  # unique content: a random square
        pixels[top : top + size // 8, left : left + size // 8] = rng.integers(0, 256, 3, dtype=np.uint8)
        is_anomalous = number % 5 >= 3  # 40 %
        folder = category / "test" / ("dent" if is_anomalous else "good")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{number:05d}.png"
        Image.fromarray(pixels).save(path, compress_level=1)
        if is_anomalous:
            mask = np.zeros((size, size), np.uint8)
            mask[top : top + size // 8, left : left + size // 8] = 255
            mask_path = category / "ground_truth" / "dent" / f"{number:05d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(mask_path, compress_level=1)
            anomalous.append(path)
            masks.append(mask_path)
        else:
            good.append(path)
    return good, anomalous, masks


def best_of(repeats: int, function: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> list[tuple[str, int, float]]:
    args = parse_args(argv)
    from anomalib_zsad.data.validation import image_size, validate_folder_dataset

    own_root = args.root is None
    root = Path(tempfile.mkdtemp(prefix="zsad-headers-")) if own_root else args.root
    try:
        start = time.perf_counter()
        good, anomalous, masks = write_tree(root, args.images, args.categories, args.size)
        print(f"wrote {len(good) + len(anomalous)} images + {len(masks)} masks ({args.size} px PNG, "
              f"{args.categories} categories) to {root} in {time.perf_counter() - start:.1f} s")

        def headers() -> None:
            for path in (*good, *anomalous):
                image_size(path)
            for path in masks:
                image_size(path, is_mask=True)

        files = len(good) + 2 * len(anomalous)
        rows = [
            ("image_size() of every image and mask", files, best_of(args.repeats, headers)),
            ("validate_folder_dataset(decode=False)", files,
             best_of(args.repeats, lambda: validate_folder_dataset(root, decode=False))),
            ("validate_folder_dataset(decode=True)", files,
             best_of(1, lambda: validate_folder_dataset(root, decode=True))),
        ]
        if not args.no_datamodule:
            from anomalib.data import MVTecAD

            from anomalib_zsad.data import CrossDataset

            names = sorted(p.name for p in root.iterdir())

            def setup(validate: bool) -> None:
                CrossDataset(train=MVTecAD(root=root), test=MVTecAD(root=root, category=names[-1]),
                             train_categories=names[:-1], num_workers=0, validate=validate).setup()

            rows.append(("CrossDataset.setup(validate=False)", files, best_of(args.repeats, lambda: setup(False))))
            rows.append(("CrossDataset.setup(validate=True)", files, best_of(args.repeats, lambda: setup(True))))
        print("\n| check | files | seconds | us / file |\n|---|---:|---:|---:|")
        for name, files, seconds in rows:
            print(f"| {name} | {files} | {seconds:.2f} | {seconds / files * 1e6:.0f} |")
        return rows
    finally:
        if own_root and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
