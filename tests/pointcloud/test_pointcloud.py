"""The point-cloud layer: the CUDA kernels' rules in pure torch (checked against literal
transcriptions of the kernels' loops), grouping, interpolation, organized clouds, background removal,
Point-MAE's encoder and its checkpoint format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anomalib_zsad.pointcloud import (
    PointMAEEncoder,
    PointMAEWeightsUnavailableError,
    farthest_point_sample,
    foreground_indices,
    group_points,
    interpolate_to_points,
    knn_indices,
    load_pointmae_weights,
    points_to_grid,
    remove_background,
    resize_organized,
    unorganize,
)


def kernel_fps(points: np.ndarray, count: int) -> list[int]:
    """``sampling_gpu.cu`` written out for one thread: start 0, temp 1e10, near-origin points skipped,
    strict ``>`` (first index on ties), float32 arithmetic."""
    points = points.astype(np.float32)
    temp = np.full(len(points), 1e10, dtype=np.float32)
    picks, old = [0], 0
    for _ in range(1, count):
        best, best_index = np.float32(-1), 0
        x1, y1, z1 = points[old]
        for k, (x2, y2, z2) in enumerate(points):
            if x2 * x2 + y2 * y2 + z2 * z2 <= np.float32(1e-3):
                continue
            d = (x2 - x1) * (x2 - x1) + (y2 - y1) * (y2 - y1) + (z2 - z1) * (z2 - z1)
            temp[k] = min(d, temp[k])
            if temp[k] > best:
                best, best_index = temp[k], k
        old = best_index
        picks.append(old)
    return picks


def kernel_knn(reference: np.ndarray, query: np.ndarray, k: int) -> list[list[int]]:
    """KNN_CUDA's insertion sort for one query: squared distances accumulated per axis in float32,
    a new point enters only if strictly closer than the current k-th (stable)."""
    out = []
    for q in query.astype(np.float32):
        distances = []
        for r in reference.astype(np.float32):
            total = np.float32(0)
            for axis in range(3):
                diff = r[axis] - q[axis]
                total = np.float32(total + diff * diff)
            distances.append(total)
        best: list[tuple[np.float32, int]] = []
        for index, value in enumerate(distances):
            if len(best) == k and value >= best[-1][0]:
                continue
            position = len(best)
            while position > 0 and best[position - 1][0] > value:
                position -= 1
            best.insert(position, (value, index))
            best = best[:k]
        out.append([index for _, index in best])
    return out


def test_farthest_point_sampling_follows_the_kernel() -> None:
    generator = np.random.default_rng(0)
    points = generator.normal(size=(120, 3)).astype(np.float32)
    points[5:15] *= 1e-3  # inside the 1e-3 ball: never selected
    points[40] = points[41]  # an exact tie
    picks = farthest_point_sample(torch.from_numpy(points)[None], 24)[0].tolist()
    assert picks == kernel_fps(points, 24)
    assert picks[0] == 0 and not set(picks[1:]) & set(range(5, 15))


def test_farthest_point_sampling_ties_go_to_the_lowest_index() -> None:
    points = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0], [0, 0, 1.0]]])
    # from point 0, the three others are at the same distance: the lowest index comes first
    assert farthest_point_sample(points, 3)[0].tolist() == [0, 1, 2]


def test_knn_follows_the_insertion_sort_with_ties() -> None:
    generator = np.random.default_rng(1)
    reference = generator.normal(size=(60, 3)).astype(np.float32)
    reference[30:33] = reference[3]  # exact ties
    query = reference[[3, 10, 50]] + np.float32(1e-3)
    actual = knn_indices(torch.from_numpy(reference)[None], torch.from_numpy(query)[None], 7, chunk=2)[0]
    assert actual.tolist() == kernel_knn(reference, query, 7)


def test_groups_are_relative_to_their_centers() -> None:
    points = torch.rand(1, 200, 3, generator=torch.Generator().manual_seed(0)) + 0.5
    neighborhood, center, neighbour_idx, center_idx = group_points(points, 8, 5)
    assert neighborhood.shape == (1, 8, 5, 3)
    torch.testing.assert_close(center[0], points[0, center_idx[0]])
    torch.testing.assert_close(neighborhood[0] + center[0][:, None], points[0, neighbour_idx[0]])
    assert (neighbour_idx[0, :, 0] == center_idx[0]).all()  # each center is its own nearest point


def test_interpolation_is_inverse_distance_of_three_centers() -> None:
    centers = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0], [0, 2.0, 0], [5.0, 5, 5]]])
    features = torch.tensor([[[1.0, 2.0, 3.0, 100.0]]])  # [B, C=1, G]
    point = torch.tensor([[[0.5, 0.5, 0.0]]])
    weights = 1 / (torch.tensor([0.5, 0.5, 2.5]) + 1e-8)
    expected = (weights * torch.tensor([1.0, 2.0, 3.0])).sum() / weights.sum()
    torch.testing.assert_close(interpolate_to_points(point, centers, features)[0, 0, 0], expected)


def test_points_to_grid_pools_without_padding() -> None:
    features = torch.ones(2, 3)
    grid = points_to_grid(features, torch.tensor([0, 5, 10]), (4, 4), (2, 2), chunk=1)
    assert grid.shape == (2, 2, 2)
    # 3x3 windows of a 4x4 grid (2x2 of them), each window's mean of the 0/1 image
    image = torch.zeros(16)
    image[[0, 5, 10]] = 1
    expected = torch.nn.functional.avg_pool2d(image.view(1, 1, 4, 4), 3, stride=1)[0, 0]
    torch.testing.assert_close(grid[0], expected)


def test_organized_clouds_resize_nearest_and_unorganize() -> None:
    cloud = torch.zeros(8, 8, 3)
    cloud[2:6, 2:6] = torch.tensor([0.1, 0.2, 0.4])
    cloud[3, 3] = torch.tensor([0.1, 0.0, 0.4])  # one zero coordinate: background
    resized = resize_organized(cloud.numpy(), 4)
    assert resized.shape == (1, 3, 4, 4)
    assert set(resized.flatten().tolist()) <= set(cloud.flatten().tolist())  # no averaged coordinate
    points, indices = unorganize(cloud.permute(2, 0, 1))
    assert points.shape == (15, 3) and 3 * 8 + 3 not in indices.tolist()
    assert torch.equal(foreground_indices(cloud.permute(2, 0, 1)), indices)


def test_background_plane_and_clutter_are_removed() -> None:
    size = 60
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) * 0.001
    plane = 0.5 + 0.05 * x  # a tilted table
    cloud = np.stack([x, y, plane], axis=-1)
    obj = (x - 0.03) ** 2 + (y - 0.03) ** 2 < 0.012**2
    cloud[obj, 2] -= 0.02  # an object 2 cm above the table
    speck = (slice(2, 4), slice(50, 52))
    cloud[speck[0], speck[1], 2] -= 0.03  # a separate speck: not the largest cluster
    rgb = np.full((size, size, 3), 200, np.uint8)
    cleaned, cleaned_rgb = remove_background(cloud, rgb, cluster_eps=0.0015, cluster_min_points=3, pad=False)
    kept = np.all(cleaned != 0, axis=-1)
    assert np.array_equal(kept, obj)
    assert (cleaned_rgb[~kept] == 0).all() and (cleaned_rgb[kept] == 200).all()
    padded, _ = remove_background(cloud, None, cluster_eps=0.0015, cluster_min_points=3)
    assert padded.shape == (100, 100, 3)


def test_pointmae_checkpoint_format(tmp_path: Path) -> None:
    """Point-MAE's ``pretrain.pth`` (``base_model`` with ``module.MAE_encoder.`` prefixes, decoder
    keys dropped) loads completely; a missing file or tensor is named."""
    source = PointMAEEncoder(num_group=8, group_size=4)
    stored = {f"module.MAE_encoder.{k}": v for k, v in source.state_dict().items()}
    stored["module.MAE_decoder.norm.weight"] = torch.ones(384)
    torch.save({"base_model": stored, "epoch": 300}, tmp_path / "pretrain.pth")
    target = PointMAEEncoder(num_group=8, group_size=4)
    load_pointmae_weights(target, tmp_path / "pretrain.pth")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values(),
                                                      strict=True))
    with pytest.raises(PointMAEWeightsUnavailableError, match="pretrain.pth"):
        load_pointmae_weights(target, tmp_path / "missing.pth")
    del stored["module.MAE_encoder.norm.weight"]
    torch.save({"base_model": stored}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="1 tensors missing"):
        load_pointmae_weights(target, tmp_path / "partial.pth")


def test_pointmae_stochastic_depth_replay_and_batch_statistics() -> None:
    """A forward is deterministic unless a generator or recorded factors are given; all-ones
    factors are the plain forward; batch-statistic BatchNorm ignores the running statistics."""
    torch.manual_seed(0)
    encoder = PointMAEEncoder(num_group=16, group_size=8)
    points = torch.rand(1, 300, 3, generator=torch.Generator().manual_seed(1)) + 0.5
    with torch.no_grad():
        plain = encoder(points)[0]
        assert plain.shape == (1, 1152, 16)
        torch.testing.assert_close(encoder(points, torch.ones(12, 2))[0], plain, atol=0, rtol=0)
        drawn = encoder.drop_path_scales(torch.Generator().manual_seed(3))
        assert drawn.shape == (12, 2) and (drawn[0] == 1).all()
        for block, probability in enumerate(encoder.drop_probabilities):
            assert set(drawn[block].tolist()) <= {0.0, float(torch.ones(1).div_(1 - probability))}  # timm's div_
        encoder.encoder.first_conv[1].running_mean.fill_(5.0)
        torch.testing.assert_close(encoder(points)[0], plain, atol=0, rtol=0)
        encoder.batch_statistics = False
        assert not torch.allclose(encoder(points)[0], plain)
