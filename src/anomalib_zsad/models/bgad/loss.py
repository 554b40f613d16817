"""BGAD's losses: maximum likelihood, the explicit boundary, the boundary-guided semi-push-pull loss.

As the authors' code (``losses/losses.py`` and ``engines/bgad_fas_train_engine.py`` of
xcyao00/BGAD) computes them, on per-dimension log-likelihoods ``logp = log p(x) / C`` of one chunk
of feature vectors (``mask`` 0 = normal, 1 = anomalous, at feature resolution):

* maximum likelihood: ``-logsigmoid(logp)`` (the code, inherited from CFlow-AD), or ``-logp``
  (the paper's ``-log p``, ``ml_loss="nll"``); mean over the chunk's normal features;
* boundary: ``b_n`` = the ``floor(N_normal * beta)``-th smallest normal ``logp`` (the beta-th
  percentile), divided by ``normalizer``; ``b_a = b_n - tau``;
* semi-push-pull on ``logp / normalizer``: pull ``b_n - logp`` for normal features below ``b_n``,
  push ``logp - b_a`` for anomalous features above ``b_a``; each term averaged over the features
  it involves (the code) or summed (the paper, ``reduction="sum"``);
* asymmetric focal weights (the code's ``--focal_weighting``), computed on the detached ``logp``.

Where the code takes the mean of an empty set (no anomalous feature above ``b_a``) it gets NaN,
whose gradient is nothing; here the term is 0 (same gradient, a finite logged loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

#: The focal weighting's own normaliser and thresholds, fixed in the code (its functions are called
#: with their default ``normalizer=10`` whatever ``--normalizer`` says).
FOCAL_NORMALIZER = 10.0
NORMAL_FOCAL_THRESHOLD = -0.2
ABNORMAL_FOCAL_THRESHOLD = -1.0


def normal_focal_weights(logps: torch.Tensor, gamma: float = 0.5, alpha: float = 11.7,
                         normalizer: float = FOCAL_NORMALIZER) -> torch.Tensor:
    """Weights of normal features: 1 where ``logp / normalizer > -0.2`` (already likely), else
    ``alpha (1 - p)^gamma |log p|`` with ``log p = logp / normalizer`` (unlikely normals weigh more)."""
    logps = logps / normalizer
    weights = alpha * (1 - torch.exp(logps)).pow(gamma) * torch.abs(logps)
    return torch.where(logps > NORMAL_FOCAL_THRESHOLD, torch.ones_like(weights), weights)


def abnormal_focal_weights(logps: torch.Tensor, gamma: float = 2.0, alpha: float = 0.53,
                           normalizer: float = FOCAL_NORMALIZER) -> torch.Tensor:
    """Weights of anomalous features: 1 where ``logp / normalizer <= -1`` (already unlikely), else
    ``alpha (1 + p)^gamma / |log p|`` (likely anomalies weigh more)."""
    logps = logps / normalizer
    weights = alpha * (1 + torch.exp(logps)).pow(gamma) * (1 / torch.abs(logps))
    return torch.where(logps <= ABNORMAL_FOCAL_THRESHOLD, torch.ones_like(weights), weights)


def logp_boundary(logps: torch.Tensor, mask: torch.Tensor, pos_beta: float = 0.05, margin_tau: float = 0.1,
                  normalizer: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b_n, b_a)`` from the normal log-likelihoods (detached): ``b_n`` is the
    ``floor(N_normal * pos_beta)``-th smallest normal ``logp`` over ``normalizer``, ``b_a = b_n - margin_tau``."""
    normal = logps[mask == 0].detach()
    if normal.numel() == 0:
        msg = "no normal feature in this chunk: the boundary is undefined"
        raise ValueError(msg)
    index = int(normal.numel() * pos_beta)
    b_n = torch.sort(normal)[0][index] / normalizer
    return b_n, b_n - margin_tau


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if values.numel() == 0:
        return values.sum()  # 0 with the graph kept (see the module docstring)
    return values.mean() if reduction == "mean" else values.sum()


def semi_push_pull(logps: torch.Tensor, mask: torch.Tensor, boundaries: tuple[torch.Tensor, torch.Tensor],
                   normalizer: float = 10.0, weights: torch.Tensor | None = None,
                   reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(pull, push): normals below ``b_n`` pulled up to it, anomalies above ``b_a`` pushed below it
    (``weights``: per-feature focal weights, or None)."""
    logps = logps / normalizer
    b_n, b_a = boundaries
    normal, anomalous = mask == 0, mask == 1
    pulled = normal & (logps <= b_n)
    pushed = anomalous & (logps >= b_a)
    pull = b_n - logps[pulled]
    push = logps[pushed] - b_a
    if weights is not None:
        pull = pull * weights[pulled]
        push = push * weights[pushed]
    return _reduce(pull, reduction), _reduce(push, reduction)


class BGADLossOutput(NamedTuple):
    """The total loss of a chunk and its parts (``boundaries``: ``(b_n, b_a)`` or None)."""

    total: torch.Tensor
    ml: torch.Tensor
    pull: torch.Tensor
    push: torch.Tensor
    boundaries: tuple[torch.Tensor, torch.Tensor] | None


class BGADLoss(nn.Module):
    """The loss of one chunk of feature vectors, in the three stages of the authors' engines.

    Args:
        pos_beta: beta, the normal percentile of the boundary ``b_n``.
        margin_tau: tau, the margin between ``b_n`` and ``b_a`` (in ``logp / normalizer`` units).
        normalizer: divides ``logp`` in the boundary and the semi-push-pull loss.
        bgspp_lambda: weight of the semi-push-pull loss.
        focal_weighting: the asymmetric focal weights on both terms.
        normal_focal: (gamma, alpha) of the normal focal weights.
        abnormal_focal: (gamma, alpha) of the anomalous focal weights.
        ml_loss: ``"logsigmoid"`` (the code) or ``"nll"`` (the paper).
        reduction: ``"mean"`` (the code) or ``"sum"`` (the paper) of every term.
    """

    def __init__(self, pos_beta: float = 0.01, margin_tau: float = 0.1, normalizer: float = 10.0,
                 bgspp_lambda: float = 1.0, focal_weighting: bool = True, normal_focal: Sequence[float] = (0.5, 11.7),
                 abnormal_focal: Sequence[float] = (2.0, 0.53), ml_loss: str = "logsigmoid",
                 reduction: str = "mean") -> None:
        super().__init__()
        self.pos_beta = pos_beta
        self.margin_tau = margin_tau
        self.normalizer = normalizer
        self.bgspp_lambda = bgspp_lambda
        self.focal_weighting = focal_weighting
        self.normal_focal = tuple(normal_focal)
        self.abnormal_focal = tuple(abnormal_focal)
        self.ml_loss = ml_loss
        self.reduction = reduction

    def likelihood_loss(self, logps: torch.Tensor) -> torch.Tensor:
        """Per-feature maximum-likelihood loss."""
        return -F.logsigmoid(logps) if self.ml_loss == "logsigmoid" else -logps

    def forward(self, logps: torch.Tensor, mask: torch.Tensor, *, boundary: bool = True,
                with_anomalies: bool = True) -> BGADLossOutput:
        """The chunk's loss.

        Args:
            logps: per-dimension log-likelihoods [N].
            mask: 0 normal / 1 anomalous [N] (feature resolution).
            boundary: False in the first meta epoch (maximum likelihood on the normal rows only,
                as the code trains the flows steadily on normal images before any boundary).
            with_anomalies: the "few abnormal samples" engine (anomalous features pushed); False is
                BGAD w/o, the normal-only engine (every feature pulled inside ``b_n``, no push).
        """
        zero = logps.sum() * 0
        if not boundary:  # likelihood of the normal rows, unweighted
            ml = _reduce(self.likelihood_loss(logps[mask == 0]), self.reduction)
            return BGADLossOutput(ml, ml, zero, zero, None)
        detached = logps.detach()
        if not with_anomalies:
            mask = torch.zeros_like(mask)
        has_anomalies = bool((mask == 1).any())
        weights = None
        if self.focal_weighting:
            weights = normal_focal_weights(detached, *self.normal_focal)
            if has_anomalies:
                weights = torch.where(mask == 1, abnormal_focal_weights(detached, *self.abnormal_focal), weights)
        normal = mask == 0
        ml_terms = self.likelihood_loss(logps[normal])
        if weights is not None:
            ml_terms = ml_terms * weights[normal]
        ml = _reduce(ml_terms, self.reduction)
        if with_anomalies and not has_anomalies:  # the code's chunks without anomalies: likelihood only
            return BGADLossOutput(ml, ml, zero, zero, None)
        boundaries = logp_boundary(logps, mask, self.pos_beta, self.margin_tau, self.normalizer)
        pull, push = semi_push_pull(logps, mask, boundaries, self.normalizer, weights, self.reduction)
        if not with_anomalies:  # the normal-only engine adds its pull term unweighted by lambda
            return BGADLossOutput(ml + pull, ml, pull, push, boundaries)
        return BGADLossOutput(ml + self.bgspp_lambda * (pull + push), ml, pull, push, boundaries)


def learning_rate(lr: float, meta_epoch: int, meta_epochs: int, batch: int = 0, batches: int = 1, *,
                  cosine: bool = True, decay_rate: float = 0.1, decay_epochs: Sequence[int] = (50, 75, 90),
                  warm: bool = True, warm_epochs: int = 2) -> float:
    """The code's learning rate for ``batch`` of ``batches`` in ``meta_epoch``.

    Per meta epoch, a cosine decay from ``lr`` towards ``lr * decay_rate^3``
    (``adjust_learning_rate``), or steps of ``decay_rate`` at ``decay_epochs`` percent of the meta
    epochs; in the first ``warm_epochs`` meta epochs a linear warm-up per batch from ``lr / 10``
    (``warmup_learning_rate``), ``batches`` being the batches of one meta epoch (all its sub-epochs).
    """
    eta_min = lr * decay_rate**3
    if cosine:
        current = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * meta_epoch / meta_epochs)) / 2
    else:
        steps = sum(meta_epoch >= e * meta_epochs // 100 for e in decay_epochs)
        current = lr * decay_rate**steps
    if warm and meta_epoch < warm_epochs:
        start = lr / 10.0
        end = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * warm_epochs / meta_epochs)) / 2 if cosine else lr
        progress = (batch + meta_epoch * batches) / (warm_epochs * batches)
        current = start + progress * (end - start)
    return float(current)
