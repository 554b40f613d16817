"""Resize a ViT's learnt position embeddings to another token grid.

The official methods disagree on the kernel, and the difference is far above parity
tolerances (AdaCLIP's README measures 6e-2 on features between bicubic with and without
antialias), so the mode is a parameter of the vision tower, never a hidden choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

#: ``bilinear`` (AnomalyCLIP), ``bicubic`` (AdaCLIP; torch's a=-0.75 kernel),
#: ``bicubic_antialias`` (open_clip's ``resize_pos_embed``: VAND, AA-CLIP, Bayes-PFL).
POS_EMBED_MODES = ("bilinear", "bicubic", "bicubic_antialias")


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], mode: str = "bicubic_antialias") -> torch.Tensor:
    """Return ``pos_embed`` ([1 + g*g, C], class row first) resized to ``grid`` (h, w) patches.

    The class row is kept as it is. A square source grid is assumed, as in every CLIP.
    """
    if mode not in POS_EMBED_MODES:
        msg = f"pos-embed resize mode must be one of {POS_EMBED_MODES}, got {mode!r}"
        raise ValueError(msg)
    cls_row, patch_rows = pos_embed[:1], pos_embed[1:]
    source = round(patch_rows.shape[0] ** 0.5)
    if (source, source) == tuple(grid):
        return pos_embed
    width = patch_rows.shape[1]
    image = patch_rows.reshape(1, source, source, width).permute(0, 3, 1, 2)
    if mode == "bilinear":
        image = F.interpolate(image, size=grid, mode="bilinear", align_corners=False)
    else:
        image = F.interpolate(image, size=grid, mode="bicubic", align_corners=False,
                              antialias=mode == "bicubic_antialias")
    patch_rows = image.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width)
    return torch.cat([cls_row, patch_rows], dim=0)
