"""Import of the official AdaCLIP weights (``AdaCLIP_Trainer.save()`` files, e.g. ``pretrained_all.pth``).

The official file is a flat ``state_dict`` of the learnt tensors only, keyed ``clip_model.<name>``
(``text_prompter.static_prompts.N``, ``visual_prompter.static_prompts.N``, ``patch_token_layer.
head.N``, ``cls_token_layer.head.0``, ``dynamic_{visual,text}_prompt_generator.head.N``). This
model uses the same names without the prefix, so importing is a prefix strip plus checks: the
official loader (``load_state_dict(strict=False)``) would silently ignore a wrong file, here every
missing, unexpected or mis-shaped tensor is reported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from anomalib_zsad.models.components.checkpoints import load_official_file

OFFICIAL_PREFIX = "clip_model."
CLIP_PREFIX = "clip."


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an official file, without the ``clip_model.`` prefix; clear errors otherwise."""
    path = Path(path).expanduser()
    expected = ("an official AdaCLIP weight file (a torch state dict with 'clip_model.*' keys, as "
                "AdaCLIP_Trainer.save() writes it)")
    content = load_official_file(path, "AdaCLIP", expected)
    if not isinstance(content, Mapping) or not content or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items()):
        found = sorted(map(str, content))[:6] if isinstance(content, Mapping) else type(content).__name__
        msg = (f"{path} is not an official AdaCLIP checkpoint: expected a flat state dict of tensors keyed "
               f"'clip_model.*', found {found}. A Lightning .ckpt of this package loads with --ckpt_path instead.")
        raise ValueError(msg)
    if not any(k.startswith(OFFICIAL_PREFIX) for k in content):
        msg = (f"{path} is not an official AdaCLIP checkpoint: none of its keys starts with "
               f"'{OFFICIAL_PREFIX}' (first keys: {sorted(content)[:4]})")
        raise ValueError(msg)
    return {k.removeprefix(OFFICIAL_PREFIX): v for k, v in content.items()}


def learnt_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own learnt tensors (everything but the frozen CLIP)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(CLIP_PREFIX)}


def load_official_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy an official AdaCLIP file into an :class:`AdaCLIPModel`, checking every key and shape.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unreadable/truncated file, not an AdaCLIP file, or one that does not fit this
            configuration (prompt depth/length, prompting type/branch, feature layers, CLIP widths).
    """
    tensors = read_official_checkpoint(path)
    own = learnt_state(model)
    # Shape mismatches first: they say best which setting differs (length, widths).
    problems = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    problems += [f"missing {k} {tuple(own[k].shape)}" for k in sorted(own.keys() - tensors.keys())]
    problems += [f"unexpected {k}" for k in sorted(tensors.keys() - own.keys())]
    if problems:
        msg = (f"{path} does not fit this AdaCLIP configuration (prompt_depth, prompt_length, prompting_type/"
               f"branch, feature_layers, CLIP widths): {len(problems)} problem(s): " + "; ".join(problems[:6]))
        raise ValueError(msg)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=False)


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The learnt tensors in the official format (``clip_model.`` prefix), e.g. to run the official code."""
    return {OFFICIAL_PREFIX + k: v.detach().clone() for k, v in learnt_state(model).items()}
