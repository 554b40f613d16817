"""Hybrid semantic fusion (HSF): an image-level feature from the most anomalous patches.

The official code ranks patches by their anomalous probability (softmax of the layer-mean of the
x100 logits), keeps the top ``5 * k``, clusters their concatenated per-layer features with
scikit-learn's ``KMeans`` (no ``random_state``: the result depends on numpy's global RNG), and
averages the cluster means without weights. Here the clustering is a small deterministic torch
k-means (greedy k-means++ seeding from fixed draws of a private generator, then Lloyd iterations) so
that results are reproducible per process, computed on the model's device, batched and
exportable (the same algorithm as scikit-learn's: greedy k-means++ seeding, Lloyd iterations,
relocation of empty clusters); ``kmeans_backend="sklearn"`` calls
scikit-learn as the official code does (with ``random_state=seed``; ``seed=None`` draws from
numpy's global RNG like the official run). Labels can also be given from outside (parity tests
feed the official ones): gradients flow through the cluster means, never through the labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

KMEANS_BACKENDS = ("torch", "sklearn")


def _squared_distances(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """[B, n, d] x [B, k, d] -> [B, n, k]."""
    return ((x[:, :, None, :] - centers[:, None, :, :]) ** 2).sum(-1)


def local_trials(k: int) -> int:
    """Candidates per greedy k-means++ step: scikit-learn's ``2 + int(log(k))`` (4 for k = 20)."""
    return 2 + int(math.log(k)) if k > 1 else 1


def kmeans_uniforms(k: int, seed: int = 0) -> torch.Tensor:
    """The uniform draws of greedy k-means++ seeding (one for the first centre, then
    :func:`local_trials` per further centre), from a private generator (no global RNG)."""
    return torch.rand(1 + (k - 1) * local_trials(k), generator=torch.Generator().manual_seed(seed))


def kmeans_labels(x: torch.Tensor, k: int, seed: int = 0, max_iter: int = 300,
                  uniforms: torch.Tensor | None = None, export_iters: int = 30) -> torch.Tensor:
    """Cluster the rows of ``x`` ([n, d], or a batch [B, n, d] clustered image by image) into
    ``k`` groups; returns int64 labels [n] (or [B, n]).

    The algorithm of scikit-learn's ``KMeans(n_init="auto")`` (what the official code calls):
    *greedy* k-means++ seeding (each new centre is the best, by the resulting inertia, of
    ``2 + int(log k)`` candidates drawn with probability proportional to the squared distance to
    the nearest centre), then Lloyd iterations until no label changes (at most ``max_iter``); an
    empty cluster is moved to the point farthest from its centre. Plain k-means++ (one candidate)
    picks isolated outliers as centres much more often; since HSF averages the cluster means
    without weights, that moved the image score systematically (see README).

    The draws are fixed (:func:`kmeans_uniforms`), so an image gets the same clusters alone or in
    a batch. Written with tensor ops only, so it exports: in an exported graph the iterations are a
    fixed ``export_iters`` (the assignment is a fixed point once converged, so the result is the
    same whenever the eager loop converges within that many iterations).
    """
    single = x.dim() == 2
    x = (x[None] if single else x).detach().float()
    batch, n, _ = x.shape
    k = min(k, n)
    trials = local_trials(k)
    u = (uniforms if uniforms is not None else kmeans_uniforms(k, seed)).to(x.device, torch.float32)
    rows = torch.arange(batch, device=x.device)
    first = (u[0] * n).long().clamp(max=n - 1).expand(batch)
    centers = x[rows, first][:, None]  # [B, 1, d]
    closest = _squared_distances(x, centers)[..., 0]  # [B, n]
    for i in range(1, k):
        cdf = closest.cumsum(1)
        potential = cdf[:, -1:]
        # Points on a centre have weight 0; if all do, any point will do (uniform fallback).
        uniform = torch.arange(1, n + 1, device=x.device, dtype=cdf.dtype).expand(batch, -1)
        cdf = torch.where(potential > 0, cdf, uniform)
        draws = u[1 + (i - 1) * trials: 1 + i * trials] * cdf[:, -1:]  # [B, T]
        # searchsorted(cdf, draws) (left side), written as a count (ONNX has no searchsorted)
        index = (cdf[:, None, :] < draws[..., None]).sum(-1).clamp(max=n - 1)  # [B, T]
        candidates = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))  # [B, T, d]
        reduced = torch.minimum(closest[:, None, :], _squared_distances(x, candidates).transpose(1, 2))  # [B, T, n]
        best = reduced.sum(-1).argmin(-1)  # [B]: the candidate that leaves the least inertia
        centers = torch.cat([centers, candidates[rows, best][:, None]], dim=1)
        closest = reduced[rows, best]
    distances = _squared_distances(x, centers)
    labels = distances.argmin(-1)
    exporting = torch.compiler.is_exporting()
    for _ in range(export_iters if exporting else max_iter):
        centers = _update_centers(x, labels, centers, distances)
        distances = _squared_distances(x, centers)
        new_labels = distances.argmin(-1)
        if not exporting and torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels[0] if single else labels


def _update_centers(x: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, distances: torch.Tensor
                    ) -> torch.Tensor:
    """Lloyd's update; the j-th empty cluster gets the j-th farthest point from its centre
    (scikit-learn's relocation)."""
    k = centers.shape[1]
    one_hot = F.one_hot(labels, k).to(x.dtype)  # [B, n, k]
    counts = one_hot.sum(1)  # [B, k]
    means = (one_hot.transpose(1, 2) @ x) / counts.clamp(min=1)[..., None]
    empty = counts == 0
    own = distances.gather(2, labels[..., None])[..., 0]  # [B, n] squared distance to the own centre
    farthest = own.topk(min(k, own.shape[1]), dim=1).indices  # [B, min(k, n)]
    rank = (empty.long().cumsum(1) - 1).clamp(min=0, max=farthest.shape[1] - 1)
    relocated = x.gather(1, farthest.gather(1, rank)[..., None].expand(-1, -1, x.shape[-1]))
    return torch.where(empty[..., None], relocated, means)


def sklearn_kmeans_labels(x: torch.Tensor, k: int, seed: int | None = 0) -> torch.Tensor:
    """scikit-learn's ``KMeans(k, n_init="auto", random_state=seed).fit_predict`` (the official call)."""
    from sklearn.cluster import KMeans

    data = x.detach().float().cpu().numpy()
    labels = KMeans(n_clusters=min(k, len(data)), n_init="auto", random_state=seed).fit_predict(data)
    return torch.as_tensor(labels, dtype=torch.long, device=x.device)


class HybridSemanticFusion(nn.Module):
    """``normalize(alpha * h + (1 - alpha) * cls)``, ``h`` the mean of the cluster centres.

    Args:
        k_clusters: clusters (official 20).
        n_aggregate: patches kept before clustering; None = ``5 * k_clusters`` (official).
        alpha: weight of the cluster feature (official 0.2).
        kmeans_backend: ``"torch"`` (deterministic, default) or ``"sklearn"`` (the official call).
        seed: k-means seed (``None`` with sklearn = numpy's global RNG, as officially).
        export_iterations: Lloyd iterations unrolled in an exported graph (equal to the eager
            result whenever k-means converges within them).
    """

    def __init__(self, k_clusters: int = 20, n_aggregate: int | None = None, alpha: float = 0.2,
                 kmeans_backend: str = "torch", seed: int | None = 0, export_iterations: int = 30) -> None:
        super().__init__()
        if kmeans_backend not in KMEANS_BACKENDS:
            msg = f"kmeans_backend must be one of {KMEANS_BACKENDS}, got {kmeans_backend!r}"
            raise ValueError(msg)
        self.k_clusters = k_clusters
        self.n_aggregate = n_aggregate if n_aggregate is not None else 5 * k_clusters
        self.alpha = alpha
        self.kmeans_backend = kmeans_backend
        self.seed = seed
        self.export_iterations = export_iterations
        # The seeding draws as a constant buffer: no generator call in an exported graph.
        self.register_buffer("uniforms", kmeans_uniforms(k_clusters, 0 if seed is None else seed), persistent=False)

    def select(self, patches: list[torch.Tensor], logits: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer, the [B, n, E] features of the ``n_aggregate`` most anomalous patches.

        The ranking uses the softmax of the layer-mean of the logits (not the mean of the
        per-layer probabilities), as officially; it carries no gradient.
        """
        with torch.no_grad():
            anomalous = torch.stack(logits).mean(0).softmax(-1)[..., 1]
            top = anomalous.topk(min(anomalous.shape[1], self.n_aggregate), dim=1).indices
        index = top[..., None].expand(-1, -1, patches[0].shape[-1])
        return [patch.gather(1, index) for patch in patches]

    def cluster(self, features: torch.Tensor) -> torch.Tensor:
        """Labels [B, n] of the images' concatenated features [B, n, L*E]."""
        if self.kmeans_backend == "sklearn":
            return torch.stack([sklearn_kmeans_labels(f, self.k_clusters, self.seed) for f in features])
        return kmeans_labels(features, self.k_clusters, uniforms=self.uniforms, export_iters=self.export_iterations)

    def cluster_feature(self, selected: list[torch.Tensor],
                        labels: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (``h`` [B, E] normalised, labels [B, n]). ``labels`` [B, n] skips the clustering; a
        callable gets the clustering input [B, n, L*E] and returns the labels (parity tests use it
        to hand over the official labels token by token, whatever the order of near-tied tokens).

        A cluster's centre is the mean of its tokens over all layers; ``h`` is the unweighted
        mean of the non-empty centres.
        """
        if callable(labels):
            labels = labels(torch.cat(selected, dim=-1).detach())
        if labels is None:
            labels = self.cluster(torch.cat(selected, dim=-1))
            n_clusters = min(self.k_clusters, labels.shape[1])
        else:  # given labels (parity tests): not part of an exported graph
            n_clusters = int(labels.max()) + 1
        one_hot = F.one_hot(labels, n_clusters).to(selected[0].dtype)  # [B, n, K]
        sums = sum(one_hot.transpose(1, 2) @ layer for layer in selected)  # [B, K, E]
        counts = one_hot.sum(1) * len(selected)  # [B, K]
        present = counts > 0
        centres = sums / counts.clamp(min=1)[..., None]
        h = (centres * present[..., None]).sum(1) / present.sum(1, keepdim=True)
        return F.normalize(h, dim=-1), labels

    def forward(self, patches: list[torch.Tensor], logits: list[torch.Tensor], cls: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised patch features per layer [B, N, E], their logits [B, N, 2] and the normalised
        projected class token [B, E] -> the fused image feature [B, E]."""
        h, _ = self.cluster_feature(self.select(patches, logits), labels)
        return F.normalize(self.alpha * h + (1 - self.alpha) * cls, dim=-1)
