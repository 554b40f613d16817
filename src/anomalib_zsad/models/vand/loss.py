"""VAND's training loss: per feature layer, focal + dice on the anomalous channel, summed.

The official train.py adds, for each layer, ``Focal(S_l, gt)`` then ``Dice(S_l[:, 1], gt)``
(no dice on the normal channel, unlike AnomalyCLIP, and no image-level loss). The formulas are
the shared :mod:`anomalib_zsad.models.components.losses` ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from anomalib_zsad.models.components import BinaryDiceLoss, FocalLoss


class VandLoss(nn.Module):
    """``sum_l Focal(S_l, mask) + Dice(S_l[:, 1], mask)`` for layer probabilities S_l [B, 2, H, W].

    Args:
        official_single_image_dice: the official code squeezes the mask, so a batch of **one**
            image gives an [H, W] mask and its dice is averaged over image *rows* instead of
            taken over the image. False (default) scores a one-image batch like any other;
            True reproduces the official numbers (it only matters for batches of one image,
            e.g. the last batch of an epoch).
    """

    def __init__(self, official_single_image_dice: bool = False) -> None:
        super().__init__()
        self.focal = FocalLoss()
        self.dice = BinaryDiceLoss()
        self.official_single_image_dice = official_single_image_dice

    def forward(self, layer_probabilities: Sequence[torch.Tensor], mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (total loss, focal per layer [L], dice per layer [L]); ``mask`` [B, H, W] is binarised at 0.5."""
        mask = (mask.reshape(mask.shape[0], *mask.shape[-2:]).float() > 0.5).float()
        focal, dice = [], []
        for probs in layer_probabilities:
            focal.append(self.focal(probs, mask))
            anomalous, target = probs[:, 1], mask
            if self.official_single_image_dice and probs.shape[0] == 1:
                anomalous, target = anomalous[0], target[0]  # [H, W]: one dice per row
            dice.append(self.dice(anomalous, target))
        total = torch.zeros((), device=mask.device)
        for focal_term, dice_term in zip(focal, dice, strict=True):
            total = total + focal_term + dice_term
        return total, torch.stack(focal), torch.stack(dice)


def build_optimizer(parameters, lr: float = 1e-3, betas: tuple[float, float] = (0.5, 0.999)) -> torch.optim.Adam:  # noqa: ANN001
    """The official optimiser of train.py: ``Adam(lr=1e-3, betas=(0.5, 0.999))`` on the linear layers."""
    return torch.optim.Adam(parameters, lr=lr, betas=betas)
