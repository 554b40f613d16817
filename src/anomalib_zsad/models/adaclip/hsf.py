"""Hybrid semantic fusion (HSF): an image-level feature from the most anomalous patches.

The official code ranks patches by their anomalous probability (softmax of the layer-mean of the
x100 logits), keeps the top ``5 * k``, clusters their concatenated per-layer features with
scikit-learn's ``KMeans`` (no ``random_state``: the result depends on numpy's global RNG), and
averages the cluster means without weights. Here the clustering is a small deterministic torch
k-means (k-means++ seeding from fixed draws of a private generator, then Lloyd iterations) so
that results are reproducible per process, computed on the model's device, batched and
exportable; ``kmeans_backend="sklearn"`` calls
scikit-learn as the official code does (with ``random_state=seed``; ``seed=None`` draws from
numpy's global RNG like the official run). Labels can also be given from outside (parity tests
feed the official ones): gradients flow through the cluster means, never through the labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

KMEANS_BACKENDS = ("torch", "sklearn")


def _squared_distances(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """[B, n, d] x [B, k, d] -> [B, n, k]."""
    return ((x[:, :, None, :] - centers[:, None, :, :]) ** 2).sum(-1)


def kmeans_uniforms(k: int, seed: int = 0) -> torch.Tensor:
    """The k uniform draws of k-means++ seeding, from a private generator (no global RNG)."""
    return torch.rand(k, generator=torch.Generator().manual_seed(seed))


def kmeans_labels(x: torch.Tensor, k: int, seed: int = 0, max_iter: int = 300,
                  uniforms: torch.Tensor | None = None, export_iters: int = 30) -> torch.Tensor:
    """Cluster the rows of ``x`` ([n, d], or a batch [B, n, d] clustered image by image) into
    ``k`` groups; returns int64 labels [n] (or [B, n]).

    k-means++ seeding driven by ``k`` fixed uniform draws (:func:`kmeans_uniforms`, so an image
    gets the same clusters alone or in a batch), then Lloyd iterations until no label changes
    (at most ``max_iter``). An empty cluster keeps its previous centre. Written with tensor ops
    only, so it exports: in an exported graph the iterations are a fixed ``export_iters``
    (the assignment is a fixed point once converged, so the result is the same whenever the
    eager loop converges within that many iterations).
    """
    single = x.dim() == 2
    x = (x[None] if single else x).detach().float()
    batch, n, _ = x.shape
    k = min(k, n)
    u = (uniforms if uniforms is not None else kmeans_uniforms(k, seed))[:k].to(x.device, torch.float32)
    first = (u[0] * n).long().clamp(max=n - 1).expand(batch)
    centers = x[torch.arange(batch, device=x.device), first][:, None]  # [B, 1, d]
    closest = _squared_distances(x, centers)[..., 0]  # [B, n]
    for i in range(1, k):
        cdf = closest.cumsum(1)
        total = cdf[:, -1:]
        # Points on a centre have weight 0; if all do, any point will do (uniform fallback).
        cdf = torch.where(total > 0, cdf, torch.arange(1, n + 1, device=x.device, dtype=cdf.dtype).expand(batch, -1))
        # searchsorted(cdf, u * total, right=True), written as a count (ONNX has no searchsorted)
        index = (cdf <= u[i] * cdf[:, -1:]).sum(1, keepdim=True).clamp(max=n - 1)
        chosen = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))  # [B, 1, d]
        centers = torch.cat([centers, chosen], dim=1)
        closest = torch.minimum(closest, _squared_distances(x, chosen)[..., 0])
    labels = _squared_distances(x, centers).argmin(-1)
    exporting = torch.compiler.is_exporting()
    for _ in range(export_iters if exporting else max_iter):
        one_hot = F.one_hot(labels, k).to(x.dtype)  # [B, n, k]
        counts = one_hot.sum(1)  # [B, k]
        sums = one_hot.transpose(1, 2) @ x
        centers = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centers)
        new_labels = _squared_distances(x, centers).argmin(-1)
        if not exporting and torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels[0] if single else labels


def sklearn_kmeans_labels(x: torch.Tensor, k: int, seed: int | None = 0) -> torch.Tensor:
    """scikit-learn's ``KMeans(k, n_init="auto", random_state=seed).fit_predict`` (the official call)."""
    from sklearn.cluster import KMeans  # noqa: PLC0415

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
    """

    def __init__(self, k_clusters: int = 20, n_aggregate: int | None = None, alpha: float = 0.2,
                 kmeans_backend: str = "torch", seed: int | None = 0) -> None:
        super().__init__()
        if kmeans_backend not in KMEANS_BACKENDS:
            msg = f"kmeans_backend must be one of {KMEANS_BACKENDS}, got {kmeans_backend!r}"
            raise ValueError(msg)
        self.k_clusters = k_clusters
        self.n_aggregate = n_aggregate if n_aggregate is not None else 5 * k_clusters
        self.alpha = alpha
        self.kmeans_backend = kmeans_backend
        self.seed = seed
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
        return kmeans_labels(features, self.k_clusters, uniforms=self.uniforms)

    def cluster_feature(self, selected: list[torch.Tensor], labels: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (``h`` [B, E] normalised, labels [B, n]). ``labels`` [B, n] skips the clustering.

        A cluster's centre is the mean of its tokens over all layers; ``h`` is the unweighted
        mean of the non-empty centres.
        """
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
