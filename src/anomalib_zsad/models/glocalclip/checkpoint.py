"""Import of official GlocalCLIP prompt weights
(``checkpoints/glocalclip/<n_ctx>_<ab_ctx>_<depth>_<t_n_ctx>_*/alpha_*/epoch_15.pth``).

The official ``train.py`` saves ``{"prompt_learner": GlocalCLIP_PromptLearner.state_dict()}``. Its
learnt tensors (``ctx_global_pos``, ``ctx_global_neg``, ``ctx_local_pos``, ``ctx_local_neg``,
``compound_prompts_text.N``) keep their names here; the buffers (token prefixes/suffixes and
tokenized prompts, computed from CLIP at construction) and the never-used
``compound_prompt_projections`` are not loaded. The shapes tell the configuration
(``n_ctx``, ``ab_ctx``, ``depth``, ``t_n_ctx``): a file of another configuration is refused with
the tensors that differ. Reading and checking are AnomalyCLIP's (same format).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from anomalib_zsad.models.anomalyclip.checkpoint import load_prompt_learner_tensors, read_prompt_learner_file

LEARNT_PREFIXES = ("ctx_global_pos", "ctx_global_neg", "ctx_local_pos", "ctx_local_neg", "compound_prompts_text.")
_SETTINGS = "n_ctx, ab_ctx, prompt_depth, deep_prompt_length, CLIP text width"


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The learnt tensors of an official GlocalCLIP file; a clear error for anything else (an
    AnomalyCLIP file included: it has ``ctx_pos``/``ctx_neg``, not the four glocal contexts)."""
    tensors = read_prompt_learner_file(path, "GlocalCLIP", LEARNT_PREFIXES, "the official epoch_N.pth")
    if not any(name.startswith("ctx_") for name in tensors):
        msg = (f"{path} holds no GlocalCLIP contexts ({', '.join(LEARNT_PREFIXES[:4])}); an AnomalyCLIP "
               "file loads with --model AnomalyCLIP")
        raise ValueError(msg)
    return tensors


def load_official_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy an official file's learnt prompts into ``model`` (a :class:`GlocalCLIPModel`), checking
    every shape."""
    load_prompt_learner_tensors(model.prompt_learner, read_official_checkpoint(path), path, "GlocalCLIP",
                                LEARNT_PREFIXES, _SETTINGS)
