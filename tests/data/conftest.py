"""Fixtures for the data tests: tiny demo sets and helpers that write odd images into tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_zsad.data.demo import make_demo_dataset

TINY = {"image_size": 64, "n_train": 2, "n_test_good": 2, "n_test_defect": 4}


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention tiny demo set (3 categories, 64 px) shared by the session."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "zsad_demo", seed=0,
                             categories=("brick", "grass", "coffee"), **TINY)


@pytest.fixture
def demo_copy(demo_root: Path, tmp_path: Path) -> Path:
    """A private copy of the demo set that a test may damage."""
    return Path(shutil.copytree(demo_root, tmp_path / "zsad_demo"))


def save_png(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as PNG; Pillow picks the mode (uint16 2-D -> 16-bit grayscale, HxWx4 -> RGBA)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_mvtec_category(root: Path, size: tuple[int, int] = (32, 48), masks: bool = True) -> Path:
    """A minimal MVTec-layout category: 2 good, 2 'dent' images (+ masks) in ``root``."""
    rng = np.random.default_rng(0)
    height, width = size
    for i in range(2):
        save_png(root / "test" / "good" / f"{i:03d}.png", rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        save_png(root / "test" / "dent" / f"{i:03d}.png", rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        if masks:
            mask = np.zeros((height, width), np.uint8)
            mask[4:10, 4:12] = 255
            save_png(root / "ground_truth" / "dent" / f"{i:03d}_mask.png", mask)
    return root
