"""Import of the official VAND/APRIL-GAN checkpoints (``{"trainable_linearlayer": state_dict}``).

The official train.py saves ``{"trainable_linearlayer": LinearLayer.state_dict()}`` (keys
``fc.<i>.weight`` [E, C] and ``fc.<i>.bias`` [E], one pair per feature layer); test.py loads it
back. The released files (``exps/pretrained/visa_pretrained.pth``, ``mvtec_pretrained.pth``) are
for ViT-L-14-336 at 518 px with layers 6, 12, 18, 24. The file is read with
``weights_only=True``: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from anomalib_zsad.models.components.checkpoints import load_official_file

from .torch_model import VandModel

CHECKPOINT_KEY = "trainable_linearlayer"


def _expected_shapes(model: VandModel) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in model.trainable_linearlayer.state_dict().items()}


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The linear layers' state dict in an official file, or a ``ValueError`` naming the file."""
    path = Path(path).expanduser()
    content = load_official_file(path, "VAND",
                                 "an official file, {'trainable_linearlayer': state_dict} as train.py saves it")
    if not isinstance(content, Mapping) or CHECKPOINT_KEY not in content:
        found = sorted(content)[:8] if isinstance(content, Mapping) else type(content).__name__
        msg = (f"{path} is not an official VAND checkpoint: expected a dict with key '{CHECKPOINT_KEY}' "
               f"(as train.py saves it), found {found}")
        raise ValueError(msg)
    state = content[CHECKPOINT_KEY]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        msg = f"{path}: '{CHECKPOINT_KEY}' must be a state dict of tensors, found {type(state).__name__}"
        raise ValueError(msg)
    return dict(state)


def load_official_checkpoint(model: VandModel, path: str | os.PathLike) -> VandModel:
    """Load an official checkpoint into ``model.trainable_linearlayer`` after checking every key and shape.

    The number of ``fc`` layers must equal ``len(model.feature_layers)`` and their shapes must be
    [embed_dim, vision_width] of the model's CLIP (e.g. [768, 1024] for ViT-L-14-336).
    """
    state = read_official_checkpoint(path)
    expected = _expected_shapes(model)
    found = {name: tuple(value.shape) for name, value in state.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        wrong = [f"{k}: {found[k]} (expected {expected[k]})" for k in sorted(set(found) & set(expected))
                 if found[k] != expected[k]]
        msg = (f"{path} does not fit this VAND model ({len(model.feature_layers)} feature layers "
               f"{model.feature_layers}, CLIP width {model.clip.arch.vision_width}, embed dim "
               f"{model.clip.arch.embed_dim}): missing {missing}, unexpected {unexpected}, wrong shapes {wrong}")
        raise ValueError(msg)
    reference = next(model.trainable_linearlayer.parameters())
    model.trainable_linearlayer.load_state_dict(
        {k: v.to(device=reference.device, dtype=reference.dtype) for k, v in state.items()})
    return model


def save_official_checkpoint(model: VandModel, path: str | os.PathLike) -> None:
    """Write the linear layers in the official format (test.py of the official code reads it)."""
    state = {k: v.detach().cpu() for k, v in model.trainable_linearlayer.state_dict().items()}
    torch.save({CHECKPOINT_KEY: state}, Path(path))
