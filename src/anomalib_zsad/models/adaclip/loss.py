"""AdaCLIP's training loss: focal on the image probabilities plus, per feature layer, focal and
two Dice terms on the softmax maps (official ``AdaCLIP_Trainer.train_one_batch``).

Official quirk kept as the default (``row_dice=True``): the official code squeezes a batch of one
mask to [H, W], so its ``BinaryDiceLoss`` (which flattens ``targets.size(0)`` rows) computes the
Dice of every image **row** and averages over the H rows. With ``row_dice=False`` (or any batch
larger than one, where the official code also does so) the Dice is taken per image.
"""

from __future__ import annotations

import torch
from torch import nn

from anomalib_zsad.models.components import BinaryDiceLoss, FocalLoss


class AdaCLIPLoss(nn.Module):
    """``focal(image probs, label) + sum_l [focal_l + dice_l(anomalous) + dice_l(normal)]``."""

    def __init__(self, row_dice: bool = True) -> None:
        super().__init__()
        self.row_dice = row_dice
        self.focal = FocalLoss()
        self.dice = BinaryDiceLoss()

    def _dice(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.row_dice and probs.shape[0] == 1:
            return self.dice(probs[0], target[0])  # [H, W]: one Dice per row, as officially
        return self.dice(probs, target)

    def forward(self, image_probs: torch.Tensor, labels: torch.Tensor, layer_maps: list[torch.Tensor],
                masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``image_probs`` [B, 2], ``labels`` [B], ``layer_maps`` per layer [B, 2, H, W], ``masks``
        [B, H, W] in {0, 1} (None: image term only). Returns every term; ``loss`` is the total."""
        # In float32 also under mixed precision: log(pt) and the Dice sums over 518^2 pixels lose
        # too much in half precision.
        image_probs, layer_maps = image_probs.float(), [m.float() for m in layer_maps]
        terms = {"classification_focal": self.focal(image_probs, labels.long())}
        total = terms["classification_focal"]
        if masks is not None:
            masks = (masks > 0.5).to(layer_maps[0].dtype)
            focal = torch.stack([self.focal(m, masks) for m in layer_maps])
            dice_anomalous = torch.stack([self._dice(m[:, 1], masks) for m in layer_maps])
            dice_normal = torch.stack([self._dice(m[:, 0], 1 - masks) for m in layer_maps])
            terms.update(seg_focal=focal, seg_dice_anomalous=dice_anomalous, seg_dice_normal=dice_normal)
            seg = focal[0] * 0
            for f, da, dn in zip(focal, dice_anomalous, dice_normal, strict=True):  # the official order
                seg = seg + f + da + dn
            terms["segmentation_loss"] = seg
            total = total + seg
        terms["loss"] = total
        return terms
