"""AnomalyCLIP's glocal loss: image cross-entropy plus focal and Dice on every layer's map."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_zsad.models.components import BinaryDiceLoss, FocalLoss, segmentation_loss


class AnomalyCLIPLoss(nn.Module):
    """``CE(image logits, label) + lam * sum_l [focal_l + dice_l(anomalous) + dice_l(normal)]``.

    ``lam = 4`` is the official value (train.py, added with the multi-layer fix 2a7c886). Without
    masks (auxiliary data with image labels only) the segmentation terms are left out.
    """

    def __init__(self, lam: float = 4.0) -> None:
        super().__init__()
        self.lam = lam
        self.focal = FocalLoss()
        self.dice = BinaryDiceLoss()

    def forward(self, image_logits: torch.Tensor, labels: torch.Tensor, layer_probs: list[torch.Tensor],
                masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``masks`` [B, H, W] in {0, 1}, or None. Returns every term; ``loss`` is the total."""
        terms = {"image_loss": F.cross_entropy(image_logits, labels.long())}
        total = terms["image_loss"]
        if masks is not None:
            per_layer = [segmentation_loss(p, masks, self.focal, self.dice) for p in layer_probs]
            focal, dice_anomalous, dice_normal = (torch.stack(t) for t in zip(*per_layer, strict=True))
            terms.update(focal=focal, dice_anomalous=dice_anomalous, dice_normal=dice_normal)
            terms["segmentation_loss"] = self.lam * (focal.sum() + dice_anomalous.sum() + dice_normal.sum())
            total = total + terms["segmentation_loss"]
        terms["loss"] = total
        return terms
