"""CLIP's text tower, with room for learnt prompts.

Prompt-learning methods replace token embeddings (CoOp-style context vectors, put where
placeholder tokens were) and insert learnt tokens into the sequence inside the transformer
(AnomalyCLIP's and AdaCLIP's deep prompts). :meth:`TextTower.forward` takes embeddings instead
of token ids so that both fit one loop, written once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .layers import Transformer
from .vision import BlockHook


def end_token_span(token_ids: torch.Tensor, shift: int = 0, minimum: int = 0) -> int:
    """Leading positions a causal text tower must run so that every end token is read.

    Under the causal mask no token after a sentence's end token can change that token's output, so
    the tower may stop there (13 of 77 positions for Bayes-PFL's default prompts). ``shift`` moves
    the end tokens (placeholders replaced by several learnt vectors), ``minimum`` keeps room for
    prompt tokens. Computed once from token ids outside any traced code: a Python int, so that an
    exported graph has a static length.
    """
    span = int(token_ids.argmax(dim=-1).max()) + 1 + shift
    return min(max(span, minimum), token_ids.shape[-1])


class TextTower(nn.Module):
    """Causal transformer with OpenAI's parameter names (``token_embedding``, ``ln_final``, ...)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, embed_dim: int,
                 context_length: int, vocab_size: int, activation: str) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_width, activation)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, embed_dim))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def forward(
        self,
        embeddings: torch.Tensor,
        eot_index: torch.Tensor,
        *,
        deep_prompts: Mapping[int, torch.Tensor] | None = None,
        round_deep_prompts_to_fp16: bool = False,
        post_block: BlockHook | None = None,
        project: bool = True,
    ) -> torch.Tensor:
        """Token embeddings [P, L, C] -> text features [P, E] read at ``eot_index`` [P].

        ``deep_prompts[i]`` ([n, C], or [P, n, C]) replaces tokens ``1 .. n`` before block ``i``
        (0-based), as AnomalyCLIP and AdaCLIP do. ``round_deep_prompts_to_fp16`` reproduces their
        official ``.half()`` on those tokens (value and gradient are rounded to float16).
        ``project=False`` returns the ``ln_final`` features without ``text_projection``.
        """
        x = embeddings + self.positional_embedding[: embeddings.shape[1]].to(embeddings.dtype)
        for index, block in enumerate(self.blocks):
            if deep_prompts is not None and index in deep_prompts:
                prompt = deep_prompts[index]
                if prompt.dim() == 2:
                    prompt = prompt.expand(x.shape[0], -1, -1)
                if round_deep_prompts_to_fp16:
                    prompt = prompt.half()
                x = torch.cat([x[:, :1], prompt.to(x.dtype), x[:, 1 + prompt.shape[1]:]], dim=1)
            x = block(x, causal=True)
            if post_block is not None:
                x = post_block(index, x)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index]
        return x @ self.text_projection if project else x

    def encode(self, token_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Token ids [P, L] -> features [P, E]; the end-of-text token has the largest id."""
        return self.forward(self.token_embedding(token_ids), token_ids.argmax(dim=-1), **kwargs)
