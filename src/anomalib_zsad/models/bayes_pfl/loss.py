"""Bayes-PFL's training loss ("prompt flow loss", paper Eq. 7, official ``loss.py``/``train.py``).

``loss = CE(image) + sum_layers (focal + dice) + 0.01 (KL_context + KL_normal + KL_abnormal)
+ orthogonal(text)``. These are NOT the focal/Dice losses shared by AnomalyCLIP/VAND
(``models/components/losses.py``): Bayes-PFL's focal loss averages foreground and background
pixels separately and its Dice loss has only the foreground term, so they live here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

from .flows import FlowSample


def focal_loss(probs: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, eps: float = 1e-8) -> torch.Tensor:
    """``probs`` [B, 2, H, W], ``mask`` [B, H, W] (0/1): ``-(1-pt)^g log(pt)`` averaged over the
    foreground and over the background separately, then summed (balances tiny defects)."""
    fg = mask > 0
    pt = torch.where(fg, probs[:, 1], probs[:, 0])
    loss = -((1 - pt) ** gamma) * torch.log(pt + eps)
    fg_f = fg.to(loss.dtype)
    return (loss * fg_f).sum() / (fg_f.sum() + eps) + (loss * (1 - fg_f)).sum() / ((1 - fg_f).sum() + eps)


def dice_loss(probs: torch.Tensor, mask: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Foreground Dice over the whole batch, ``1 - (2 sum(p1 g) + s) / (sum p1 + sum g + s)``.

    The official class computes a background term too but does not use it; neither do we.
    """
    target = mask.to(probs.dtype)
    p1 = probs[:, 1]
    return 1 - (2 * (p1 * target).sum() + smooth) / (p1.sum() + target.sum() + smooth)


def orthogonal_loss(text: torch.Tensor, prompt_num: int) -> torch.Tensor:
    """Mean squared cosine between different prompts of the bank (normal and abnormal halves
    separately): pushes the bank's prompts apart. ``text`` [B, 2 * prompt_num, E]."""
    total = text.new_zeros(())
    for part in (text[:, :prompt_num], text[:, prompt_num:]):
        unit = F.normalize(part, dim=-1)
        cos2 = (unit @ unit.transpose(1, 2)) ** 2
        eye = torch.eye(part.shape[1], device=text.device, dtype=text.dtype)
        total = total + (cos2 * (1 - eye)).mean()
    return total


def _log_normal(x: torch.Tensor, mean: torch.Tensor | float, var: torch.Tensor | None) -> torch.Tensor:
    """``sum_E -0.5 (log var + (x - mean)^2 / var)`` (no 2 pi term, as the official code)."""
    if var is None:
        return (-0.5 * (x - mean) ** 2).sum(-1)
    return (-0.5 * (var.log() + (x - mean) ** 2 / var)).sum(-1)


def flow_kl(sample: FlowSample, batch_size: int) -> torch.Tensor:
    """Monte-Carlo KL(q(z_K) || N(0, I)) of one training draw (official ``binary_loss_function``).

    ``sample`` holds one draw (S = 1). The official code divides by the *image* batch size for
    every flow: for the state flows (one distribution, batch 1) the prior term is broadcast to
    the image batch while the base-density and log-det terms are not, so their KL is
    ``(log q(z0) - log p(z_K)) - logdet / B``. Reproduced here through ``batch_size``.
    """
    z0, zk, log_det = sample.z0[0], sample.zk[0], sample.log_det[0]
    log_p = _log_normal(zk, 0.0, None) + 1e-8  # [b]
    log_q = _log_normal(z0, sample.mu, sample.var) + 1e-8  # [b]
    if zk.shape[0] == batch_size:
        return ((log_q - log_p).sum() - log_det.sum()) / batch_size
    # state flow: log_p broadcast over the image batch (B equal rows), log_q and log_det not
    return ((log_q - log_p).sum() * batch_size - log_det.sum()) / batch_size


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``sum (recon - x)^2 / B``: logged by the official code, never added to the loss."""
    return F.mse_loss(recon, target, reduction="sum") / target.shape[0]
