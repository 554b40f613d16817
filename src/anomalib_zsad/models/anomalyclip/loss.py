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

    The switches are the paper's loss ablations (defaults: every term): ``global_loss`` the image
    cross-entropy (Table 5 "global"), ``focal_loss`` and ``dice_loss`` the two local terms (Table 11;
    both off = Table 5 without "local"). A term switched off is reported as 0 and adds nothing to
    the total, nor to its gradient.
    """

    def __init__(self, lam: float = 4.0, global_loss: bool = True, focal_loss: bool = True,
                 dice_loss: bool = True) -> None:
        super().__init__()
        if not (global_loss or focal_loss or dice_loss):
            msg = "at least one loss term (global_loss, focal_loss, dice_loss) must be on"
            raise ValueError(msg)
        self.lam = lam
        self.global_loss = global_loss
        self.focal_loss = focal_loss
        self.dice_loss = dice_loss
        self.focal = FocalLoss()
        self.dice = BinaryDiceLoss()

    @property
    def local_loss(self) -> bool:
        """Whether any segmentation term is on (then the maps are needed)."""
        return self.focal_loss or self.dice_loss

    def forward(self, image_logits: torch.Tensor, labels: torch.Tensor, layer_probs: list[torch.Tensor],
                masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``masks`` [B, H, W] in {0, 1}, or None. Returns every term; ``loss`` is the total."""
        image_loss = F.cross_entropy(image_logits, labels.long())
        zero = image_logits.new_zeros(())
        terms = {"image_loss": image_loss if self.global_loss else zero}
        total = terms["image_loss"]
        if masks is not None and self.local_loss and layer_probs:
            per_layer = [segmentation_loss(p, masks, self.focal, self.dice) for p in layer_probs]
            focal, dice_anomalous, dice_normal = (torch.stack(t) for t in zip(*per_layer, strict=True))
            if not self.focal_loss:
                focal = torch.zeros_like(focal)
            if not self.dice_loss:
                dice_anomalous, dice_normal = torch.zeros_like(dice_anomalous), torch.zeros_like(dice_normal)
            terms.update(focal=focal, dice_anomalous=dice_anomalous, dice_normal=dice_normal)
            terms["segmentation_loss"] = self.lam * (focal.sum() + dice_anomalous.sum() + dice_normal.sum())
            total = total + terms["segmentation_loss"]
        elif not self.global_loss:
            msg = ("global_loss=False trains the segmentation terms only, and this batch has no masks (or the "
                   "focal and Dice terms are off): give auxiliary data with masks")
            raise ValueError(msg)
        terms["loss"] = total
        return terms
