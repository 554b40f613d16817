"""The segmentation losses that AnomalyCLIP, VAND/APRIL-GAN and AA-CLIP share, as their official
code writes them (the same ``FocalLoss``/``BinaryDiceLoss`` file is copied across those repositories).

The constants (clamp 1e-5, smooth 1e-5, Dice's +1) are part of the official numbers, kept as they are.
"""

from __future__ import annotations

import torch
from torch import nn


class FocalLoss(nn.Module):
    """Focal loss on class probabilities [B, C, H, W] against an integer mask [B, H, W].

    Official form (``alpha=None`` -> 1, ``gamma=2``): one-hot target clamped to
    ``[smooth, 1 - smooth]``, ``pt = sum(target * p) + smooth``, mean of ``-(1 - pt)^gamma log pt``.
    """

    def __init__(self, gamma: float = 2.0, smooth: float = 1e-5) -> None:
        super().__init__()
        self.gamma = gamma
        self.smooth = smooth

    def forward(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        classes = probs.shape[1]
        probs = probs.permute(0, *range(2, probs.dim()), 1).reshape(-1, classes)
        target = target.reshape(-1).long()
        one_hot = torch.zeros_like(probs).scatter_(1, target[:, None], 1.0)
        one_hot = one_hot.clamp(self.smooth, 1.0 - self.smooth)
        pt = (one_hot * probs).sum(1) + self.smooth
        return (-torch.pow(1 - pt, self.gamma) * pt.log()).mean()


class BinaryDiceLoss(nn.Module):
    """``1 - mean_b (2 sum(p g) + 1) / (sum p + sum g + 1)`` per image, as the official code."""

    def forward(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = probs.reshape(probs.shape[0], -1)
        target = target.reshape(target.shape[0], -1).to(probs.dtype)
        dice = (2 * (probs * target).sum(1) + 1) / (probs.sum(1) + target.sum(1) + 1)
        return 1 - dice.mean()


def segmentation_loss(probs: torch.Tensor, mask: torch.Tensor, focal: FocalLoss, dice: BinaryDiceLoss
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(focal, dice on the anomalous channel, dice on the normal channel) for probs [B, 2, H, W]
    and a binary mask [B, H, W]: the three terms every official code of this family sums."""
    return focal(probs, mask), dice(probs[:, 1], mask), dice(probs[:, 0], 1 - mask)
