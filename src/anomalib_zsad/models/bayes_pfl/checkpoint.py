"""Import of the official Bayes-PFL checkpoints (``{"MyModel": Context_Prompting.state_dict()}``).

The official ``state_dict`` names the shared encoders/decoders several times: ``context_encoder.*``
is also ``PFL_context.encoder.*``; ``state_encoder.*`` is also ``PFL_normal.encoder.*`` and
``PFL_abnormal.encoder.*`` (likewise the decoders). This model names every tensor once, so the
aliases are checked to be equal to their canonical copy and dropped. The CLIP weights are not
part of the file (the official code loads OpenAI's CLIP separately).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from anomalib_zsad.models.components.checkpoints import load_official_file

from .torch_model import BayesPFLModel

#: alias prefix in the official file -> the prefix of the tensor it duplicates
ALIASES = {
    "PFL_context.encoder.": "context_encoder.",
    "PFL_context.decoder.": "context_decoder.",
    "PFL_normal.encoder.": "state_encoder.",
    "PFL_normal.decoder.": "state_decoder.",
    "PFL_abnormal.encoder.": "state_encoder.",
    "PFL_abnormal.decoder.": "state_decoder.",
}
_NOT_IN_FILE = ("clip.", "_extra_state")


def learnable_state_dict(model: BayesPFLModel) -> dict[str, torch.Tensor]:
    """The model's own tensors (no CLIP, no bookkeeping buffers), under their official names."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(_NOT_IN_FILE)}


def to_official_state_dict(model: BayesPFLModel) -> dict[str, torch.Tensor]:
    """The model's tensors in the official layout, aliases included (what ``train.py`` saves)."""
    own = learnable_state_dict(model)
    out = dict(own)
    for alias, canonical in ALIASES.items():
        out.update({alias + k[len(canonical):]: v for k, v in own.items() if k.startswith(canonical)})
    return out


def save_official_checkpoint(model: BayesPFLModel, path: str | os.PathLike) -> None:
    torch.save({"MyModel": to_official_state_dict(model)}, path)


def read_official_checkpoint(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """The tensors of an official file (``module.`` prefixes removed), format checked."""
    path = Path(path).expanduser()
    content = load_official_file(path, "Bayes-PFL", "a file saved by the official train.py, {'MyModel': state_dict}")
    if isinstance(content, Mapping) and isinstance(content.get("MyModel"), Mapping):
        content = content["MyModel"]
    if not isinstance(content, Mapping) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        found = f" with keys {list(content)[:5]}" if isinstance(content, Mapping) else ""
        msg = (f"{path} is not an official Bayes-PFL checkpoint: expected {{'MyModel': state_dict}} with tensors "
               f"such as 'prompt_context' and 'PFL_context.amor_u.weight', got a {type(content).__name__}{found}")
        raise ValueError(msg)
    return {k.removeprefix("module."): v for k, v in content.items()}


def load_official_checkpoint(model: BayesPFLModel, path: str | os.PathLike, inference_stage: int = 2) -> BayesPFLModel:
    """Load an official checkpoint into ``model`` (in place) and return it.

    Checks every key and shape against the model (built with the same ``prompt_num``,
    ``context_length``, ``state_length``, ``num_flows`` and a CLIP of the same widths) and that the
    aliased copies of the shared modules agree. Raises ``ValueError`` naming the file and what
    was expected. ``inference_stage`` is set to 2, as the official ``test.py`` runs released
    checkpoints.
    """
    path = Path(path).expanduser()
    state = read_official_checkpoint(path)
    own = learnable_state_dict(model)
    expected = to_official_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        msg = (f"{path} does not match Bayes-PFL's official checkpoint layout: missing {len(missing)} keys "
               f"{missing[:6]}, unexpected {len(unexpected)} keys {unexpected[:6]}. Expected "
               f"{len(expected)} tensors such as 'prompt_context', 'PFL_context.amor_u.weight', "
               "'RCA.q_proj_pre.weight'.")
        raise ValueError(msg)
    wrong = [f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        msg = (f"{path}: tensor shapes do not fit this model ({len(wrong)} differ, e.g. {'; '.join(wrong[:4])}). "
               "Build the model with the checkpoint's prompt_num/context_length/state_length/num_flows and a CLIP "
               "of the same widths (ViT-L/14@336: vision 1024, text/embed 768).")
        raise ValueError(msg)
    for alias, canonical in ALIASES.items():
        for key in (k for k in state if k.startswith(alias)):
            if not torch.equal(state[key], state[canonical + key[len(alias):]]):
                msg = f"{path} is inconsistent: {key} differs from {canonical + key[len(alias):]} (a shared module)"
                raise ValueError(msg)
    bad = [k for k in own if not torch.isfinite(state[k].float()).all()]
    if bad:
        msg = f"{path} holds non-finite values in {bad[:5]}"
        raise ValueError(msg)
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state[key].to(tensor.dtype))
    model.inference_stage = inference_stage
    return model
