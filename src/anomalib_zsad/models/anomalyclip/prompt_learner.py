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

    ``shared_context`` ties the two contexts into one tensor (``ctx_neg`` *is* ``ctx_pos``: one
    parameter under both state-dict names; the paper's Table 9 "shared"). :meth:`token_ids_for`
    and :meth:`prompt_embeddings_for` put another object word than ``class_name`` in the prompts
    (the object-aware prompts of the paper's Fig. 5), tokenised once per word.
    """

    def __init__(self, text: TextTower, n_ctx: int = 12, depth: int = 9, deep_length: int = 4,
                 class_name: str = "object", normal_template: str = "{}", anomalous_template: str = "damaged {}",
                 init_std: float = 0.02, seed: int = 0, shared_context: bool = False) -> None:
        super().__init__()
        check_prompt_depth(depth, text)
        width = text.token_embedding.embedding_dim
        self.n_ctx = n_ctx
        generator = torch.Generator().manual_seed(seed)
        self.ctx_pos = nn.Parameter(torch.randn(1, 1, n_ctx, width, generator=generator) * init_std)
        self.ctx_neg = nn.Parameter(torch.randn(1, 1, n_ctx, width, generator=generator) * init_std)
        if shared_context:
            self.ctx_neg = self.ctx_pos  # one tensor (drawn first, as the unshared ctx_pos)
        self.shared_context = shared_context
        self.compound_prompts_text = deep_prompt_parameters(depth, deep_length, width, generator, init_std)
        self.templates = (normal_template, anomalous_template)
        self._context_length = text.positional_embedding.shape[0]
        self._token_ids: dict[str, torch.Tensor] = {}
        self.register_buffer("token_ids", tokenize(self.sentences(class_name), self._context_length),
                             persistent=False)

    def sentences(self, class_name: str) -> list[str]:
        """The two placeholder sentences (normal, anomalous) with ``class_name`` as the object word."""
        placeholder = " ".join(["X"] * self.n_ctx)
        return [f"{placeholder} {template.format(class_name)}." for template in self.templates]

    def token_ids_for(self, class_name: str) -> torch.Tensor:
        """[2, L] token ids of :meth:`sentences`, tokenised once per class name."""
        device = self.token_ids.device
        ids = self._token_ids.get(class_name)
        if ids is None or ids.device != device:
            ids = tokenize(self.sentences(class_name), self._context_length).to(device)
            self._token_ids[class_name] = ids
        return ids

    def _embed(self, text: TextTower, token_ids: torch.Tensor) -> torch.Tensor:
        embedded = text.token_embedding(token_ids)
        ctx = torch.cat([self.ctx_pos[0], self.ctx_neg[0]], dim=0)  # [2, n_ctx, C]
        return torch.cat([embedded[:, :1], ctx.to(embedded.dtype), embedded[:, 1 + self.n_ctx:]], dim=1)

    def prompt_embeddings(self, text: TextTower) -> torch.Tensor:
        """[2, L, C]: token embeddings with the placeholders replaced by the learnt contexts."""
        return self._embed(text, self.token_ids)

    def prompt_embeddings_for(self, text: TextTower, class_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """([2, L, C] embeddings of ``class_name``'s prompts with the learnt contexts, [2] end-token positions)."""
        ids = self.token_ids_for(class_name)
        return self._embed(text, ids), ids.argmax(dim=-1)

    def deep_prompts(self) -> dict[int, torch.Tensor]:
        """Block index -> tokens placed at positions ``1 ..`` before that block (blocks 1, 2, ...)."""
        return deep_prompts_by_block(self.compound_prompts_text)
