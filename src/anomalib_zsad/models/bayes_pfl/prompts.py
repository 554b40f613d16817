"""Bayes-PFL's text side: class-name prompts with a bank of learnt context/state vectors.

Each prompt of the bank is ``[SOT] [ctx_1 .. ctx_P] [state_1 .. state_Q] <class name> [EOT]``:
the sentence ``"X <class name>"`` is tokenised and its ``X`` (position 1) is replaced by the
P + Q learnt vectors, which shifts the end-of-text token by ``P + Q - 1``. A flow sample is added
to the vectors: the image-specific sample to the P context vectors, a class-specific (normal or
abnormal) sample to the Q state vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from anomalib_zsad.clip import TextTower, tokenize

#: Official ``class_mapping`` of ``models/VPB.py``: data-set folder names -> words for the prompt.
CLASS_WORDS = {
    "macaroni1": "macaroni",
    "macaroni2": "macaroni",
    "pcb1": "printed circuit board",
    "pcb2": "printed circuit board",
    "pcb3": "printed circuit board",
    "pcb4": "printed circuit board",
    "pipe_fryum": "pipe fryum",
    "chewinggum": "chewing gum",
    "metal_nut": "metal nut",
}


def class_sentence(name: str) -> str:
    """``"X " + word`` with the official folder-name mapping (``metal_nut`` -> ``"X metal nut"``)."""
    return "X " + CLASS_WORDS.get(name, name).lower()


def class_token_ids(names: Sequence[str], context_length: int, prompt_length: int) -> torch.Tensor:
    """Token ids [n, L] of the class sentences; checks that the shifted sentence still fits."""
    ids = tokenize([class_sentence(n) for n in names], context_length)
    last = int(ids.argmax(-1).max()) + prompt_length - 1
    if last >= context_length:
        msg = f"class names {list(names)} are too long for {prompt_length} prompt tokens in {context_length}"
        raise ValueError(msg)
    return ids


def encode_prompt_bank(
    text: TextTower,
    token_ids: torch.Tensor,
    context: torch.Tensor,
    states: torch.Tensor,
    z_context: torch.Tensor,
    z_states: torch.Tensor,
    embedded: torch.Tensor | None = None,
    length: int | None = None,
) -> torch.Tensor:
    """Text features of every (image, state, sample, prompt).

    Args:
        text: CLIP text tower.
        token_ids: [B, L] class-sentence ids, one per image.
        context: [P_num, P, W] learnt context vectors of the bank.
        states: [2, P_num, Q, W] learnt normal (0) and abnormal (1) state vectors.
        z_context: [B, S, W] image-specific flow samples.
        z_states: [2, S, W] normal and abnormal flow samples (sample s pairs with context sample s).
        embedded: ``text.token_embedding(token_ids)`` if already known (a frozen buffer for export:
            then the 49408-row embedding table is not part of the exported graph).
        length: positions of the sequences run through the tower (a Python int, see
            :func:`~anomalib_zsad.clip.end_token_span`); None = the whole context.

    Returns:
        [B, 2, S, P_num, E], not normalised.
    """
    batch, samples = z_context.shape[:2]
    bank, n_ctx, width = context.shape
    n_prompt = n_ctx + states.shape[2]
    v_ctx = context[None, None, None] + z_context[:, None, :, None, None, :]  # [B, 1, S, Pn, P, W]
    v_state = states[None, :, None] + z_states[None, :, :, None, None, :]  # [1, 2, S, Pn, Q, W]
    shape = (batch, 2, samples, bank)
    v = torch.cat([v_ctx.expand(*shape, n_ctx, width), v_state.expand(*shape, n_prompt - n_ctx, width)], dim=-2)
    if embedded is None:
        embedded = text.token_embedding(token_ids)  # [B, L, W]
    embedded = embedded.expand(batch, -1, -1)
    length = embedded.shape[1] if length is None else length
    head = embedded[:, None, None, None, :1].expand(*shape, 1, width)
    tail = embedded[:, None, None, None, 2 : length - n_prompt + 1].expand(*shape, -1, width)
    sequences = torch.cat([head, v.to(embedded.dtype), tail], dim=-2).reshape(-1, length, width)
    eot = (token_ids.argmax(-1) + n_prompt - 1)[:, None, None, None].expand(shape).reshape(-1)
    features = text(sequences, eot)
    return features.view(*shape, -1)
