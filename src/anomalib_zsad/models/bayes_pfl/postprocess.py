"""The official test-set-level image score of Bayes-PFL (``calcuate_metric_pixel``).

The official ``test.py`` does not score an image on its own: per class it min-max normalises the
image probabilities and the top-k means of the (unsmoothed) maps over the whole test set, then
averages them. That needs every test image first, so it cannot be the per-image ``pred_score``
of an anomalib model (which uses ``alpha * p + (1 - alpha) * topk`` without the normalisation,
see ``BayesPFLModel``). It is here for benchmarks that want the paper's protocol exactly:
collect ``predict()``'s ``image_prob`` and ``topk_mean`` per class, then call this.
The official top-k is 2000 pixels, 20 for some VisA classes (capsules, macaroni1/2, pipe_fryum,
screw, cashew, chewinggum): a per-class choice made on the test data, not applied by default.
"""

from __future__ import annotations

import torch


def _minmax(values: torch.Tensor) -> torch.Tensor:
    return (values - values.min()) / (values.max() - values.min() + 1e-8)


def official_final_scores(image_prob: torch.Tensor, topk_mean: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``alpha * minmax(image_prob) + (1 - alpha) * minmax(topk_mean)`` over one class's test set
    (float64, as the official numpy code)."""
    return alpha * _minmax(image_prob.double()) + (1 - alpha) * _minmax(topk_mean.double())
