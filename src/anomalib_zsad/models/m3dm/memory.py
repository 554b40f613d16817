"""M3DM's memory banks: the libraries' normalisation, the coreset, and the scoring of one
modality (``feature_extractors/features.py`` and ``multiple_features.py`` of the official code).

Everything here follows the official arithmetic, quirks included (the parity set's README, §4-§5):

* **normalisation** (:func:`bank_normalization`): all three libraries are normalised with the
  mean of the *point* library and the (unbiased) standard deviation of the *RGB* library;
* **coreset** (:func:`coreset_indices`): a sparse random projection (scikit-learn,
  ``eps=0.9``; the official ``random_state=None`` draws from numpy's global generator, here a
  seed), then the greedy k-center loop in **float16**, starting from row 0, first index on ties;
* **sizes**: the point bank keeps ``int(f·rows)``, the RGB and fused banks ``int(f·n_point)``
  (1 % of the point rows at the official f = 0.1), and the point bank gets an extra all-zero row;
* **scoring** (:func:`score_modality`): ``cdist`` to the bank, the largest nearest-neighbour
  distance re-weighted by the distances to the bank neighbours of its match (``n_reweight = 3``,
  ``D = sqrt(C)``), the map upsampled bilinearly and blurred by :func:`blur_8bit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812


def bank_normalization(xyz_lib: torch.Tensor, rgb_lib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) that normalise *all three* libraries: ``mean(xyz_lib)``, ``std(rgb_lib)`` (the
    official ``run_coreset``, lines 841-846)."""
    return torch.mean(xyz_lib), torch.std(rgb_lib)


def random_projection(library: torch.Tensor, eps: float = 0.9, seed: int | None = 0,
                      components: object | None = None) -> torch.Tensor:
    """The library projected by scikit-learn's ``SparseRandomProjection(eps)`` (target dimension
    by the Johnson-Lindenstrauss bound), in float64 as the official call gives it (scikit-learn
    converts the float32 torch tensor to float64). ``components``: a ``[k, C]`` sparse matrix to
    use instead of a seeded draw (to replay a recorded projection)."""
    from sklearn.random_projection import SparseRandomProjection

    array = library.detach().cpu().numpy().astype(np.float64)
    transformer = SparseRandomProjection(eps=eps, random_state=seed)
    transformer.fit(array)
    if components is not None:
        if tuple(components.shape) != tuple(transformer.components_.shape):
            msg = (f"projection of shape {tuple(components.shape)} for a library that needs "
                   f"{tuple(transformer.components_.shape)}")
            raise ValueError(msg)
        transformer.components_ = components.astype(np.float64)
    return torch.from_numpy(np.asarray(transformer.transform(array)))


def greedy_coreset(projected: torch.Tensor, count: int, float16: bool = True,
                   first_distances: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``[count]`` of the official greedy k-center loop on ``projected`` rows: start at row
    0, distances of every row to the last pick (``torch.linalg.norm``), running minimum, next pick
    = first maximum, its distance set to 0. With ``float16`` (official) the rows and the running
    distances are cast to half precision after the first distances were computed in the input's
    precision (``first_distances`` replaces those, to replay recorded inputs)."""
    last = projected[0:1]
    picks = [torch.tensor(0)]
    minimum = torch.linalg.norm(projected - last, dim=1, keepdim=True) if first_distances is None else first_distances
    rows = projected
    if float16:
        last, rows, minimum = last.half(), rows.half(), minimum.half()
    for _ in range(count - 1):
        distance = torch.linalg.norm(rows - last, dim=1, keepdim=True)
        minimum = torch.minimum(distance, minimum)
        index = torch.argmax(minimum)
        last = rows[index:index + 1]
        minimum[index] = 0
        picks.append(index)
    return torch.stack(picks).long()


def coreset_indices(library: torch.Tensor, count: int, eps: float = 0.9, float16: bool = True, seed: int | None = 0,
                    components: object | None = None) -> torch.Tensor:
    """The official ``get_coreset_idx_randomp``: random projection, then the greedy loop."""
    projected = random_projection(library, eps=eps, seed=seed, components=components)
    return greedy_coreset(projected, count, float16=float16)


def coreset_sizes(point_rows: int, fraction: float) -> tuple[int, int]:
    """(point bank, RGB and fused banks) sizes of the official ``run_coreset``: ``int(f·rows)``,
    then ``int(f·n_point)`` for the other two (their call reads the point library's size after it
    was subsampled)."""
    point = int(fraction * point_rows)
    return point, int(fraction * point)


@dataclass
class ModalityScore:
    """What the official ``compute_single_s_s_map`` computes for one modality of one sample."""

    min_val: torch.Tensor  # [P] nearest-bank distance per patch
    min_idx: torch.Tensor  # [P]
    s_idx: int  # the patch with the largest distance
    nn_idx: torch.Tensor  # [n_reweight] bank neighbours of its match (the match first)
    m_star_knn: torch.Tensor  # [n_reweight - 1] distances of that patch to those neighbours
    s: torch.Tensor  # re-weighted image score (0-d)
    s_map: torch.Tensor  # [H, W] blurred map


def score_modality(patch: torch.Tensor, bank: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int],
                   n_reweight: int = 3, blur_radius: float = 4, weight_eps: float = 0.0,
                   divisor: float = 1.0) -> ModalityScore:
    """Score ``patch`` ``[P, C]`` (normalised) against ``bank`` ``[L, C]`` (official arithmetic).
    ``weight_eps``: added to the re-weighting's denominator (the official ``DINO`` and ``Point_MAE``
    settings add ``1e-5``; ``Fusion`` and the multi-bank settings add nothing). ``divisor``: the
    largest distance and the neighbour distances are divided by it before the re-weighting
    (``DINO+Point_MAE``: 1000; the map keeps the distances)."""
    distance = torch.cdist(patch, bank)
    min_val, min_idx = torch.min(distance, dim=1)
    s_idx = torch.argmax(min_val)
    s_star = torch.max(min_val)
    if divisor != 1:
        s_star = s_star / divisor
    m_test = patch[s_idx].unsqueeze(0)
    m_star = bank[min_idx[s_idx]].unsqueeze(0)
    w_dist = torch.cdist(m_star, bank)
    _, nn_idx = torch.topk(w_dist, k=min(n_reweight, bank.shape[0]), largest=False)
    m_star_knn = torch.linalg.norm(m_test - bank[nn_idx[0, 1:]], dim=1)
    if divisor != 1:
        m_star_knn = m_star_knn / divisor
    scale = torch.sqrt(torch.tensor(patch.shape[1]))
    denominator = torch.sum(torch.exp(m_star_knn / scale))
    if weight_eps:
        denominator = denominator + weight_eps
    weight = 1 - (torch.exp(s_star / scale) / denominator)
    s = weight * s_star
    s_map = F.interpolate(min_val.view(1, 1, *grid), size=tuple(image_size), mode="bilinear")
    s_map = blur_8bit(s_map[0, 0], blur_radius)
    return ModalityScore(min_val=min_val, min_idx=min_idx, s_idx=int(s_idx), nn_idx=nn_idx[0], m_star_knn=m_star_knn,
                         s=s, s_map=s_map)


def pillow_box_radius(radius: float, passes: int = 3) -> float:
    """Pillow's ``_gaussian_blur_radius``: the fractional box radius whose ``passes`` box blurs
    approximate a Gaussian of standard deviation ``radius`` (float32 arithmetic as the C code,
    its ``sqrt``/``floor`` in double)."""
    f32 = np.float32
    sigma2 = f32(f32(radius) * f32(radius) / f32(passes))
    length = f32(math.sqrt(12.0 * float(sigma2) + 1.0))
    whole = f32(math.floor((float(length) - 1.0) / 2.0))
    fraction = f32(f32(f32(2) * whole + f32(1)) * f32(whole * f32(whole + f32(1)) - f32(3) * sigma2))
    fraction = f32(fraction / f32(f32(6) * f32(sigma2 - f32(whole + f32(1)) * f32(whole + f32(1)))))
    return float(f32(whole + fraction))


def _box_pass(values: torch.Tensor, radius: int, weight: int, edge_weight: int) -> torch.Tensor:
    """One pass of Pillow's ``ImagingLineBoxBlur8`` along the last axis, in exact integer arithmetic:
    the ``2r+1`` pixels of the window with weight ``ww``, the next one on each side with ``fw``
    (8.24 fixed point), edges repeated, rounded to 8 bits."""
    size = values.shape[-1]
    shape = (*values.shape[:-1], radius + 1)
    padded = torch.cat([values[..., :1].expand(shape), values, values[..., -1:].expand(shape)], dim=-1)
    # window sums from one cumulative sum (exact in integers; a short graph when exported)
    total = torch.cumsum(padded, dim=-1)
    window = total[..., 2 * radius + 1:2 * radius + 1 + size] - total[..., :size]
    far = padded[..., :size] + padded[..., 2 * radius + 2:2 * radius + 2 + size]
    # (window·ww + far·fw + 2^23) >> 24, with the weights split at 12 bits so that no product
    # passes 2^31: OpenVINO runs int64 graphs in int32. Exact: floor((A·2^12 + B) / 2^24) equals
    # floor((A + floor(B / 2^12)) / 2^12) for integers A, B >= 0.
    high = window * (weight >> 12) + far * (edge_weight >> 12)
    low = window * (weight & 4095) + far * (edge_weight & 4095) + (1 << 23)
    return (high + low // 4096) // 4096


def gaussian_blur_8bit(image: torch.Tensor, radius: float = 4, passes: int = 3) -> torch.Tensor:
    """Pillow's ``ImageFilter.GaussianBlur(radius)`` on 8-bit images ``[..., H, W]``, bit for bit:
    ``passes`` box blurs along the rows, then along the columns, each rounded to 8 bits."""
    box = pillow_box_radius(radius, passes)
    whole = int(box)
    weight = int(np.float32(1 << 24) / np.float32(np.float32(box) * np.float32(2) + np.float32(1)))
    edge_weight = ((1 << 24) - (2 * whole + 1) * weight) // 2
    values = image.to(torch.int64)
    for _ in range(passes):
        values = _box_pass(values, whole, weight, edge_weight)
    values = values.transpose(-1, -2)
    for _ in range(passes):
        values = _box_pass(values, whole, weight, edge_weight)
    return values.transpose(-1, -2).to(torch.uint8)


def blur_8bit(score_map: torch.Tensor, radius: float = 4) -> torch.Tensor:
    """The official ``KNNGaussianBlur``: the map divided by its maximum, quantised to 8 bits
    (``mul(255).byte()``, truncation), Pillow's ``GaussianBlur(radius)`` on the 8-bit image, back
    to [0, 1] (``/255``) and times the maximum. ``[H, W]`` in and out (float32). The blur is
    :func:`gaussian_blur_8bit` (Pillow's integer arithmetic in torch, on any device)."""
    peak = score_map.max()
    if not bool(peak > 0):
        return torch.zeros_like(score_map)
    quantised = (score_map / peak).mul(255).to(torch.uint8)
    return gaussian_blur_8bit(quantised, radius).float().div(255) * peak
