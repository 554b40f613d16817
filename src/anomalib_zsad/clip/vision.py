"""CLIP's vision tower, opened up: tokens of any layers, any input size, the V-V (DPAM) path.

A method asks for what it needs in one call to :meth:`VisionTower.forward` and gets back a
:class:`VisionTokens`. Methods that change the tower itself (AdaCLIP's visual prompts, AA-CLIP's
residual adapters) do so through the ``pre_block``/``post_block`` hooks, so no method copies
the transformer loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import DPAM_KINDS, Transformer
from .pos_embed import POS_EMBED_MODES, resize_pos_embed

VV_MODES = ("dual", "replace", "replace_batch")
"""How :meth:`VisionTower.forward` uses the V-V path from ``vv_from`` on (see its docstring)."""

DPAM_ATTENTIONS = (*DPAM_KINDS, "none")
"""The attention of the DPAM path (AnomalyCLIP, Fig. 6 / Table 10): V-V (the paper's), Q-Q, K-K, or
``none``: no DPAM path, CLIP's own Q-K attention everywhere (the paper's "w/o DPAM", Table 7)."""

BlockHook = Callable[[int, torch.Tensor], torch.Tensor]
"""``hook(block_index, tokens) -> tokens``, with a 0-based block index."""


def quarter_blocks(depth: int) -> list[int]:
    """The ends of the tower's four quarters, 1-based: the feature blocks 6, 12, 18, 24 of ViT-L/14
    that AnomalyCLIP, VAND, AA-CLIP and Bayes-PFL use (3, 6, 9, 12 of ViT-B; 1..4 of a 4-block CLIP)."""
    return sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3, 4)})


@dataclass
class VisionTokens:
    """What one pass of the vision tower gives.

    ``layers[l]`` are the [B, N, C] tokens (class token first) after block ``l`` (1-based) of the
    residual stream, or of the V-V stream for ``l >= vv_from``: raw, before ``ln_post``.
    ``cls`` is the final class token of the ordinary stream, before ``ln_post``.
    ``tokens`` is the whole final ordinary stream, only when asked for.
    """

    cls: torch.Tensor
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: torch.Tensor | None = None


class VisionTower(nn.Module):
    """ViT with OpenAI's parameter names (``conv1``, ``class_embedding``, ``ln_pre``, ...)."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 mlp_width: int, embed_dim: int, activation: str, pos_embed_mode: str = "bicubic_antialias") -> None:
        super().__init__()
        grid = image_size // patch_size
        self.patch_size = patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_width, activation)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, embed_dim))
        self.pos_embed_mode = pos_embed_mode
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    @property
    def pos_embed_mode(self) -> str:
        return self._pos_embed_mode

    @pos_embed_mode.setter
    def pos_embed_mode(self, mode: str) -> None:
        if mode not in POS_EMBED_MODES:
            msg = f"pos_embed_mode must be one of {POS_EMBED_MODES}, got {mode!r}"
            raise ValueError(msg)
        self._pos_embed_mode = mode
        self._pos_cache = {}

    def positional_embedding_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embeddings for a ``grid`` of patches, resized once per grid and weights.

        The cache key holds the parameter's version counter, so an optimiser step or
        ``load_state_dict`` is seen; under autograd (a trained pos-embed) and while being traced for
        export nothing is cached.
        """
        pe = self.positional_embedding
        if torch.compiler.is_compiling():
            # Traced for export: the embedding resized by an eager pass becomes a constant of the
            # graph (ONNX/OpenVINO have no antialiased bicubic resize); else resize in the graph.
            cached = next((v for k, v in self._pos_cache.items() if k[0] == grid), None)
            return cached if cached is not None else resize_pos_embed(pe, grid, self.pos_embed_mode)
        if pe.requires_grad and torch.is_grad_enabled():
            return resize_pos_embed(pe, grid, self.pos_embed_mode)
        key = (grid, pe.data_ptr(), pe._version, pe.device, pe.dtype)  # noqa: SLF001
        cached = self._pos_cache.get(key)
        if cached is None:
            with torch.no_grad():
                cached = resize_pos_embed(pe, grid, self.pos_embed_mode)
            self._pos_cache = {key: cached}
        return cached

    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        """The patch grid (rows, columns) of an image batch [B, 3, H, W]."""
        return images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> tokens [B, 1 + h*w, C] after ``ln_pre``."""
        x = self.conv1(images)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding_for(grid).to(x.dtype)
        return self.ln_pre(x)

    def forward(
        self,
        images: torch.Tensor,
        layers: Iterable[int] = (),
        *,
        vv_from: int | None = None,
        pre_block: BlockHook | None = None,
        post_block: BlockHook | None = None,
        return_tokens: bool = False,
        vv_mode: str = "dual",
        dpam_attention: str = "vv",
    ) -> VisionTokens:
        """Run the tower and collect the tokens of ``layers`` (1-based block numbers).

        ``vv_from=k`` turns on DPAM (AnomalyCLIP): from block k on, each block also feeds a V-V
        stream, ``x_vv += vv_attn(ln_1(x))`` with ``x`` the ordinary stream (the V-V stream has
        no MLP), and the layers from k on are read from that stream.

        ``vv_mode`` picks what V-V does from block ``vv_from`` on: ``"dual"`` is DPAM above;
        ``"replace"`` is CLIP Surgery's block as AA-CLIP's stage 1 uses it: V-V *replaces* the
        ordinary attention in an otherwise normal residual block (``x + vv(ln_1 x)``, then the
        MLP), one stream, layers read from it; ``"replace_batch"`` is the same with the V-V
        attention taken across the **batch** axis (for each token position the B images attend
        to each other), which is what AA-CLIP's official code computes (LND tensor read as NLD).

        ``dpam_attention`` is the attention of that path: ``"vv"`` ``softmax(v v^T / sqrt(d)) v``,
        ``"qq"`` ``softmax(q q^T / sqrt(d)) v``, ``"kk"`` ``softmax(k k^T / sqrt(d)) v`` (AnomalyCLIP's
        Fig. 6), or ``"none"``: no such path at all, as if ``vv_from`` were None (plain CLIP).

        When nothing reads the last block's ordinary tokens (not ``return_tokens``, not a hook,
        not a collected layer), that block computes only the class token's row: attention with one
        query and the MLP on one token, exactly.
        """
        if vv_mode not in VV_MODES:
            msg = f"vv_mode must be one of {VV_MODES}, got {vv_mode!r}"
            raise ValueError(msg)
        if dpam_attention not in DPAM_ATTENTIONS:
            msg = f"dpam_attention must be one of {DPAM_ATTENTIONS}, got {dpam_attention!r}"
            raise ValueError(msg)
        if dpam_attention == "none":
            vv_from = None
        wanted = set(layers)
        depth = len(self.blocks)
        if any(not 1 <= layer <= depth for layer in wanted):
            msg = f"layers must be in 1..{depth}, got {sorted(wanted)}"
            raise ValueError(msg)
        x = self.embed(images)
        x_vv: torch.Tensor | None = None
        collected: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks):
            number = index + 1
            if pre_block is not None:
                x = pre_block(index, x)
            last_tokens_unused = not return_tokens and pre_block is None and post_block is None and not (
                number in wanted and (vv_from is None or number < vv_from))
            cls_only = 1 if number == depth and last_tokens_unused else None
            if vv_from is not None and number >= vv_from and vv_mode != "dual":
                h = block.ln_1(x)
                if vv_mode == "replace_batch":
                    x = x + block.attn.forward_vv(h.transpose(0, 1).contiguous(), dpam_attention).transpose(0, 1)
                else:
                    x = x + block.attn.forward_vv(h, dpam_attention)
                x = x + block.mlp(block.ln_2(x))
            elif vv_from is not None and number >= vv_from:
                ori, vv = block.attn.forward_dual(block.ln_1(x), first_queries=cls_only, kind=dpam_attention)
                x_vv = (x if x_vv is None else x_vv) + vv
                x = (x if cls_only is None else x[:, :1]) + ori
                x = x + block.mlp(block.ln_2(x))
            else:
                x = block(x, first_queries=cls_only)
            if post_block is not None:
                x = post_block(index, x)
            if number in wanted:
                collected[number] = x_vv if x_vv is not None else x
        return VisionTokens(cls=x[:, 0], layers=collected, tokens=x if return_tokens else None)

    def project(self, tokens: torch.Tensor, layer_norm: bool = True) -> torch.Tensor:
        """Tokens [..., C] -> the joint embedding space [..., E] (``ln_post`` then ``proj``)."""
        if layer_norm:
            tokens = self.ln_post(tokens)
        return tokens @ self.proj
