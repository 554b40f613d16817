"""M3DM's frozen RGB backbone: a timm ViT (official ``vit_base_patch8_224_dino``, DINO ViT-B/8),
with its weights resolved in one place.

``pretrained``:

* ``True``: timm's weights for the name (``vit_base_patch8_224_dino`` is timm's deprecated name of
  ``vit_base_patch8_224.dino``, hub repository ``timm/vit_base_patch8_224.dino``). A copy already
  in the Hugging Face cache is read without any network call; otherwise timm downloads it when
  the hub is reachable; offline, :class:`RGBWeightsUnavailableError` says what to supply, at once.
* a path: the DINO release file (``dino_vitbase8_pretrain.pth``, a flat state dict with timm's
  key names, what the official code loads), or timm's own ``model.safetensors``/``pytorch_model.bin``.
* ``False`` / ``None``: random weights seeded by ``seed`` (tests, timing).

The features are the official ones: ``forward_features`` (patch embedding, class token and
position embedding, blocks, final LayerNorm), the class token dropped, ``[B, C, H/p, W/p]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"


class RGBWeightsUnavailableError(RuntimeError):
    """The RGB backbone's pretrained weights are not on this machine and cannot be downloaded."""


def is_random_weights(pretrained: Any) -> bool:  # noqa: ANN401
    return pretrained is None or pretrained is False or str(pretrained).lower() in {"", "none", "random", "false"}


def timm_name(backbone: str) -> str:
    """timm's current name of a (possibly deprecated) model name."""
    from timm.models import get_deprecated_models

    return get_deprecated_models().get(backbone) or backbone


def is_vit_name(backbone: Any) -> bool:  # noqa: ANN401
    import timm

    if not isinstance(backbone, str) or not backbone:
        return False
    name = timm_name(backbone)
    return timm.is_model(name.split(".")[0]) and name.split(".")[0].startswith(("vit_", "deit", "test_vit"))


def patch_size_of(backbone: str) -> int | None:
    """The patch size in a ViT's name (``..._patch8_...``), or None."""
    import re

    found = re.search(r"patch(\d+)", backbone)
    return int(found.group(1)) if found else None


def offline_message(backbone: str, repo: str | None, reason: str) -> str:
    lines = [(f"M3DM: the weights of the RGB backbone {backbone!r} are not on this machine and could not be "
              f"downloaded ({reason}). Supply them, then run again:")]
    if repo:
        lines.append(f"  * on a machine with internet, python -c \"import timm; timm.create_model('{backbone}', "
                     f"pretrained=True)\" fills the Hugging Face cache (hub repository {repo}); copy that cache "
                     "(~/.cache/huggingface/hub) here,")
    if "dino" in backbone and "patch8" in backbone and "base" in backbone:
        lines.append(f"  * or download DINO's release {DINO_URL} and pass its path: "
                     "--model.pretrained /path/to/dino_vitbase8_pretrain.pth,")
    lines.append("  * or --model.pretrained false for random weights (tests and timing only: the scores mean nothing).")
    return "\n".join(lines)


def _create(backbone: str, image_size: tuple[int, int], meta: bool = False) -> nn.Module:
    import timm

    kwargs = {"pretrained": False, "num_classes": 0, "img_size": tuple(image_size)}
    if meta:
        with torch.device("meta"):
            return timm.create_model(timm_name(backbone), **kwargs)
    return timm.create_model(timm_name(backbone), **kwargs)


def read_vit_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"M3DM: RGB backbone weights file not found: {path} (DINO's release: {DINO_URL})"
        raise FileNotFoundError(msg)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):  # a training checkpoint around the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        msg = f"M3DM: {path} holds no state dict of a ViT"
        raise TypeError(msg)
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def load_weights_file(backbone: str, image_size: tuple[int, int], path: str | os.PathLike) -> nn.Module:
    """The timm ViT with a local weights file, through timm's own checkpoint filter (position
    embeddings resized to ``image_size`` as timm does). Every tensor of the model must come from the file."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = _create(backbone, image_size, meta=True)
    state = checkpoint_filter_fn(read_vit_state_dict(path), model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or wrong:
        msg = (f"M3DM: {path} does not hold the weights of {backbone!r}: {len(missing)} tensors missing "
               f"(e.g. {missing[:3]}), {len(wrong)} of another shape (e.g. {wrong[:3]})")
        raise ValueError(msg)
    for key in expected:
        if torch.is_floating_point(state[key]) and not torch.isfinite(state[key]).all():
            msg = f"M3DM: {path}: tensor {key} holds NaN or Inf values"
            raise ValueError(msg)
    model.load_state_dict({k: state[k].float() for k in expected}, assign=True)
    return model


def load_rgb_backbone(backbone: str, pretrained: bool | str | os.PathLike | None, image_size: tuple[int, int],
                      seed: int = 0) -> nn.Module:
    """The frozen timm ViT of M3DM (see the module docstring for ``pretrained``), in eval mode
    (it has no dropout nor stochastic depth: the official training mode changes nothing)."""
    from anomalib_zsad.clip.loading import _reachable
    from anomalib_zsad.models.bgad.backbone import cached_hub_file, hub_source

    if is_random_weights(pretrained):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _create(backbone, image_size)
    elif pretrained is True:
        name = timm_name(backbone)
        repo, _ = hub_source(name)
        cached = cached_hub_file(repo) if repo else None
        if cached is not None:
            model = load_weights_file(backbone, image_size, cached)
        elif not repo:
            msg = f"M3DM: timm has no pretrained weights for {backbone!r}; give a weights file or pretrained=false"
            raise ValueError(msg)
        elif not _reachable("huggingface.co"):
            raise RGBWeightsUnavailableError(offline_message(backbone, repo, "no network: cannot reach huggingface.co"))
        else:
            import timm

            try:
                model = timm.create_model(name, pretrained=True, num_classes=0, img_size=tuple(image_size))
            except Exception as error:  # noqa: BLE001  (any download failure means the same to the user)
                reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                raise RGBWeightsUnavailableError(offline_message(backbone, repo, reason)) from None
    else:
        model = load_weights_file(backbone, image_size, pretrained)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def vit_feature_map(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``[B, C, H/p, W/p]``: the final normalised patch tokens (the official ``forward_rgb_features``)."""
    tokens = model.forward_features(images)[:, model.num_prefix_tokens:]
    height, width = model.patch_embed.dynamic_feat_size(images.shape[-2:]) if getattr(
        model.patch_embed, "dynamic_img_size", False) else model.patch_embed.grid_size
    return tokens.permute(0, 2, 1).reshape(images.shape[0], -1, height, width)
