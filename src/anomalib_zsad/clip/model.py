"""A CLIP ViT built from a :class:`ClipArchitecture`, loading OpenAI-format weights."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from .architecture import ClipArchitecture
from .text import TextTower
from .vision import VisionTower

_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size")


def openai_to_model_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI/open_clip key names -> this module's (the text tower lives under ``text.``)."""
    converted = {}
    for key, value in state_dict.items():
        if key in _IGNORED_KEYS or key == "attn_mask":
            continue
        converted[f"text.{key}" if key.startswith(_TEXT_KEYS) else key] = value
    return converted


class ClipModel(nn.Module):
    """The two towers and the learnt temperature, nothing else; every method wraps this."""

    def __init__(self, arch: ClipArchitecture, pos_embed_mode: str = "bicubic_antialias") -> None:
        super().__init__()
        self.arch = arch
        self.visual = VisionTower(arch.image_size, arch.patch_size, arch.vision_width, arch.vision_layers,
                                  arch.vision_heads, arch.vision_mlp_width, arch.embed_dim, arch.activation,
                                  pos_embed_mode)
        self.text = TextTower(arch.text_width, arch.text_layers, arch.text_heads, arch.text_mlp_width,
                              arch.embed_dim, arch.context_length, arch.vocab_size, arch.activation)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def load_openai_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load OpenAI/open_clip weights (any float dtype; cast to this model's dtype)."""
        converted = openai_to_model_keys(state_dict)
        own = self.state_dict()
        mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in converted.items()
                      if k in own and own[k].shape != v.shape]
        if mismatched:
            msg = "CLIP weights do not fit the architecture: " + "; ".join(mismatched[:5])
            raise ValueError(msg)
        converted = {k: v.to(own[k].dtype) if k in own else v for k, v in converted.items()}
        missing, unexpected = self.load_state_dict(converted, strict=False)
        if missing or unexpected:
            msg = f"CLIP weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
            raise ValueError(msg)

    def set_activation(self, activation: str) -> None:
        """Switch every MLP between QuickGELU and exact GELU (no weights change)."""
        self.arch = self.arch.with_activation(activation)
        for block in [*self.visual.blocks, *self.text.blocks]:
            block.set_activation(activation)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Plain CLIP image embedding, ``ln_post(cls) @ proj``."""
        return self.visual.project(self.visual(images).cls)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.text.encode(token_ids)

    def reset_parameters(self, seed: int = 0) -> None:
        """CLIP's own initialisation, drawn from a private generator (no global RNG touched)."""
        gen = torch.Generator().manual_seed(seed)

        def normal_(t: torch.Tensor, std: float) -> None:
            with torch.no_grad():
                t.copy_(torch.randn(t.shape, generator=gen) * std)

        arch = self.arch
        for tower, width, depth in ((self.visual, arch.vision_width, arch.vision_layers),
                                    (self.text, arch.text_width, arch.text_layers)):
            proj_std = width**-0.5 * (2 * depth) ** -0.5
            for block in tower.blocks:
                normal_(block.attn.in_proj_weight, width**-0.5)
                normal_(block.attn.out_proj.weight, proj_std)
                normal_(block.mlp.c_fc.weight, (2 * width) ** -0.5)
                normal_(block.mlp.c_proj.weight, proj_std)
                for bias in (block.attn.in_proj_bias, block.attn.out_proj.bias, block.mlp.c_fc.bias,
                             block.mlp.c_proj.bias):
                    nn.init.zeros_(bias)
        scale = arch.vision_width**-0.5
        normal_(self.visual.conv1.weight, (3 * arch.patch_size**2) ** -0.5)
        normal_(self.visual.class_embedding, scale)
        normal_(self.visual.positional_embedding, scale)
        normal_(self.visual.proj, scale)
        normal_(self.text.token_embedding.weight, 0.02)
        normal_(self.text.positional_embedding, 0.01)
        normal_(self.text.text_projection, arch.text_width**-0.5)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.visual.pos_embed_mode = self.visual.pos_embed_mode  # drops the resize cache
