"""Shared pieces: the scipy-equal Gaussian and the official losses' edge behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from anomalib_zsad.models.components import BinaryDiceLoss, FocalLoss, GaussianBlur


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
