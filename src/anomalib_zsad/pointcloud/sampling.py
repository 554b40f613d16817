"""Farthest point sampling and kNN grouping in pure torch, with the rules of the CUDA kernels
that Point-MAE (and M3DM) call, so that no CUDA-only extension is needed and the same indices come
out on any device.

Farthest point sampling (``pointnet2_ops`` ``furthest_point_sample``, ``sampling_gpu.cu``):

* the first index is always 0;
* every point's running distance starts at ``1e10``;
* points with ``x² + y² + z² <= 1e-3`` are skipped: never selected, their distance never updated
  (in M3DM they cannot occur, the background was removed, but the rule is kept);
* each step computes ``d = dx·dx + dy·dy + dz·dz`` in float32 from the last selected point,
  keeps ``min(d, running)``, and selects the largest running distance; exact ties go to the
  lowest index (the kernel's per-thread scan keeps the first; its cross-thread reduction may
  pick another tied point, which no CPU can reproduce).

kNN (``knn_cuda.KNN``, Garcia's insertion sort): squared distances accumulated over x, y, z in
float32, the ``k`` smallest in ascending order, exact ties to the lower reference index (the
insertion sort is stable). Here the order is made exact by sorting 64-bit keys
``(float bits of the distance) << 32 | index``: the bit pattern of a non-negative float32 is
monotonic in its value, so the keys sort like the distances with ties broken by index.
"""

from __future__ import annotations

import torch

FPS_SKIP_RADIUS_SQ = 1e-3
FPS_INITIAL_DISTANCE = 1e10


def farthest_point_sample(points: torch.Tensor, count: int) -> torch.Tensor:
    """Indices ``[B, count]`` (int64) of the farthest point sampling of ``points`` ``[B, N, 3]``."""
    if points.dim() != 3 or points.shape[-1] != 3:
        msg = f"points must be [B, N, 3], got {list(points.shape)}"
        raise ValueError(msg)
    batch, total, _ = points.shape
    if count > total:
        msg = f"cannot sample {count} points from {total}"
        raise ValueError(msg)
    points = points.float()
    x, y, z = points.unbind(-1)
    valid = (x * x + y * y + z * z) > FPS_SKIP_RADIUS_SQ
    running = torch.full((batch, total), FPS_INITIAL_DISTANCE, dtype=torch.float32, device=points.device)
    masked = torch.empty_like(running)
    selected = torch.zeros(batch, count, dtype=torch.int64, device=points.device)
    rows = torch.arange(batch, device=points.device)
    last = torch.zeros(batch, dtype=torch.int64, device=points.device)
    for step in range(1, count):
        origin = points[rows, last]  # [B, 3]
        dx = x - origin[:, 0:1]
        dy = y - origin[:, 1:2]
        dz = z - origin[:, 2:3]
        distance = dx * dx + dy * dy + dz * dz
        running = torch.where(valid, torch.minimum(distance, running), running)
        masked.copy_(running).masked_fill_(~valid, -1.0)
        last = torch.argmax(masked, dim=1)  # first maximum: ties to the lowest index
        selected[:, step] = last
    return selected


def squared_distances(reference: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``[B, Q, N]`` squared distances accumulated coordinate by coordinate in float32 (as
    ``knn_cuda``): ``(r₀-q₀)² + (r₁-q₁)² + (r₂-q₂)²``."""
    total = None
    for axis in range(reference.shape[-1]):
        diff = reference[:, None, :, axis] - query[:, :, None, axis]
        total = diff * diff if total is None else total + diff * diff
    return total


def knn_indices(reference: torch.Tensor, query: torch.Tensor, k: int, chunk: int = 128) -> torch.Tensor:
    """Indices ``[B, Q, k]`` (int64) of the ``k`` nearest ``reference`` points ``[B, N, 3]`` of
    each ``query`` point ``[B, Q, 3]``: ascending squared distance, ties to the lower index."""
    if k > reference.shape[1]:
        msg = f"cannot take {k} neighbours among {reference.shape[1]} points"
        raise ValueError(msg)
    reference, query = reference.float(), query.float()
    index = torch.arange(reference.shape[1], device=reference.device, dtype=torch.int64)
    out = []
    for start in range(0, query.shape[1], chunk):
        distance = squared_distances(reference, query[:, start:start + chunk])
        keys = (distance.contiguous().view(torch.int32).to(torch.int64) << 32) | index
        out.append(torch.topk(keys, k, dim=-1, largest=False, sorted=True).values & 0xFFFFFFFF)
    return torch.cat(out, dim=1)


def group_points(points: torch.Tensor, num_group: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor, torch.Tensor]:
    """Point-MAE's ``Group``: centers by farthest point sampling, their ``group_size`` nearest
    points, each group relative to its center.

    Args:
        points: ``[B, N, 3]``.

    Returns:
        ``(neighborhood [B, G, M, 3], center [B, G, 3], neighbour_idx [B, G, M], center_idx [B, G])``.
    """
    center_idx = farthest_point_sample(points, num_group)
    center = torch.gather(points, 1, center_idx[..., None].expand(-1, -1, 3))
    neighbour_idx = knn_indices(points, center, group_size)
    batch = points.shape[0]
    flat = neighbour_idx.reshape(batch, -1)
    neighborhood = torch.gather(points, 1, flat[..., None].expand(-1, -1, 3)).reshape(batch, num_group, group_size, 3)
    return neighborhood - center[:, :, None], center, neighbour_idx, center_idx
