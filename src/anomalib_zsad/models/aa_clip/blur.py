"""Gaussian smoothing of the patch-resolution maps, as ``kornia.filters.gaussian_blur2d``.

AA-CLIP's official test code smooths each level's map on the patch grid (37 x 37 for 518 px)
with kornia, ``border_type='reflect'``: torch's reflect padding (the edge sample is *not*
repeated, unlike scipy's ``reflect`` of :class:`~anomalib_zsad.models.components.GaussianBlur`)
and a window given in samples (7 for industrial, 9 for medical data), not a truncation radius.
Written in torch so that it runs inside the model and in exported graphs, without kornia.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


class KorniaGaussianBlur(nn.Module):
    """Separable blur of maps [B, 1, H, W] with kornia's kernel and reflect border."""

    def __init__(self, kernel_size: int = 7, sigma: float = 1.0) -> None:
        super().__init__()
        if kernel_size % 2 != 1 or kernel_size < 1:
            msg = f"kernel_size must be odd and positive, got {kernel_size}"
            raise ValueError(msg)
        self.kernel_size = kernel_size
        self.sigma = float(sigma)
        offsets = torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2
        kernel = torch.exp(-(offsets**2) / (2 * self.sigma**2)) if sigma > 0 else (offsets == 0).float()
        self.register_buffer("kernel", kernel / kernel.sum(), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.kernel_size == 1:
            return maps
        radius = self.kernel_size // 2
        kernel = self.kernel.to(maps.dtype)
        channels = maps.shape[1]
        horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
        vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
        x = F.conv2d(F.pad(maps, (radius, radius, 0, 0), mode="reflect"), horizontal, groups=channels)
        return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), vertical, groups=channels)
