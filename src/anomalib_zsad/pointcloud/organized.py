"""Organized point clouds: an ``[H, W, 3]`` grid of xyz coordinates (one per pixel of the RGB
image), as MVTec 3D-AD stores them in its ``xyz/*.tiff`` files.

* :func:`read_organized_xyz` reads such a TIFF (float32 metres, background 0 after the data set's
  preprocessing);
* :func:`resize_organized` resizes it the way M3DM's loader does: nearest-neighbour
  ``F.interpolate`` on the ``[3, H, W]`` tensor (no averaging of coordinates across the object's
  border: a resized pixel is always one of the original points);
* :func:`foreground_indices` / :func:`unorganize`: the flat ``H*W`` indices whose three
  coordinates are all non-zero, and the ``[N, 3]`` cloud of those points (the official
  ``organized_pc_to_unorganized_pc`` + ``np.all(pc != 0, axis=1)``);
* :func:`remove_background` removes the supporting plane of a raw scan and keeps the largest
  connected part of what is left (the data set's preprocessing step, which M3DM runs once over the
  whole data set before training, ``utils/preprocessing.py``), in numpy and scikit-learn.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812


def read_organized_xyz(path: str | os.PathLike) -> np.ndarray:
    """The ``[H, W, 3]`` float32 organized point cloud of an MVTec 3D-AD ``xyz/*.tiff`` file."""
    import tifffile

    cloud = np.asarray(tifffile.imread(str(path)))
    if cloud.ndim != 3 or cloud.shape[-1] != 3:
        msg = f"{path}: an organized point cloud has shape [H, W, 3], got {list(cloud.shape)}"
        raise ValueError(msg)
    return cloud.astype(np.float32, copy=False)


def as_channels_first(cloud: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` / ``[B, H, W, 3]`` (file layout) or ``[3, H, W]`` / ``[B, 3, H, W]`` ->
    ``[B, 3, H, W]`` float32."""
    tensor = torch.as_tensor(cloud)
    if tensor.dim() == 3:
        tensor = tensor[None]
    if tensor.dim() != 4:
        msg = f"an organized point cloud has 3 or 4 dimensions, got shape {list(tensor.shape)}"
        raise ValueError(msg)
    if tensor.shape[1] != 3 and tensor.shape[-1] == 3:
        tensor = tensor.permute(0, 3, 1, 2)
    if tensor.shape[1] != 3:
        msg = f"an organized point cloud has 3 coordinates per pixel, got shape {list(tensor.shape)}"
        raise ValueError(msg)
    return tensor.float().contiguous()


def resize_organized(cloud: torch.Tensor | np.ndarray, size: int | tuple[int, int] = 224) -> torch.Tensor:
    """Nearest-neighbour resize of organized clouds to ``size`` -> ``[B, 3, h, w]`` (M3DM's loader)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    tensor = as_channels_first(cloud)
    if tuple(tensor.shape[-2:]) == size:
        return tensor
    return F.interpolate(tensor, size=size, mode="nearest")


def foreground_indices(cloud: torch.Tensor) -> torch.Tensor:
    """Flat indices (row-major over ``H*W``) of the pixels whose three coordinates are all non-zero,
    of one organized cloud ``[3, H, W]``."""
    flat = cloud.reshape(3, -1)
    return torch.nonzero((flat != 0).all(dim=0)).reshape(-1)


def unorganize(cloud: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[N, 3]`` foreground points, their flat pixel indices) of one organized cloud ``[3, H, W]``."""
    indices = foreground_indices(cloud)
    return cloud.reshape(3, -1)[:, indices].T.contiguous(), indices


# --------------------------------------------------------------------------- background removal
def _border_points(cloud: np.ndarray, width: int) -> np.ndarray:
    parts = [cloud[:width], cloud[-width:], cloud[:, :width], cloud[:, -width:]]
    points = np.concatenate([part.reshape(-1, 3) for part in parts])
    return points[np.all(points != 0, axis=1)]


def fit_plane_ransac(points: np.ndarray, threshold: float = 0.004, sample_size: int = 50, iterations: int = 1000,
                     seed: int = 0) -> np.ndarray:
    """Plane ``(a, b, c, d)`` (unit normal, ``a x + b y + c z + d = 0``) with the most points within
    ``threshold``, from least-squares fits to random subsets of ``sample_size`` points."""
    if len(points) < 3:
        msg = "fewer than 3 points to fit a plane to"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    points = points.astype(np.float64)
    best, best_count = None, -1
    size = min(sample_size, len(points))
    for _ in range(iterations):
        subset = points[rng.choice(len(points), size=size, replace=False)]
        centre = subset.mean(axis=0)
        normal = np.linalg.svd(subset - centre, full_matrices=False)[2][-1]
        plane = np.append(normal, -normal @ centre)
        count = int((np.abs(points @ plane[:3] + plane[3]) < threshold).sum())
        if count > best_count:
            best, best_count = plane, count
    return best


def _largest_cluster(points: np.ndarray, eps: float, min_points: int) -> np.ndarray:
    from sklearn.cluster import DBSCAN

    labels = DBSCAN(eps=eps, min_samples=min_points).fit(points).labels_
    ids, counts = np.unique(labels, return_counts=True)
    return labels == ids[np.argmax(counts)]


def pad_to_square(array: np.ndarray) -> np.ndarray:
    """Zero padding (centred) to a square whose side is the longer side rounded up to 100 px."""
    height, width = array.shape[:2]
    side = max(math.ceil(height / 100) * 100, math.ceil(width / 100) * 100)
    top, left = (side - height) // 2, (side - width) // 2
    pad = [(top, side - height - top), (left, side - width - left)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="constant")


def remove_background(cloud: np.ndarray, rgb: np.ndarray | None = None, plane_threshold: float = 0.005,
                      ransac_threshold: float = 0.004, border: int = 10, cluster_eps: float = 0.006,
                      cluster_min_points: int = 30, pad: bool = True,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """The data set's background removal of one raw MVTec 3D-AD scan (as M3DM's
    ``utils/preprocessing.py``, run once before training, not part of the model): the supporting
    plane is fitted (RANSAC) to the points of a ``border``-pixel frame, every point within
    ``plane_threshold`` of it is set to 0, the grid is zero-padded to a square (side rounded up to
    100 px), and only the largest DBSCAN cluster (``cluster_eps``, ``cluster_min_points``) is kept.
    The RGB image, if given, is blanked and padded alike. Returns ``(cloud, rgb)``.

    Differences from the official script: the plane and the clusters come from numpy/scikit-learn,
    not Open3D (``segment_plane`` / ``cluster_dbscan``), so borderline points can differ.
    """
    cloud = np.array(cloud, dtype=np.float32, copy=True)
    rgb = None if rgb is None else np.array(rgb, copy=True)
    plane = fit_plane_ransac(_border_points(cloud, border), threshold=ransac_threshold, seed=seed)
    flat = cloud.reshape(-1, 3)
    on_plane = np.abs(flat.astype(np.float64) @ plane[:3] + plane[3]) < plane_threshold
    flat[on_plane] = 0
    if rgb is not None:
        rgb.reshape(flat.shape[0], -1)[on_plane] = 0
    if pad:
        cloud = pad_to_square(cloud)
        rgb = None if rgb is None else pad_to_square(rgb)
    flat = cloud.reshape(-1, 3)
    kept = np.nonzero(np.all(flat != 0, axis=1))[0]
    if len(kept):
        outliers = kept[~_largest_cluster(flat[kept].astype(np.float64), cluster_eps, cluster_min_points)]
        flat[outliers] = 0
        if rgb is not None:
            rgb.reshape(flat.shape[0], -1)[outliers] = 0
    return cloud, rgb
