"""BGAD's frozen encoder: anomalib's ``TimmFeatureExtractor`` with the weights resolved in one place.

The official code builds ``timm.create_model(backbone, features_only=True,
out_indices=[1, 2, 3], pretrained=True)``. Here the same timm model comes from anomalib's
:class:`~anomalib.models.components.TimmFeatureExtractor`, and ``pretrained`` says where its
weights come from:

* ``True``: timm's ImageNet weights for the name. A copy already in the Hugging Face cache is read
  directly (no network call); otherwise timm downloads it when the hub is reachable; offline,
  :class:`BackboneWeightsUnavailableError` names the hub repository, the file and how to supply it,
  at once (timm's own download retries for a minute before failing with a generic message).
* a path: a ``.safetensors`` / ``.pth`` / ``.bin`` state dict of the timm model (e.g. the file
  that ``timm.create_model(name, pretrained=True)`` downloads), read with ``weights_only=True``.
* ``False`` / ``None``: random weights seeded by ``seed`` (tests, timing).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.models.components import TimmFeatureExtractor

from anomalib_zsad.clip.loading import _reachable

HUB_FILES = ("model.safetensors", "pytorch_model.bin")


class BackboneWeightsUnavailableError(RuntimeError):
    """The backbone's pretrained weights are not on this machine and cannot be downloaded."""


def is_random_weights(pretrained: Any) -> bool:  # noqa: ANN401
    return pretrained is None or pretrained is False or str(pretrained).lower() in {"", "none", "random", "false"}


def hub_source(backbone: str) -> tuple[str | None, str | None]:
    """(Hugging Face hub repository, legacy download URL) of timm's default weights for ``backbone``."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(backbone)
    if cfg is None:
        return None, None
    return getattr(cfg, "hf_hub_id", None) or None, getattr(cfg, "url", None) or None


def cached_hub_file(repo: str) -> Path | None:
    """The weights file of ``repo`` if the Hugging Face cache holds it (no network call)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in HUB_FILES:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def offline_message(backbone: str, repo: str | None, url: str | None, reason: str) -> str:
    lines = [(f"BGAD: the ImageNet weights of timm backbone {backbone!r} are not on this machine and could not be "
              f"downloaded ({reason}). Supply them, then run again:")]
    if repo:
        lines.append(f"  * on a machine with internet, python -c \"import timm; timm.create_model('{backbone}', "
                     f"pretrained=True)\" fills the Hugging Face cache (hub repository {repo}, file {HUB_FILES[0]}); "
                     "copy that cache (~/.cache/huggingface/hub) here,")
    if url:
        lines.append(f"  * or download {url} and pass its path: --model.pretrained /path/to/{Path(url).name},")
    lines.append("  * or --model.pretrained false for random weights (tests and timing only: the scores mean nothing).")
    return "\n".join(lines)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A timm state dict from a local file (safetensors, or a torch file read with weights_only=True)."""
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"BGAD: backbone weights file not found: {path}"
        raise FileNotFoundError(msg)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # a training checkpoint around the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        msg = f"BGAD: {path} holds no state dict of a timm model"
        raise TypeError(msg)
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights_file(extractor: TimmFeatureExtractor, path: str | os.PathLike) -> None:
    """Copy a timm model's weights into the feature extractor (its classifier head is not used)."""
    state = read_state_dict(path)
    target = extractor.feature_extractor
    missing, _ = target.load_state_dict(state, strict=False)
    if missing:
        msg = (f"BGAD: {path} does not hold the weights of the backbone {extractor.backbone!r}: {len(missing)} tensors "
               f"missing, e.g. {missing[:3]}")
        raise ValueError(msg)


def load_feature_extractor(backbone: str, layers: Sequence[int | str], pretrained: bool | str | os.PathLike | None,
                           seed: int = 0) -> TimmFeatureExtractor:
    """The frozen timm feature extractor of BGAD (see the module docstring for ``pretrained``).

    Raises:
        BackboneWeightsUnavailableError: ImageNet weights asked for, not cached and no network.
        ValueError: a layer the backbone does not have (anomalib only logs a warning and drops it).
    """
    layers = list(layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if is_random_weights(pretrained):
            extractor = TimmFeatureExtractor(backbone, layers, pre_trained=False)
        elif pretrained is True:
            repo, url = hub_source(backbone)
            cached = cached_hub_file(repo) if repo else None
            if cached is not None:
                extractor = TimmFeatureExtractor(backbone, layers, pre_trained=False)
                load_weights_file(extractor, cached)
            else:
                hosts = (["huggingface.co"] if repo else []) + ([_host(url)] if url else [])
                if not hosts:
                    msg = f"BGAD: timm has no pretrained weights for {backbone!r}; give a file or pretrained=False"
                    raise ValueError(msg)
                if not any(_reachable(host) for host in hosts):
                    reason = f"no network: cannot reach {' or '.join(hosts)}"
                    raise BackboneWeightsUnavailableError(offline_message(backbone, repo, url, reason))
                try:
                    extractor = TimmFeatureExtractor(backbone, layers, pre_trained=True)
                except Exception as error:  # noqa: BLE001  (any network failure means the same to the user)
                    reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                    raise BackboneWeightsUnavailableError(offline_message(backbone, repo, url, reason)) from None
        else:
            extractor = TimmFeatureExtractor(backbone, layers, pre_trained=False)
            load_weights_file(extractor, pretrained)
    if len(extractor.layers) != len(layers):
        lost = [layer for layer in layers if layer not in extractor.layers]
        msg = f"BGAD: backbone {backbone!r} has no feature layer(s) {lost}; give out-indices (1, 2, 3) or module names"
        raise ValueError(msg)
    for parameter in extractor.parameters():
        parameter.requires_grad_(False)
    return extractor.eval()


def _host(url: str) -> str:
    from urllib.parse import urlparse

    return urlparse(url).hostname or url
