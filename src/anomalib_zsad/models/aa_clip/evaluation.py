"""The official AA-CLIP evaluation protocol (``metrics_eval`` of its test.py), for comparisons.

The official scores are not those of one image: per class, over that class's test images, the
maps are min-max normalised together and so are the text scores; the industrial image score is
then ``0.5 * max(normalised map) + 0.5 * normalised score`` and the medical one
``max(normalised map)``. A model that sees one batch cannot do that, so the anomalib model
reports per-image scores (see README.md) and this module reproduces the official numbers from
collected predictions, e.g. to compare with the paper's tables.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

DOMAINS = ("Industrial", "Medical")


def official_normalize(preds: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class min-max of maps [N, H, W] and text scores [N], skipped where the maximum is
    already 1 (as the official code). A one-image class gives NaN scores, as there."""
    if preds.max() != 1:
        preds = (preds - preds.min()) / (preds.max() - preds.min())
    if scores.max() != 1:
        scores = (scores - scores.min()) / (scores.max() - scores.min())
    return preds, scores


def official_image_scores(preds: torch.Tensor, scores: torch.Tensor, domain: str = "Industrial") -> torch.Tensor:
    """Final image scores of one class from *normalised* maps and scores (float64, as numpy)."""
    if domain not in DOMAINS:
        msg = f"domain must be one of {DOMAINS}, got {domain!r}"
        raise ValueError(msg)
    pmax = preds.double().amax(dim=(-2, -1))
    return pmax if domain == "Medical" else 0.5 * pmax + 0.5 * scores.double()


def official_metrics(preds: torch.Tensor, scores: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                     domain: str = "Industrial") -> dict[str, float]:
    """One official result row for one class: pixel AUROC/AP, image AUROC/AP (0 when the class
    has one label only), each ``round(v, 4) * 100`` like the official table."""
    preds, scores = official_normalize(preds, scores)
    truth = masks.reshape(-1).numpy().astype(int)
    flat = preds.reshape(-1).numpy()
    row = {"pixel AUC": roc_auc_score(truth, flat), "pixel AP": average_precision_score(truth, flat)}
    labels_np = labels.numpy().astype(int)
    if len(np.unique(labels_np)) > 1:
        final = official_image_scores(preds, scores, domain).numpy()
        row.update({"image AUC": roc_auc_score(labels_np, final),
                    "image AP": average_precision_score(labels_np, final)})
    else:
        row.update({"image AUC": 0, "image AP": 0})
    return {key: round(value, 4) * 100 for key, value in row.items()}
