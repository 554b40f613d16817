"""Point-cloud operations in pure torch (no CUDA-only extension): organized clouds, farthest
point sampling and kNN grouping with the CUDA kernels' rules, Point-MAE's encoder, and the
interpolation of group features back to the pixel grid. Used by M3DM (``models/m3dm``)."""

from .interpolation import interpolate_to_points, points_to_grid, square_distance
from .organized import (
    as_channels_first,
    fit_plane_ransac,
    foreground_indices,
    pad_to_square,
    read_organized_xyz,
    remove_background,
    resize_organized,
    unorganize,
)
from .pointmae import (
    POINTMAE_URL,
    PointMAEEncoder,
    PointMAEWeightsUnavailableError,
    load_pointmae_weights,
    read_pointmae_checkpoint,
)
from .sampling import farthest_point_sample, group_points, knn_indices

__all__ = [
    "POINTMAE_URL",
    "PointMAEEncoder",
    "PointMAEWeightsUnavailableError",
    "as_channels_first",
    "farthest_point_sample",
    "fit_plane_ransac",
    "foreground_indices",
    "group_points",
    "interpolate_to_points",
    "knn_indices",
    "load_pointmae_weights",
    "pad_to_square",
    "points_to_grid",
    "read_organized_xyz",
    "read_pointmae_checkpoint",
    "remove_background",
    "resize_organized",
    "square_distance",
    "unorganize",
]
