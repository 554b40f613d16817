"""Gaussian smoothing of anomaly maps, equal to ``scipy.ndimage.gaussian_filter`` in torch.

The official AnomalyCLIP, AdaCLIP and VAND code smooth maps with scipy on the CPU, one image at a
time, outside the model. Here it is a module inside the model (so it runs on the GPU, in a batch,
and is part of the exported graph) that gives scipy's numbers: kernel radius
``int(truncate * sigma + 0.5)``, weights ``exp(-x^2 / 2 sigma^2)`` normalised, border mode
``reflect`` (half-sample symmetric: ``d c b a | a b c d``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def _reflect_pad(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """scipy's ``reflect`` border along ``dim``: the edge sample is repeated."""
    size = x.shape[dim]
    if radius <= size:
        before = x.narrow(dim, 0, radius).flip(dim)
        after = x.narrow(dim, size - radius, radius).flip(dim)
        return torch.cat([before, x, after], dim=dim)
    # Wider than the image: scipy keeps reflecting; index with the periodic reflected pattern.
    index = torch.arange(-radius, size + radius, device=x.device)
    period = 2 * size
    index = index % period
    index = torch.where(index >= size, period - 1 - index, index)
    return x.index_select(dim, index)


class GaussianBlur(nn.Module):
    """Separable Gaussian blur of maps [B, H, W] or [B, 1, H, W]; identity when ``sigma <= 0``."""

    def __init__(self, sigma: float = 4.0, truncate: float = 4.0) -> None:
        super().__init__()
        self.sigma = float(sigma)
        self.radius = int(truncate * sigma + 0.5) if sigma > 0 else 0
        offsets = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2) if sigma > 0 else torch.ones(1, dtype=torch.float64)
        self.register_buffer("kernel", (kernel / kernel.sum()).float(), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.radius == 0:
            return maps
        squeeze = maps.dim() == 3
        x = maps[:, None] if squeeze else maps
        kernel = self.kernel.to(x.dtype)
        x = F.conv2d(_reflect_pad(x, self.radius, 3), kernel.view(1, 1, 1, -1))
        x = F.conv2d(_reflect_pad(x, self.radius, 2), kernel.view(1, 1, -1, 1))
        return x[:, 0] if squeeze else x
