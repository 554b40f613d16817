"""Group features back to points and to the pixel grid (M3DM's point-feature alignment).

* :func:`interpolate_to_points`: each point gets the inverse-distance weighted mean of the
  features of its 3 nearest group centers (PointNet++'s ``three_interpolate`` rule as M3DM's
  ``interpolating_points`` writes it: squared distances by the matmul form
  ``-2·a·bᵀ + |a|² + |b|²``, sorted, ``w = (1/(d + 1e-8)) / Σ``);
* :func:`points_to_grid`: the point features are put back at their pixels of the organized
  cloud (background pixels 0), averaged over 3x3 windows without padding (``H → H-2``) and
  adaptively average-pooled to the patch grid (``224 → 222 → 56`` officially, uneven bins).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

INTERPOLATION_NEIGHBOURS = 3
INTERPOLATION_EPS = 1e-8


def square_distance(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[B, N, M]`` squared distances by PointNet++'s matmul form (not ``cdist``: the rounding
    differs, and with it near-tied neighbours)."""
    distance = -2 * torch.matmul(source, target.permute(0, 2, 1))
    distance += torch.sum(source**2, -1)[:, :, None]
    distance += torch.sum(target**2, -1)[:, None, :]
    return distance


def interpolate_to_points(points: torch.Tensor, centers: torch.Tensor, features: torch.Tensor,
                          chunk: int = 8192) -> torch.Tensor:
    """Features ``[B, C, N]`` of ``points`` ``[B, N, 3]`` from those of ``centers`` ``[B, G, 3]``
    (``features`` ``[B, C, G]``), by inverse squared-distance weights of the 3 nearest centers."""
    per_center = features.permute(0, 2, 1)  # [B, G, C]
    out = []
    for start in range(0, points.shape[1], chunk):
        distance = square_distance(points[:, start:start + chunk], centers)
        distance, index = distance.sort(dim=-1)
        distance, index = distance[:, :, :INTERPOLATION_NEIGHBOURS], index[:, :, :INTERPOLATION_NEIGHBOURS]
        reciprocal = 1.0 / (distance + INTERPOLATION_EPS)
        weight = reciprocal / torch.sum(reciprocal, dim=2, keepdim=True)
        gathered = torch.stack([per_center[torch.arange(per_center.shape[0])[:, None], index[:, :, j]]
                                for j in range(INTERPOLATION_NEIGHBOURS)], dim=2)  # [B, n, 3, C]
        out.append(torch.sum(gathered * weight[..., None], dim=2))
    return torch.cat(out, dim=1).permute(0, 2, 1)


def points_to_grid(point_features: torch.Tensor, pixel_indices: torch.Tensor, image_size: tuple[int, int],
                   grid_size: tuple[int, int], window: int = 3, chunk: int = 128) -> torch.Tensor:
    """``[C, h, w]`` patch features of one cloud: ``point_features`` ``[C, N]`` scattered to their
    ``pixel_indices`` of an ``image_size`` grid (zeros elsewhere), ``window``x``window`` average
    without padding, then adaptive average pooling to ``grid_size``. Channels are pooled ``chunk``
    at a time (each channel on its own: the same numbers, a fraction of the memory)."""
    channels = point_features.shape[0]
    out = []
    for start in range(0, channels, chunk):
        part = point_features[start:start + chunk]
        full = part.new_zeros(part.shape[0], image_size[0] * image_size[1])
        full[:, pixel_indices] = part
        full = full.view(1, part.shape[0], *image_size)
        if window > 1:
            full = F.avg_pool2d(full, window, stride=1)
        out.append(F.adaptive_avg_pool2d(full, grid_size)[0])
    return torch.cat(out, dim=0)
