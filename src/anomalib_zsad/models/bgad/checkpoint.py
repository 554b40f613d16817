"""Weights saved by the authors' code (``utils/model_utils.py: save_weights``).

The file is ``{"encoder_state_dict": timm model, "decoder_state_dict": [flow per level]}``; the
flows are FrEIA ``SequenceINN`` s of ``AllInOneBlock`` s, the same modules (and state-dict keys) as
anomalib's ``cflow_head`` builds here. The encoder is the frozen pretrained timm model: it is
rebuilt from ``backbone``/``pretrained``, and compared with the file's (a difference, e.g. another
timm version's weights behind the same name, is reported, since the flows were fitted to the file's).
The authors released no trained weights; this reads what their training script writes.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from anomalib_zsad.models.components.checkpoints import load_official_file

logger = logging.getLogger(__name__)

EXPECTED = ("{'encoder_state_dict': ..., 'decoder_state_dict': [one state dict per feature level]}, "
            "as BGAD's save_weights writes")


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The file's content, checked: a list of flow state dicts (and the encoder's, if saved)."""
    content = load_official_file(path, "BGAD", EXPECTED)
    decoders = content.get("decoder_state_dict") if isinstance(content, dict) else None
    if not isinstance(decoders, list) or not decoders or not all(isinstance(d, dict) for d in decoders):
        msg = f"BGAD checkpoint {path} is not in the official format: expected {EXPECTED}"
        raise ValueError(msg)
    return content


def load_official_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy the official flows into ``model`` (a :class:`~.torch_model.BGADModel`), level by level."""
    content = read_official_checkpoint(path)
    decoders = content["decoder_state_dict"]
    if len(decoders) != len(model.flows):
        msg = f"BGAD checkpoint {path} has {len(decoders)} flows; the model has {len(model.flows)} feature levels"
        raise ValueError(msg)
    for level, (flow, state) in enumerate(zip(model.flows, decoders, strict=True)):
        own = flow.state_dict()
        wrong = [k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape)]
        if wrong or set(state) - set(own):
            keys = wrong[:3] or sorted(set(state) - set(own))[:3]
            msg = (f"BGAD checkpoint {path}: the flow of level {level} does not fit this model ({keys}): "
                   "check backbone, layers, coupling_layers and pos_embed_dim")
            raise ValueError(msg)
        flow.load_state_dict(state)
    encoder = content.get("encoder_state_dict")
    if isinstance(encoder, dict):
        own = model.backbone.feature_extractor.state_dict()
        differs = [k for k, v in encoder.items()
                   if k in own and (own[k].shape != v.shape or not torch.equal(own[k], v))]
        if differs:
            logger.warning("BGAD: the encoder in %s differs from the backbone built from the settings (%d tensors, "
                           "e.g. %s); its flows were fitted to the file's encoder. timm's weights behind one name "
                           "changed over versions: give the tagged name (e.g. tf_efficientnet_b6.aa_in1k) or the "
                           "weights file.", path, len(differs), differs[0])
    model.logp_reference.fill_(0.0)
