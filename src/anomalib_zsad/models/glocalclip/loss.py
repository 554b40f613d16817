"""GlocalCLIP's loss: AnomalyCLIP's image and segmentation terms (without the x4) plus the glocal
contrastive (triplet) term between the global and the local prompts."""

from __future__ import annotations

import torch

from anomalib_zsad.models.anomalyclip.loss import AnomalyCLIPLoss


def glocal_triplet(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                   margin: float) -> torch.Tensor:
    """The official ``TripletLoss``: ``mean(d(a, p)^2 + clamp(margin - d(a, n), min=0)^2)`` with
    ``d = torch.pairwise_distance`` (its eps 1e-6 added to the difference). A squared pull and a
    squared hinge, not ``F.triplet_margin_loss``; with ``margin = 0`` the hinge is always 0."""
    positive_distance = torch.pairwise_distance(anchor, positive, keepdim=True)
    negative_distance = torch.pairwise_distance(anchor, negative, keepdim=True)
    return torch.mean(positive_distance**2 + torch.clamp(margin - negative_distance, min=0.0) ** 2)


class GlocalCLIPLoss(AnomalyCLIPLoss):
    """``CE(image logits, label) + lam * sum_l [focal_l + dice_l(anomalous) + dice_l(normal)]
    + alpha * (triplet_normal + triplet_anomalous)``.

    The official GlocalCLIP ``train.py`` has no segmentation weight (``lam = 1``; AnomalyCLIP
    multiplies by 4). The triplets pull each global prompt towards the local prompt of the same
    state (anchor global, positive local same state, negative local other state).

    Args:
        alpha: weight of the contrastive term (official 1.0; ``train.sh`` also runs 0, 0.1, 0.01).
        margin: hinge margin of the triplets (official 0.0).
        lam: weight of the segmentation terms (official 1).
    """

    def __init__(self, alpha: float = 1.0, margin: float = 0.0, lam: float = 1.0) -> None:
        super().__init__(lam)
        self.alpha = alpha
        self.margin = margin

    def forward(self, image_logits: torch.Tensor, labels: torch.Tensor, layer_probs: list[torch.Tensor],
                masks: torch.Tensor | None, text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """``text_features`` [4, E], normalised, rows (global normal, global anomalous, local normal,
        local anomalous). Returns every term; ``loss`` is the total."""
        terms = super().forward(image_logits, labels, layer_probs, masks)
        global_normal, global_anomalous, local_normal, local_anomalous = (row[None] for row in text_features)
        terms["triplet_normal"] = glocal_triplet(global_normal, local_normal, local_anomalous, self.margin)
        terms["triplet_anomalous"] = glocal_triplet(global_anomalous, local_anomalous, local_normal, self.margin)
        terms["contrastive"] = terms["triplet_normal"] + terms["triplet_anomalous"]
        terms["loss"] = terms["loss"] + self.alpha * terms["contrastive"]
        return terms
