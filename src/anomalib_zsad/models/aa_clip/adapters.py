"""AA-CLIP's residual adapters and projections, with the official parameter names.

The module and parameter names (``fc``, ``fc.0``) are those of the official ``SimpleAdapter`` /
``SimpleProj``, so a released ``state_dict`` loads without renaming. Widths come from the CLIP
config (the official code hard-codes ViT-L/14's 1024 and 768).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class SimpleAdapter(nn.Module):
    """``LeakyReLU(W x)`` (no bias): the per-block residual adapter of both towers."""

    def __init__(self, in_width: int, out_width: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_width, out_width, bias=False), nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class SimpleProj(nn.Module):
    """``W x`` (no bias), followed by a LeakyReLU when ``relu`` (then the weight is ``fc.0``)."""

    def __init__(self, in_width: int, out_width: int, relu: bool = False) -> None:
        super().__init__()
        linear = nn.Linear(in_width, out_width, bias=False)
        self.fc = nn.Sequential(linear, nn.LeakyReLU()) if relu else linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def residual_adapt(x: torch.Tensor, adapter: nn.Module, weight: float) -> torch.Tensor:
    """``w * a * |x| / |a| + (1 - w) * x`` with ``a = adapter(x)``, norms per token.

    Rescaling ``a`` to the norm of the token it adapts keeps the residual stream's scale, so a
    small ``w`` really means a small change (AA-CLIP's "controlled" adaptation).
    """
    adapted = adapter(x)
    adapted = adapted * (x.norm(dim=-1, keepdim=True) / adapted.norm(dim=-1, keepdim=True))
    return weight * adapted + (1 - weight) * x


class AdapterHook:
    """A tower ``post_block`` hook that applies ``adapters[i]`` after block ``i`` (0-based)."""

    def __init__(self, adapters: Sequence[nn.Module], weight: float) -> None:
        self.adapters = adapters
        self.weight = weight

    def __call__(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index < len(self.adapters):
            return residual_adapt(x, self.adapters[index], self.weight)
        return x


class ImageAdapter(nn.Module):
    """Residual adapters after the first vision blocks, one projection per map level, one for
    the detection feature (official ``image_adapter``: ``layer_adapters``, ``seg_proj``, ``det_proj``)."""

    def __init__(self, width: int, embed_dim: int, adapt_until: int, levels: int, relu: bool = False) -> None:
        super().__init__()
        self.layer_adapters = nn.ModuleList(SimpleAdapter(width, width) for _ in range(adapt_until))
        self.seg_proj = nn.ModuleList(SimpleProj(width, embed_dim, relu) for _ in range(levels))
        self.det_proj = SimpleProj(width, embed_dim, relu)


def text_adapter(width: int, embed_dim: int, adapt_until: int) -> nn.ModuleList:
    """Official ``text_adapter``: ``adapt_until`` residual adapters, then the projection that
    replaces CLIP's ``text_projection`` (with a LeakyReLU, hard-coded in the official code)."""
    return nn.ModuleList([*(SimpleAdapter(width, width) for _ in range(adapt_until)),
                          SimpleProj(width, embed_dim, relu=True)])


def xavier_init_(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """``xavier_uniform_`` on every weight, as the official ``AdaptedCLIP.__init__``; a private
    generator keeps the global RNG untouched."""
    for param in module.parameters():
        nn.init.xavier_uniform_(param, generator=generator)


__all__ = ["AdapterHook", "ImageAdapter", "SimpleAdapter", "SimpleProj", "residual_adapt", "text_adapter",
           "xavier_init_"]
