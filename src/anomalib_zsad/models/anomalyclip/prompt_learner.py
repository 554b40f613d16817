"""AnomalyCLIP's object-agnostic prompts: two learnt contexts and deep text tokens.

Parameter names are the official ones (``ctx_pos``, ``ctx_neg``, ``compound_prompts_text.N``),
so the released ``{"prompt_learner": state_dict}`` files load without renaming.

The deep-prompt pieces (:func:`deep_prompt_parameters`, :func:`deep_prompts_by_block`,
:func:`check_prompt_depth`) are shared with the methods built on AnomalyCLIP (GlocalCLIP).
"""

from __future__ import annotations

import torch
from torch import nn

from anomalib_zsad.clip import TextTower, tokenize


def check_prompt_depth(depth: int, text: TextTower) -> None:
    """Deep prompts go before text blocks ``1 .. depth-1``: the tower must have them."""
    if depth - 1 > len(text.blocks) - 1:
        msg = f"deep prompt depth {depth} needs more than the text tower's {len(text.blocks)} blocks"
        raise ValueError(msg)


def deep_prompt_parameters(depth: int, length: int, width: int, generator: torch.Generator,
                           init_std: float = 0.02) -> nn.ParameterList:
    """The official ``compound_prompts_text``: ``depth - 1`` learnt [length, width] token blocks."""
    return nn.ParameterList(
        nn.Parameter(torch.randn(length, width, generator=generator) * init_std) for _ in range(depth - 1))


def deep_prompts_by_block(prompts: nn.ParameterList) -> dict[int, torch.Tensor]:
    """Block index -> tokens placed at positions ``1 ..`` before that block (blocks 1, 2, ...)."""
    return {index + 1: prompt for index, prompt in enumerate(prompts)}


class AnomalyCLIPPromptLearner(nn.Module):
    """``[X]*n_ctx + "object."`` (normal) and ``[X]*n_ctx + "damaged object."`` (anomalous).

    The ``X`` placeholders are replaced by the learnt ``ctx_pos``/``ctx_neg`` vectors; before
    text blocks ``1 .. depth-1`` the tokens ``1 .. deep_length`` are replaced by
    ``compound_prompts_text`` (the official "deep" prompts).
    """

    def __init__(self, text: TextTower, n_ctx: int = 12, depth: int = 9, deep_length: int = 4,
                 class_name: str = "object", normal_template: str = "{}", anomalous_template: str = "damaged {}",
                 init_std: float = 0.02, seed: int = 0) -> None:
        super().__init__()
        check_prompt_depth(depth, text)
        width = text.token_embedding.embedding_dim
        self.n_ctx = n_ctx
        generator = torch.Generator().manual_seed(seed)
        self.ctx_pos = nn.Parameter(torch.randn(1, 1, n_ctx, width, generator=generator) * init_std)
        self.ctx_neg = nn.Parameter(torch.randn(1, 1, n_ctx, width, generator=generator) * init_std)
        self.compound_prompts_text = deep_prompt_parameters(depth, deep_length, width, generator, init_std)
        placeholder = " ".join(["X"] * n_ctx)
        sentences = [f"{placeholder} {normal_template.format(class_name)}.",
                     f"{placeholder} {anomalous_template.format(class_name)}."]
        self.register_buffer("token_ids", tokenize(sentences, text.positional_embedding.shape[0]), persistent=False)

    def prompt_embeddings(self, text: TextTower) -> torch.Tensor:
        """[2, L, C]: token embeddings with the placeholders replaced by the learnt contexts."""
        embedded = text.token_embedding(self.token_ids)
        ctx = torch.cat([self.ctx_pos[0], self.ctx_neg[0]], dim=0)  # [2, n_ctx, C]
        return torch.cat([embedded[:, :1], ctx.to(embedded.dtype), embedded[:, 1 + self.n_ctx:]], dim=1)

    def deep_prompts(self) -> dict[int, torch.Tensor]:
        """Block index -> tokens placed at positions ``1 ..`` before that block (blocks 1, 2, ...)."""
        return deep_prompts_by_block(self.compound_prompts_text)
