"""Bayes-PFL's prompt distributions: Gaussian encoders followed by planar normalising flows.

Two kinds of flow exist (paper Sec. 3.2, official ``models/PFL.py``):

* the **image-specific** (context) flow: the encoder *and* the flow parameters ``u, w, b`` are
  functions of the image's CLIP embedding (amortised), one distribution per image;
* the **class-specific** (state) flows, one for "normal" and one for "abnormal": the encoder reads
  a learnt vector ``state`` and ``u, w, b`` are free parameters, one distribution for all images.

The latent size Z is the text width (the samples are added to prompt vectors) and the
conditioning input is the image embedding (size E); the official code has Z = E (it requires
text width == embed dim), this generalisation only matters for CLIPs where they differ (tests).

Modules keep the official parameter names (``weight_mean.module.0``, ``amor_u``, ``p_mu.0``,
``state``) so released checkpoints load without renaming. The encoders are *not* owned by the
flows here (the official code registers the one shared state encoder under three names); the
flow takes its encoder as an argument, so every tensor has exactly one name in ``state_dict``.

Noise ``eps`` is always an input: the caller decides where it comes from (a private generator,
or the stored draws of a parity set), so no flow touches a random number generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class InferenceBlock(nn.Module):
    """``Linear - Softplus - Linear - Softplus - Linear`` (official ``InferenceBlock``)."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.module = nn.Sequential(nn.Linear(in_features, hidden), nn.Softplus(), nn.Linear(hidden, hidden),
                                    nn.Softplus(), nn.Linear(hidden, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class GaussianEncoder(nn.Module):
    """x -> (mean, var) of the base distribution q(z0) = N(mean, var).

    The official encoder calls its second output a log-variance but returns ``exp(0.5 * out)``
    and the sampler takes ``sqrt`` of it, so ``std = exp(0.25 * out)``. The KL term uses the same
    ``var``, so this is a consistent parametrisation (not a bug) and is kept as it is.
    """

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.weight_mean = InferenceBlock(in_features, hidden, out_features)
        self.weight_log_variance = InferenceBlock(in_features, hidden, out_features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight_mean(x), torch.exp(0.5 * self.weight_log_variance(x))


class Decoder(nn.Module):
    """Reconstruction head of the official VAE; its loss is computed but never optimised.

    Kept only so that released checkpoints load and the logged ``rec`` term matches.
    """

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.weight_mean = InferenceBlock(in_features, hidden, out_features)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.weight_mean(z)


@dataclass
class FlowSample:
    """One pass of a flow. Leading sample dims ``S`` (Monte-Carlo draws) precede the batch."""

    mu: torch.Tensor  # [B, E]
    var: torch.Tensor  # [B, E]
    z0: torch.Tensor  # [S, B, E]
    zk: torch.Tensor  # [S, B, E]
    log_det: torch.Tensor  # [S, B]


def planar_flows(z: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply K planar flows ``z' = z + u tanh(w.z + b)``.

    ``z`` [..., E]; ``u``, ``w`` [K, ..., E] and ``b`` [K, ..., 1], broadcastable against ``z``.
    Returns ``(z_K, sum_k log(|1 + u . w (1 - tanh^2)| + 1e-5))``; the ``+1e-5`` is the official one.
    No invertibility constraint on ``u`` (Rezende's u-hat) is applied, as in the official code.
    """
    shape = z.shape
    z = z.reshape(-1, 1, shape[-1])  # [N, 1, E]: row vectors, so the dot products are batched matmuls
    u, w, b = (t.reshape(t.shape[0], *[1] * (len(shape) + 1 - t.dim()), *t.shape[1:])
               .expand(t.shape[0], *shape[:-1], t.shape[-1]).reshape(t.shape[0], -1, 1, t.shape[-1])
               for t in (u, w, b))
    log_det = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for k in range(u.shape[0]):
        h = torch.tanh(torch.bmm(z, w[k].transpose(1, 2)) + b[k])  # [N, 1, 1]
        psi = w[k] * (1 - h**2)
        log_det = log_det + torch.log(torch.abs(1 + torch.bmm(psi, u[k].transpose(1, 2))) + 1e-5).view(-1)
        z = z + u[k] * h
    return z.reshape(shape), log_det.reshape(shape[:-1])


def reparameterise(mu: torch.Tensor, var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``z0 = mu + eps * sqrt(var)`` for eps [S, B, E]."""
    return eps * var.sqrt() + mu


class ContextFlow(nn.Module):
    """Image-specific flow (official ``PlanarPFL``): ``u, w, b`` are linear maps of the image."""

    def __init__(self, embed_dim: int, num_flows: int, z_dim: int | None = None) -> None:
        super().__init__()
        self.num_flows = num_flows
        self.z_dim = z_dim or embed_dim
        self.amor_u = nn.Linear(embed_dim, num_flows * self.z_dim)
        self.amor_w = nn.Linear(embed_dim, num_flows * self.z_dim)
        self.amor_b = nn.Linear(embed_dim, num_flows)
        self.p_mu = nn.Sequential(nn.Linear(embed_dim, embed_dim))

    def forward(self, x: torch.Tensor, encoder: GaussianEncoder, eps: torch.Tensor) -> FlowSample:
        """``x`` [B, E] image embeddings, ``eps`` [S, B, Z] -> samples [S, B, Z]."""
        batch, dim = x.shape[0], self.z_dim
        mu, var = encoder(x)
        u = self.amor_u(x).view(batch, self.num_flows, dim).transpose(0, 1)
        w = self.amor_w(x).view(batch, self.num_flows, dim).transpose(0, 1)
        b = self.amor_b(x).view(batch, self.num_flows, 1).transpose(0, 1)
        z0 = reparameterise(mu, var, eps)
        zk, log_det = planar_flows(z0, u, w, b)
        return FlowSample(mu, var, z0, zk, log_det)

    def reconstruct(self, zk: torch.Tensor, decoder: Decoder) -> torch.Tensor:
        return self.p_mu(decoder(zk))


class StateFlow(nn.Module):
    """Class-specific flow (official ``PlanarPFL_state``): a learnt ``state`` vector is encoded,
    the flow parameters are free parameters shared by all images."""

    def __init__(self, embed_dim: int, num_flows: int, z_dim: int | None = None) -> None:
        super().__init__()
        z_dim = z_dim or embed_dim
        self.amor_u = nn.Parameter(torch.zeros(1, num_flows, z_dim, 1))
        self.amor_w = nn.Parameter(torch.zeros(1, num_flows, 1, z_dim))
        self.amor_b = nn.Parameter(torch.zeros(1, num_flows, 1, 1))
        self.state = nn.Parameter(torch.zeros(1, embed_dim))
        self.p_mu = nn.Sequential(nn.Linear(embed_dim, embed_dim))

    def forward(self, encoder: GaussianEncoder, eps: torch.Tensor) -> FlowSample:
        """``eps`` [S, 1, E] -> samples [S, 1, E]."""
        mu, var = encoder(self.state)
        u = self.amor_u[0, :, None, :, 0]  # [K, 1, E]
        w = self.amor_w[0]  # [K, 1, E]
        b = self.amor_b[0, :, :, 0:1].reshape(-1, 1, 1)  # [K, 1, 1]
        z0 = reparameterise(mu, var, eps)
        zk, log_det = planar_flows(z0, u, w, b)
        return FlowSample(mu, var, z0, zk, log_det)

    def reconstruct(self, zk: torch.Tensor, decoder: Decoder) -> torch.Tensor:
        return self.p_mu(decoder(zk))
