"""Residual cross-attention (RCA) and the global-feature fusion of Bayes-PFL.

RCA (official ``Zero_Parameter``) lets every text embedding look at the patches of one vision
layer before it is compared with them: ``t' = normalize(t + MHA(q=W_q t, k=v=F))`` with ``F`` the
layer's patch tokens projected to the text width and normalised. There is no key/value
projection, 4 heads are hard-coded and the softmax scale is ``width^-1/2`` (the full width, not
the head width): all official, all kept. The attention runs through the fused
``scaled_dot_product_attention`` (no [C, N] matrix is kept per head).

The fusion (official ``Global_Feature``) pools the concatenated multi-layer patch tokens with a
learnt attention over patches; it is used only by the stage-2 image classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


class ResidualCrossAttention(nn.Module):
    """RCA for ``num_layers`` vision layers (one patch projection per layer, one query map)."""

    def __init__(self, vision_width: int, text_width: int, num_layers: int, num_heads: int = 4) -> None:
        super().__init__()
        if text_width % num_heads:
            msg = f"RCA: text width {text_width} is not divisible by {num_heads} heads"
            raise ValueError(msg)
        self.num_heads = num_heads
        self.scale = text_width**-0.5
        # A kernel-1 Conv1d over the text rows is a Linear; kept as Conv1d for the checkpoint's shapes.
        self.q_proj_pre = nn.Conv1d(text_width, text_width, kernel_size=1)
        self.linear_proj = nn.ModuleList(nn.Linear(vision_width, text_width, bias=False) for _ in range(num_layers))

    def patch_features(self, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        """Patch tokens [B, N, Wv] -> normalised [B, N, Wt] (RCA's keys, values and the map's features)."""
        return F.normalize(self.linear_proj[layer](tokens), dim=-1)

    def forward(self, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """``text`` [B, C, Wt] (normalised), ``patches`` = :meth:`patch_features` [B, N, Wt]
        -> updated, normalised text [B, C, Wt]. Each text row is independent of the others."""
        batch, rows, width = text.shape
        heads, head_dim = self.num_heads, width // self.num_heads
        q = F.linear(text, self.q_proj_pre.weight[..., 0], self.q_proj_pre.bias)
        q = q.view(batch, rows, heads, head_dim).transpose(1, 2)
        kv = patches.view(batch, patches.shape[1], heads, head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, kv, kv, scale=self.scale)
        return F.normalize(attended.transpose(1, 2).reshape(batch, rows, width) + text, dim=-1)


class GlobalFeature(nn.Module):
    """Attention pooling of the concatenated layer tokens -> [B, Wt] (official ``Global_Feature``)."""

    def __init__(self, vision_width: int, text_width: int, num_layers: int) -> None:
        super().__init__()
        hidden = vision_width // 2
        self.fuse_modules = nn.Linear(vision_width * num_layers, hidden)
        self.compress = nn.Linear(hidden, 1)
        self.post_process = nn.Linear(hidden, text_width)

    def forward(self, layer_tokens: list[torch.Tensor]) -> torch.Tensor:
        h = self.fuse_modules(torch.cat(layer_tokens, dim=-1))
        weights = self.compress(h).softmax(dim=1)
        return self.post_process((weights * h).sum(dim=1))
