"""AA-CLIP's two training losses, with every term returned (the parity set checks each).

Both stages put the 100-scaled patch similarities through a bilinear upsampling to the mask
size (``align_corners=True``) and a softmax, then the shared focal + two Dice terms
(:mod:`anomalib_zsad.models.components.losses`, the official formulas).

* stage 1 (text adapter): segmentation terms + ``w * (mean_b <T_normal, T_anomalous>)^2``, an
  orthogonality penalty that pushes the two anchors apart. The official code re-assigns the
  loss inside its level loop, so only the **last** level is back-propagated;
  ``stage1_levels="last"`` keeps that, ``"all"`` (default) sums the levels as the paper states.
* stage 2 (image adapter): ``CE((det @ T)[b], label)`` on raw cosines (no temperature) + the
  segmentation terms of every level.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_zsad.models.components import BinaryDiceLoss, FocalLoss

STAGE1_LEVELS = ("all", "last")


class AACLIPLoss(nn.Module):
    """Args: ``orthogonal_weight`` (official ``text_norm_weight`` 0.1), ``stage1_levels``."""

    def __init__(self, orthogonal_weight: float = 0.1, stage1_levels: str = "all") -> None:
        super().__init__()
        if stage1_levels not in STAGE1_LEVELS:
            msg = f"stage1_levels must be one of {STAGE1_LEVELS}, got {stage1_levels!r}"
            raise ValueError(msg)
        self.orthogonal_weight = orthogonal_weight
        self.stage1_levels = stage1_levels
        self.focal = FocalLoss()
        self.dice = BinaryDiceLoss()

    @staticmethod
    def probabilities(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[B, 2, h, w] scaled similarities -> [B, 2, H, W] softmax after bilinear upsampling."""
        up = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        return up.softmax(dim=1)

    def segmentation_terms(self, level_logits: list[torch.Tensor], masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per level: probabilities and the focal / Dice(normal) / Dice(anomalous) terms [L]."""
        probs = [self.probabilities(logits, masks.shape[-2:]) for logits in level_logits]
        return {
            "probs": probs,
            "focal": torch.stack([self.focal(p, masks) for p in probs]),
            "dice_normal": torch.stack([self.dice(p[:, 0], 1 - masks) for p in probs]),
            "dice_anomalous": torch.stack([self.dice(p[:, 1], masks) for p in probs]),
        }

    def stage1(self, level_logits: list[torch.Tensor], text: torch.Tensor, masks: torch.Tensor | None,
               batch_mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean) -> dict[str, torch.Tensor]:
        """Text-adapter loss. ``text`` [B, E, 2] anchors of each sample, ``masks`` [B, H, W] in {0, 1}.
        ``batch_mean``: the mean over the batch of the orthogonality term (under DDP, over every
        process's images: :func:`~anomalib_zsad.models.components.distributed.global_batch_mean`)."""
        orthogonal = batch_mean((text[:, :, 0] * text[:, :, 1]).sum(-1)) ** 2
        terms: dict = {"orthogonal_loss": orthogonal}
        loss = self.orthogonal_weight * orthogonal
        if masks is not None:
            terms.update(self.segmentation_terms(level_logits, masks))
            per_level = terms["focal"] + terms["dice_normal"] + terms["dice_anomalous"]
            loss = (per_level[-1] if self.stage1_levels == "last" else per_level.sum()) + loss
        terms["loss"] = loss
        return terms

    def stage2(self, level_logits: list[torch.Tensor], cls_logits: torch.Tensor, labels: torch.Tensor,
               masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Image-adapter loss. ``cls_logits`` [B, 2] = ``det @ T_b`` (raw cosines)."""
        terms: dict = {"cls_loss": F.cross_entropy(cls_logits, labels.long())}
        loss = terms["cls_loss"]
        if masks is not None:
            terms.update(self.segmentation_terms(level_logits, masks))
            loss = loss + (terms["focal"] + terms["dice_normal"] + terms["dice_anomalous"]).sum()
        terms["loss"] = loss
        return terms
