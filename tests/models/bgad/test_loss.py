"""BGAD's boundary, semi-push-pull loss, focal weights and learning rate, computed by hand on small
tensors (the authors' code: losses/losses.py, engines/bgad_fas_train_engine.py, utils)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_zsad.models.bgad import (
    BGADLoss,
    abnormal_focal_weights,
    learning_rate,
    logp_boundary,
    normal_focal_weights,
    semi_push_pull,
)
from anomalib_zsad.models.bgad.torch_model import feature_mask

# ten normal log-likelihoods (per dimension) and three anomalous ones
NORMAL = [-3.0, -1.0, -2.5, -0.5, -4.0, -1.5, -2.0, -0.2, -3.5, -1.2]
ANOMALOUS = [-1.8, -6.0, -2.9]
LOGPS = torch.tensor(NORMAL + ANOMALOUS)
MASK = torch.tensor([0.0] * len(NORMAL) + [1.0] * len(ANOMALOUS))


def test_boundary_is_the_beta_percentile_of_normal_likelihoods_over_the_normalizer() -> None:
    # sorted normals: -4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.2, -1.0, -0.5, -0.2; int(10 * 0.25) = 2 -> -3.0
    b_n, b_a = logp_boundary(LOGPS, MASK, pos_beta=0.25, margin_tau=0.1, normalizer=10.0)
    assert b_n.item() == pytest.approx(-0.30)
    assert b_a.item() == pytest.approx(-0.40)
    b_n, _ = logp_boundary(LOGPS, MASK, pos_beta=0.0, margin_tau=0.1, normalizer=1.0)  # the least likely normal
    assert b_n.item() == pytest.approx(-4.0)
    b_n, _ = logp_boundary(LOGPS, MASK, pos_beta=0.01, margin_tau=0.1, normalizer=1.0)  # official run: int(0.1) = 0
    assert b_n.item() == pytest.approx(-4.0)
    # anomalies never move the boundary
    moved = LOGPS.clone()
    moved[-3:] = 100.0
    assert logp_boundary(moved, MASK, 0.25, 0.1, 10.0)[0].item() == pytest.approx(-0.30)


def test_semi_push_pull_pulls_unlikely_normals_and_pushes_likely_anomalies() -> None:
    b_n, b_a = torch.tensor(-0.30), torch.tensor(-0.40)  # beta 0.25, tau 0.1, normalizer 10
    pull, push = semi_push_pull(LOGPS, MASK, (b_n, b_a), normalizer=10.0)
    # normals / 10 at or below -0.30: -0.30, -0.40, -0.35 -> pulled by 0, 0.10, 0.05
    assert pull.item() == pytest.approx((0.0 + 0.10 + 0.05) / 3)
    # anomalies / 10 at or above -0.40: -0.18, -0.29 -> pushed by 0.22, 0.11; -0.60 is already beyond b_a
    assert push.item() == pytest.approx((0.22 + 0.11) / 2)
    # the paper's sums instead of the code's means
    pull_sum, push_sum = semi_push_pull(LOGPS, MASK, (b_n, b_a), normalizer=10.0, reduction="sum")
    assert pull_sum.item() == pytest.approx(0.15)
    assert push_sum.item() == pytest.approx(0.33)
    # weights multiply each term before the mean
    weights = torch.arange(1.0, 14.0)
    pull_w, push_w = semi_push_pull(LOGPS, MASK, (b_n, b_a), normalizer=10.0, weights=weights)
    assert pull_w.item() == pytest.approx((1 * 0.0 + 5 * 0.10 + 9 * 0.05) / 3)
    assert push_w.item() == pytest.approx((11 * 0.22 + 13 * 0.11) / 2)


def test_no_anomaly_beyond_the_boundary_gives_zero_not_nan() -> None:
    """The code's mean of an empty set is NaN (no gradient); here 0 (the same gradient)."""
    logps = LOGPS.clone().requires_grad_(True)
    far = torch.tensor([0.0] * 10 + [1.0] * 3)
    pull, push = semi_push_pull(logps, far, (torch.tensor(-0.3), torch.tensor(5.0)), normalizer=10.0)
    assert push.item() == 0.0
    (pull + push).backward()
    assert torch.isfinite(logps.grad).all()


def test_focal_weights() -> None:
    logps = torch.tensor([-1.0, -5.0, -20.0])  # / 10: -0.1 (likely), -0.5, -2.0
    gamma, alpha = 0.5, 11.7
    expected_normal = [1.0] + [alpha * (1 - math.exp(v)) ** gamma * abs(v) for v in (-0.5, -2.0)]
    assert normal_focal_weights(logps, gamma, alpha).tolist() == pytest.approx(expected_normal)
    gamma, alpha = 2.0, 0.53
    expected_abnormal = [alpha * (1 + math.exp(v)) ** gamma / abs(v) for v in (-0.1, -0.5)] + [1.0]
    assert abnormal_focal_weights(logps, gamma, alpha).tolist() == pytest.approx(expected_abnormal)


def test_loss_stages_as_the_authors_engines() -> None:
    loss = BGADLoss(pos_beta=0.25, margin_tau=0.1, normalizer=10.0, bgspp_lambda=2.0, focal_weighting=False)
    ml_all = (-F.logsigmoid(LOGPS)).mean()
    ml_normal = (-F.logsigmoid(LOGPS[:10])).mean()
    pull, push = (0.0 + 0.10 + 0.05) / 3, (0.22 + 0.11) / 2

    first = loss(LOGPS, torch.zeros(13), boundary=False)  # first meta epoch: likelihood of normal images only
    assert first.total.item() == pytest.approx(ml_all.item())
    assert loss(LOGPS, MASK, boundary=False).total.item() == pytest.approx(ml_normal.item())  # unweighted
    with_anomalies = loss(LOGPS, MASK)
    assert with_anomalies.ml.item() == pytest.approx(ml_normal.item())  # anomalies are not maximised
    assert with_anomalies.total.item() == pytest.approx(ml_normal.item() + 2.0 * (pull + push))
    normal_chunk = loss(LOGPS, torch.zeros(13))  # a chunk without anomalous features: likelihood only
    assert normal_chunk.total.item() == pytest.approx(ml_all.item())
    assert normal_chunk.boundaries is None
    # BGAD w/o: every feature is normal, the pull term is added without lambda
    b_n = -0.30  # beta 0.25 of all 13: int(3.25) = 3 -> sorted -6.0, -4.0, -3.5, -3.0 -> -3.0
    pulled = [b_n - v / 10 for v in NORMAL + ANOMALOUS if v / 10 <= b_n]
    without = loss(LOGPS, MASK, with_anomalies=False)
    assert without.total.item() == pytest.approx(ml_all.item() + sum(pulled) / len(pulled))


def test_paper_form_and_focal_weighting() -> None:
    paper = BGADLoss(pos_beta=0.25, margin_tau=0.1, normalizer=10.0, focal_weighting=False, ml_loss="nll",
                     reduction="sum")
    out = paper(LOGPS, MASK)
    assert out.ml.item() == pytest.approx(-sum(NORMAL))
    assert out.total.item() == pytest.approx(-sum(NORMAL) + 0.15 + 0.33)

    focal = BGADLoss(pos_beta=0.25, margin_tau=0.1, normalizer=10.0, focal_weighting=True)
    weights = torch.cat([normal_focal_weights(LOGPS[:10]), abnormal_focal_weights(LOGPS[10:])])
    out = focal(LOGPS, MASK)
    assert out.ml.item() == pytest.approx((-F.logsigmoid(LOGPS[:10]) * weights[:10]).mean().item())
    pull, push = semi_push_pull(LOGPS, MASK, (torch.tensor(-0.3), torch.tensor(-0.4)), 10.0, weights)
    assert out.total.item() == pytest.approx(out.ml.item() + pull.item() + push.item())


def test_masks_at_feature_resolution_are_nearest_samples() -> None:
    mask = torch.zeros(2, 8, 8)
    mask[0, 2:6, 1:3] = 1
    mask[1, 7, 7] = 1
    reduced = feature_mask(mask, (4, 4))
    assert reduced.shape == (2 * 16,)
    assert torch.equal(reduced.reshape(2, 4, 4), mask[:, ::2, ::2])  # nearest: rows/columns 0, 2, 4, 6
    assert reduced.reshape(2, 4, 4)[1].sum() == 0  # a one-pixel defect off the sampled grid is not seen


def test_learning_rate_schedule() -> None:
    lr, meta = 2e-4, 25
    eta_min = lr * 0.1**3
    cosine = lambda epoch: eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / meta)) / 2  # noqa: E731
    assert learning_rate(lr, 0, meta, batch=0, batches=10) == pytest.approx(lr / 10)  # warm-up starts at lr / 10
    assert learning_rate(lr, 1, meta, batch=5, batches=10) == pytest.approx(lr / 10 + 0.75 * (cosine(2) - lr / 10))
    assert learning_rate(lr, 2, meta) == pytest.approx(cosine(2))  # warm-up over: cosine per meta epoch
    assert learning_rate(lr, 24, meta) == pytest.approx(cosine(24))
    steps = {"cosine": False, "warm": False}
    assert learning_rate(lr, 11, meta, **steps) == pytest.approx(lr)  # decay at 50, 75, 90 % of 25: 12, 18, 22
    assert learning_rate(lr, 12, meta, **steps) == pytest.approx(lr * 0.1)
    assert learning_rate(lr, 22, meta, **steps) == pytest.approx(lr * 0.001)
