"""Import of the official AnomalyCLIP prompt weights (``checkpoints/9_12_4_multiscale*/epoch_15.pth``).

The released file is ``{"prompt_learner": state_dict}`` of the official ``AnomalyCLIP_PromptLearner``.
Its learnt tensors (``ctx_pos``, ``ctx_neg``, ``compound_prompts_text.N``) keep their names here;
the buffers it also holds (token prefixes/suffixes, computed from CLIP at construction) and the
never-used ``compound_prompt_projections`` are checked for presence but not loaded.

:func:`read_prompt_learner_file` and :func:`load_prompt_learner_tensors` serve every method whose
official code saves its prompt learner in this format (GlocalCLIP).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from anomalib_zsad.models.components.checkpoints import load_official_file

from .torch_model import AnomalyCLIPModel

_LEARNT_PREFIXES = ("ctx_pos", "ctx_neg", "compound_prompts_text.")


def read_prompt_learner_file(path: str | os.PathLike, method: str, learnt_prefixes: Sequence[str],
                             file_name: str) -> dict[str, torch.Tensor]:
    """The learnt tensors (names starting with ``learnt_prefixes``) of an official
    ``{"prompt_learner": state_dict}`` file; a clear error for anything else."""
    path = Path(path).expanduser()
    content = load_official_file(path, method, f"{file_name}, a torch file holding {{'prompt_learner': state_dict}}")
    if not isinstance(content, dict) or "prompt_learner" not in content:
        found = sorted(content)[:8] if isinstance(content, dict) else type(content).__name__
        msg = (f"{path} is not an official {method} checkpoint: expected a dict with key 'prompt_learner', "
               f"found {found}. A Lightning .ckpt of this package loads with --ckpt_path instead.")
        raise ValueError(msg)
    return {k: v for k, v in content["prompt_learner"].items() if k.startswith(tuple(learnt_prefixes))}


def load_prompt_learner_tensors(learner: nn.Module, tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                                method: str, learnt_prefixes: Sequence[str], settings: str) -> None:
    """Copy ``tensors`` into ``learner``, checking that exactly its learnt tensors are there with
    their shapes; ``settings`` names the options that decide those shapes (for the message)."""
    own = learner.state_dict()
    expected = {k for k in own if k.startswith(tuple(learnt_prefixes))}
    problems = [f"missing {k}" for k in sorted(expected - tensors.keys())]
    problems += [f"unexpected {k}" for k in sorted(tensors.keys() - expected)]
    problems += [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    if problems:
        msg = f"{path} does not fit this {method} configuration ({settings}): " + "; ".join(problems[:6])
        raise ValueError(msg)
    learner.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in tensors.items()}})


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The learnt tensors of an official checkpoint; a clear error for anything else."""
    return read_prompt_learner_file(path, "AnomalyCLIP", _LEARNT_PREFIXES, "the official epoch_15.pth")


def load_official_checkpoint(model: AnomalyCLIPModel, path: str | os.PathLike) -> None:
    """Copy an official checkpoint's learnt prompts into ``model``, checking every shape."""
    load_prompt_learner_tensors(model.prompt_learner, read_official_checkpoint(path), path, "AnomalyCLIP",
                                _LEARNT_PREFIXES, "n_ctx, prompt_depth, deep_prompt_length, CLIP text width")
