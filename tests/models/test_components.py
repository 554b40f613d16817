"""Shared pieces: the scipy-equal Gaussian and the official losses' edge behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from anomalib_zsad.models.components import BinaryDiceLoss, FocalLoss, GaussianBlur
from anomalib_zsad.models.components.class_names import class_name_from_path, class_names_for


@pytest.mark.parametrize(("sigma", "shape"), [(4.0, (2, 60, 45)), (1.5, (1, 9, 9)), (8.0, (1, 12, 20))])
def test_gaussian_equals_scipy(sigma: float, shape: tuple[int, ...]) -> None:
    maps = torch.rand(shape)
    expected = np.stack([gaussian_filter(m, sigma=sigma) for m in maps.numpy()])
    np.testing.assert_allclose(GaussianBlur(sigma)(maps).numpy(), expected, atol=1e-6)
    assert GaussianBlur(0)(maps) is maps


def test_losses_reward_the_right_answer() -> None:
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:5, 2:5] = 1
    right = torch.stack([1 - mask, mask], dim=1).clamp(0.01, 0.99)
    wrong = right.flip(1)
    focal, dice = FocalLoss(), BinaryDiceLoss()
    assert focal(right, mask) < focal(wrong, mask)
    assert dice(right[:, 1], mask) < 0.05 < dice(wrong[:, 1], mask)


def test_class_names_come_from_the_data_set_layout() -> None:
    assert class_name_from_path("/data/MVTecAD/metal_nut/test/scratch/000.png") == "metal_nut"
    assert class_name_from_path("/data/visa/candle/Data/Images/Anomaly/001.JPG") == "candle"
    assert class_name_from_path("/data/visa/candle/train/good/001.JPG") == "candle"
    assert class_name_from_path("/some/folder/image.png") == "object"
    assert class_names_for(["/d/bottle/test/good/0.png"], "auto") == ["bottle"]
    assert class_names_for(["/d/bottle/test/good/0.png"], "screw") is None
