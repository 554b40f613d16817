"""Transformer pieces of CLIP, with OpenAI's parameter names and fused attention.

Parameter names follow OpenAI's ``state_dict`` (``attn.in_proj_weight``, ``mlp.c_fc``, ...), so
the weights load without renaming. Every attention, the ordinary one and the V-V one of DPAM,
goes through :func:`torch.nn.functional.scaled_dot_product_attention`: on CPU and GPU that is a
fused (flash-style) kernel, so no block ever holds a full ``N x N`` attention matrix. The
official AnomalyCLIP code spends two thirds of its CPU time in a hand-written V-V attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        # Inference: the same operations in the same order, in place on one buffer. On ViT-L at
        # 518 px the two temporaries of the expression above cost ~5 % of the whole forward.
        out = torch.mul(x, 1.702)
        out.sigmoid_()
        return out.mul_(x)


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    msg = f"activation must be 'quick_gelu' or 'gelu', got {name!r}"
    raise ValueError(msg)


class Attention(nn.Module):
    """Multi-head self-attention laid out like ``nn.MultiheadAttention`` (batch first)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            msg = f"width {width} is not divisible by {heads} heads"
            raise ValueError(msg)
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` [B, N, C] -> q, k, v, each [B, heads, N, C / heads]."""
        batch, tokens, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, heads, N, d] -> [B, N, C], then the output projection."""
        batch, _, tokens, _ = x.shape
        return self.out_proj(x.transpose(1, 2).reshape(batch, tokens, -1))

    def forward(self, x: torch.Tensor, causal: bool = False, first_queries: int | None = None) -> torch.Tensor:
        """Ordinary attention. ``first_queries=n`` computes the output of the first n tokens only
        (all tokens still serve as keys and values): the exact rows, at a fraction of the cost."""
        q, k, v = self._split(x)
        if first_queries is not None:
            q = q[:, :, :first_queries]
        return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=causal))

    def forward_vv(self, x: torch.Tensor, kind: str = "vv") -> torch.Tensor:
        """DPAM self-attention through the same output projection: ``softmax(v v^T / sqrt(d)) v``
        (``kind="vv"``), ``softmax(q q^T / sqrt(d)) v`` (``"qq"``) or ``softmax(k k^T / sqrt(d)) v``
        (``"kk"``), AnomalyCLIP's three diagonally prominent attentions."""
        return self._merge(_self_attention(*self._split(x), kind))

    def forward_dual(self, x: torch.Tensor, first_queries: int | None = None,
                     kind: str = "vv") -> tuple[torch.Tensor, torch.Tensor]:
        """Ordinary and DPAM (``kind``: vv, qq or kk) attention from one q/k/v projection (DPAM's two paths)."""
        q, k, v = self._split(x)
        dpam = self._merge(_self_attention(q, k, v, kind))
        if first_queries is not None:
            q = q[:, :, :first_queries]
        ori = self._merge(F.scaled_dot_product_attention(q, k, v))
        return ori, dpam


DPAM_KINDS = ("vv", "qq", "kk")
"""The diagonally prominent self-attentions of AnomalyCLIP (ICLR 2024, Sec. 3.3, Fig. 6): V-V, Q-Q, K-K."""


def _self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str) -> torch.Tensor:
    """``softmax(a a^T / sqrt(d)) v`` with ``a`` the heads' v, q or k, fused."""
    if kind == "vv":
        return F.scaled_dot_product_attention(v, v, v)
    if kind == "qq":
        return F.scaled_dot_product_attention(q, q, v)
    if kind == "kk":
        return F.scaled_dot_product_attention(k, k, v)
    msg = f"DPAM attention must be one of {DPAM_KINDS}, got {kind!r}"
    raise ValueError(msg)


class ResidualBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1 x)``, then ``x + mlp(ln_2 x)``."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", make_activation(activation))
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor, causal: bool = False, first_queries: int | None = None) -> torch.Tensor:
        attended = self.attn(self.ln_1(x), causal=causal, first_queries=first_queries)
        x = (x if first_queries is None else x[:, :first_queries]) + attended
        return x + self.mlp(self.ln_2(x))

    def set_activation(self, activation: str) -> None:
        self.mlp.gelu = make_activation(activation)


class Transformer(nn.Module):
    """A stack of blocks under OpenAI's name, ``transformer.resblocks.N``."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, activation: str) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualBlock(width, heads, mlp_width, activation) for _ in range(layers))
