"""GlocalCLIP's object-agnostic glocal prompts: four learnt contexts, one set of deep text tokens.

Two branches, global (image score) and local (anomaly maps), each with a normal and an anomalous
prompt. The anomalous prompt of a branch *reuses that branch's normal context* and appends its own
anomalous tokens (official ``glocal_prompt_generator.py``)::

    global normal     [SOT] ctx_global_pos                 "object."          [EOT]
    global anomalous  [SOT] ctx_global_pos ctx_global_neg  "damaged object."  [EOT]
    local  normal     [SOT] ctx_local_pos                  "object."          [EOT]
    local  anomalous  [SOT] ctx_local_pos  ctx_local_neg   "damaged object."  [EOT]

All four prompts share the deep prompts (``compound_prompts_text``), AnomalyCLIP's
(:mod:`anomalib_zsad.models.anomalyclip.prompt_learner`). Parameter names are the official ones,
so the released ``{"prompt_learner": state_dict}`` files load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from anomalib_zsad.clip import TextTower, tokenize
from anomalib_zsad.models.anomalyclip.prompt_learner import (
    check_prompt_depth,
    deep_prompt_parameters,
    deep_prompts_by_block,
)

#: Rows of :attr:`GlocalCLIPPromptLearner.token_ids` and of the text features.
PROMPT_ORDER = ("global_normal", "global_anomalous", "local_normal", "local_anomalous")
# Placeholder letters of the official code; the tokens are replaced, only their count matters
# (one BPE token each), but they are kept so that the token ids equal the official ones.
_LETTERS = {"global": "G", "local": "L"}


class GlocalCLIPPromptLearner(nn.Module):
    """The four glocal prompts (rows in :data:`PROMPT_ORDER`) and the shared deep prompts.

    Args:
        text: the CLIP text tower (token embedding and context length).
        n_ctx: learnt normal-context tokens per branch (official ``n_ctx``, 12).
        ab_ctx: learnt anomalous tokens per branch, after the normal context (``ab_ctx``, 12).
        depth: deep prompts go into text blocks ``1 .. depth-1`` (official ``depth``, 9).
        deep_length: tokens per deep prompt (official ``t_n_ctx``, 4).
        class_name, normal_template, anomalous_template: the prompt words ("object", "{}", "damaged {}").
        init_std: standard deviation of the initial values (official 0.02).
        seed: the initial values.
    """

    def __init__(self, text: TextTower, n_ctx: int = 12, ab_ctx: int = 12, depth: int = 9, deep_length: int = 4,
                 class_name: str = "object", normal_template: str = "{}", anomalous_template: str = "damaged {}",
                 init_std: float = 0.02, seed: int = 0) -> None:
        super().__init__()
        check_prompt_depth(depth, text)
        context_length = text.positional_embedding.shape[0]
        words = int((tokenize(f"{anomalous_template.format(class_name)}.")[0] != 0).sum()) - 2  # less SOT, EOT
        if 1 + n_ctx + ab_ctx + words + 1 > context_length:
            msg = (f"n_ctx + ab_ctx = {n_ctx + ab_ctx} learnt tokens and the anomalous words do not fit the "
                   f"text context of {context_length} tokens")
            raise ValueError(msg)
        width = text.token_embedding.embedding_dim
        self.n_ctx, self.ab_ctx = n_ctx, ab_ctx
        generator = torch.Generator().manual_seed(seed)

        def context(length: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(1, 1, length, width, generator=generator) * init_std)

        self.ctx_global_pos, self.ctx_global_neg = context(n_ctx), context(ab_ctx)
        self.ctx_local_pos, self.ctx_local_neg = context(n_ctx), context(ab_ctx)
        self.compound_prompts_text = deep_prompt_parameters(depth, deep_length, width, generator, init_std)
        sentences = []
        for letter in _LETTERS.values():
            normal, anomalous = " ".join([letter] * n_ctx), " ".join([letter] * ab_ctx)
            sentences += [f"{normal} {normal_template.format(class_name)}.",
                          f"{normal} {anomalous} {anomalous_template.format(class_name)}."]
        self.register_buffer("token_ids", tokenize(sentences, context_length), persistent=False)

    def contexts(self) -> list[list[nn.Parameter]]:
        """Per prompt (in :data:`PROMPT_ORDER`), the learnt contexts that follow its start token."""
        return [[self.ctx_global_pos], [self.ctx_global_pos, self.ctx_global_neg],
                [self.ctx_local_pos], [self.ctx_local_pos, self.ctx_local_neg]]

    def prompt_embeddings(self, text: TextTower) -> torch.Tensor:
        """[4, L, C]: token embeddings with the placeholders replaced by the learnt contexts."""
        embedded = text.token_embedding(self.token_ids)
        rows = []
        for row, contexts in zip(embedded, self.contexts(), strict=True):
            ctx = torch.cat([c[0, 0] for c in contexts]).to(row.dtype)
            rows.append(torch.cat([row[:1], ctx, row[1 + ctx.shape[0]:]]))
        return torch.stack(rows)

    def deep_prompts(self) -> dict[int, torch.Tensor]:
        """Block index -> tokens placed at positions ``1 ..`` before that block (blocks 1, 2, ...)."""
        return deep_prompts_by_block(self.compound_prompts_text)
