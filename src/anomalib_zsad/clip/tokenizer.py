"""CLIP's byte-pair tokenizer, from open_clip (its vocabulary ships inside the wheel, so it
works offline). Loaded once per process."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

SOT_TOKEN = 49406
EOT_TOKEN = 49407


@lru_cache(maxsize=1)
def _tokenizer():  # noqa: ANN202
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
    """Texts -> int64 ids [n, context_length]: start token, BPE, end token, zero padding.

    Text is cleaned and lower-cased as OpenAI's tokenizer does; too long a text is cut and
    keeps its end token, as open_clip does.
    """
    return _tokenizer()([texts] if isinstance(texts, str) else list(texts), context_length=context_length)
