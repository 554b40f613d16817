"""Where CLIP weights come from: one function, :func:`load_clip`, and one clear offline error.

Accepted sources, in the manner of open_clip's factory:

* ``pretrained=<tag>`` with an open_clip architecture name (``"ViT-L-14-336"``, ``"openai"``):
  a file already in the cache directory is used; otherwise open_clip downloads it. Offline,
  :class:`ClipWeightsUnavailableError` says which file to fetch and where to put it.
* ``pretrained=<path>``: an OpenAI checkpoint (TorchScript archive, as OpenAI distributes it,
  or a plain ``state_dict``), an open_clip checkpoint (``.bin``/``.pt``/``.safetensors``).
* ``pretrained=None`` (or ``"random"``): random weights of the named architecture, for tests
  and timing.

The MLP activation follows the weights as open_clip does (QuickGELU for OpenAI's), unless a
method asks otherwise (several official codes run OpenAI weights with exact GELU).
"""

from __future__ import annotations

import os
import socket
import zipfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch

from .architecture import (
    EXTRA_ARCHITECTURES,
    ClipArchitecture,
    named_architecture,
    unsupported_options,
)
from .model import ClipModel

RANDOM_TAGS = (None, "", "random", "none")


class ClipWeightsUnavailableError(RuntimeError):
    """The CLIP weights asked for are not on this machine and cannot be downloaded."""


def default_cache_dir() -> Path:
    """``$ZSAD_CLIP_CACHE``, else ``~/.cache/clip`` (where OpenAI's ``clip`` package and the
    official AnomalyCLIP code keep ``ViT-L-14-336px.pt``)."""
    return Path(os.environ.get("ZSAD_CLIP_CACHE", Path.home() / ".cache" / "clip")).expanduser()


def _looks_like_path(pretrained: str | os.PathLike) -> bool:
    text = str(pretrained)
    return isinstance(pretrained, os.PathLike) or "/" in text or os.sep in text or Path(text).suffix in {
        ".pt", ".pth", ".bin", ".safetensors", ".ckpt"}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def read_clip_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a CLIP checkpoint file -> (state dict, is it OpenAI's format).

    TorchScript archives are opened with ``torch.jit.load`` on the CPU (that is how OpenAI ships
    its weights); everything else with ``torch.load(weights_only=True)`` or safetensors, so an
    untrusted file cannot run code.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"CLIP checkpoint not found: {path}"
        raise FileNotFoundError(msg)
    try:
        if _is_torchscript(path):
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict()), True
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        msg = f"could not read CLIP checkpoint {path}: {error}. Is the file complete and a CLIP checkpoint?"
        raise ValueError(msg) from error
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        msg = f"{path} holds a {type(state).__name__}, not a CLIP state dict"
        raise ValueError(msg)  # noqa: TRY004  (a wrong file, not a wrong argument type)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, "input_resolution" in state


def _offline_message(model_name: str, tag: str, cfg: Mapping, cache_dir: Path, reason: str) -> str:
    lines = [(f"CLIP weights {model_name!r} / {tag!r} are not on this machine and could not be downloaded "
              f"({reason})."), "Supply the file, then run again:"]
    if cfg.get("url"):
        filename = Path(urlparse(cfg["url"]).path).name
        lines.append(f"  * download {cfg['url']} on a machine with internet and put it at "
                     f"{cache_dir / filename} (or set $ZSAD_CLIP_CACHE to its folder),")
        lines.append(f"    or pass its path instead of the tag: pretrained='/path/to/{filename}' "
                     "(CLI: --model.pretrained /path/to/file)")
    if cfg.get("hf_hub"):
        lines.append(f"  * or copy the Hugging Face hub repository {cfg['hf_hub'].rstrip('/')} into the hub cache "
                     "(huggingface-cli download ...) and pass the open_clip_pytorch_model.bin path the same way.")
    return "\n".join(lines)


def loadable_architecture_names() -> list[str]:
    """Every architecture name :func:`load_clip` builds: this package's small ones, then open_clip's
    CLIP ViTs (SigLIP, ViTamin, CLIPA, MetaCLIP-2 and other non-CLIP towers left out)."""
    import open_clip

    names = [name for name in open_clip.list_models()
             if name.startswith("ViT") and not unsupported_options(open_clip.get_model_config(name) or {})]
    return sorted(EXTRA_ARCHITECTURES) + names


def _check_architecture_name(model_name: str) -> None:
    """Refuse, before any download, a name that this CLIP layer cannot build, listing those it can."""
    if model_name in EXTRA_ARCHITECTURES:
        return
    import open_clip

    config = open_clip.get_model_config(model_name)
    known = f"Known ViT names: {', '.join(loadable_architecture_names())}"
    if config is None:
        msg = f"unknown CLIP architecture {model_name!r}. {known}"
        raise ValueError(msg)
    if unsupported := unsupported_options(config):
        msg = (f"CLIP architecture {model_name!r} is not one this CLIP layer loads (open_clip config options "
               f"{', '.join(unsupported)} are not implemented: SigLIP/timm towers, CLIPA, MetaCLIP-2 "
               f"tokenizers and the like are not CLIP ViTs here). {known}")
        raise ValueError(msg)


def _open_clip_architecture(model_name: str) -> ClipArchitecture | None:
    """The open_clip architecture a name stands for, or None where it names none this CLIP layer builds."""
    import open_clip

    config = open_clip.get_model_config(model_name)
    if config is None or unsupported_options(config):
        return None
    return named_architecture(model_name)


def _check_head_width(arch: ClipArchitecture, named: ClipArchitecture, model_name: str, head_width: int) -> None:
    """An explicit ``head_width`` must give the named architecture's vision heads (its text heads come
    from its config in any case: ``text_cfg.heads``)."""
    if arch.vision_width % head_width or arch.vision_width // head_width != named.vision_heads:
        msg = (f"head_width={head_width} gives {arch.vision_width / head_width:g} vision heads, but {model_name!r} "
               f"has {named.vision_heads} of {named.vision_width // named.vision_heads} channels (its open_clip "
               "config): weights of that architecture compute wrong outputs with other heads. Leave head_width unset.")
        raise ValueError(msg)


def architecture_of_weights(
    state_dict: Mapping[str, torch.Tensor],
    model_name: str,
    head_width: int | None = None,
    activation: str = "quick_gelu",
) -> ClipArchitecture:
    """The architecture that runs a CLIP state dict (OpenAI/open_clip keys).

    Weights do not tell the number of heads. Where they have the shape of the named architecture
    (an open_clip name, or one of this package's with ``head_width``), its heads are used, as open_clip builds it
    (ViT-H-14: 16 vision heads of 80 channels, not 20 of 64; ViT-bigG-14: 16 of 104); otherwise
    ``head_width`` (unset: CLIP's 64) decides. A ``head_width`` that contradicts the named
    architecture is refused: those weights would load and compute wrong outputs.
    """
    arch = ClipArchitecture.from_state_dict(state_dict, head_width or 64, activation)
    if model_name in EXTRA_ARCHITECTURES:  # this package's small ones: head_width sets the vision heads
        named = named_architecture(model_name, head_width or 64)
        return arch.with_heads_of(named) if named.same_shape(arch) else arch
    named = _open_clip_architecture(model_name)
    if named is None or not named.same_shape(arch):
        return arch
    if head_width is not None:
        _check_head_width(arch, named, model_name, head_width)
    return arch.with_heads_of(named)


def _cached_hub_file(repo: str, cache_dir: Path | None = None) -> Path | None:
    """An open_clip hub checkpoint already on this machine, without any network call: in
    ``cache_dir`` (where :func:`resolve_pretrained` has open_clip download hub files) or in the
    Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for where in ([cache_dir] if cache_dir is not None else []) + [None]:
        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(repo.rstrip("/"), filename, cache_dir=where)
            if isinstance(found, str):
                return Path(found)
    return None


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """One quick TCP connection: offline machines fail here at once instead of in minutes of
    download retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("ZSAD_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_pretrained(model_name: str, tag: str, cache_dir: Path | None = None) -> tuple[Path, bool]:
    """The local file for an open_clip (name, tag) pair, downloading it if the network allows.

    Returns (path, whether the tag is one of OpenAI's QuickGELU-trained releases).
    """
    import open_clip

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cfg = open_clip.pretrained.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = open_clip.pretrained.list_pretrained_tags_by_model(model_name)
        msg = f"no pretrained weights {tag!r} for {model_name!r}; known tags: {tags or 'none'}"
        raise ValueError(msg)
    quick_gelu = bool(cfg.get("quick_gelu", False))
    if cfg.get("url"):
        local = cache_dir / Path(urlparse(cfg["url"]).path).name
        if local.is_file():
            return local, quick_gelu
    if cfg.get("hf_hub") and (hub_file := _cached_hub_file(cfg["hf_hub"], cache_dir)) is not None:
        return hub_file, quick_gelu
    hosts = [urlparse(cfg["url"]).hostname] if cfg.get("url") else []
    hosts += ["huggingface.co"] if cfg.get("hf_hub") else []
    if not any(_reachable(host) for host in hosts):
        reason = f"no network: cannot reach {' or '.join(hosts)}"
        raise ClipWeightsUnavailableError(_offline_message(model_name, tag, cfg, cache_dir, reason))
    try:
        downloaded = open_clip.pretrained.download_pretrained(cfg, cache_dir=str(cache_dir))
    except Exception as error:  # noqa: BLE001  (any network failure means the same to the user)
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        raise ClipWeightsUnavailableError(_offline_message(model_name, tag, cfg, cache_dir, reason)) from None
    if not downloaded:
        raise ClipWeightsUnavailableError(_offline_message(model_name, tag, cfg, cache_dir, "no download source"))
    return Path(downloaded), quick_gelu


def load_clip(
    model_name: str = "ViT-L-14-336",
    pretrained: str | os.PathLike | None = "openai",
    *,
    activation: str = "auto",
    head_width: int | None = None,
    pos_embed_mode: str = "bicubic_antialias",
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> ClipModel:
    """Build a CLIP ViT in float32, eval mode, on the CPU.

    Args:
        model_name: open_clip architecture name (``ViT-L-14-336``, ``ViT-B-16``, ...) or one of
            this package's small ones (``zsad-tiny``). With a checkpoint file the shape is read
            from the weights and the name only matters for error messages.
        pretrained: an open_clip tag (``openai``, ``laion2b_s34b_b88k``, ...), a checkpoint path,
            or None for random weights.
        activation: ``auto`` (follow the weights: QuickGELU for OpenAI's), ``quick_gelu`` or ``gelu``.
        head_width: channels per attention head (heads = width // head_width). Unset (None), the
            heads of the named architecture's config where the weights have its shape (as open_clip
            builds it: 80-channel vision heads for ViT-H-14, 104 for ViT-bigG-14), else CLIP's 64.
            Set it only for weights of no named shape (a narrow test CLIP); for weights of a
            named architecture it must agree with that architecture.
        pos_embed_mode: how position embeddings are resized to other input sizes.
        cache_dir: where downloaded weights live (default :func:`default_cache_dir`).
        seed: the seed of random weights.
    """
    if pretrained in RANDOM_TAGS or str(pretrained).lower() in {"random", "none"}:
        _check_architecture_name(model_name)
        arch = named_architecture(model_name, head_width or 64)
        if head_width is not None and model_name not in EXTRA_ARCHITECTURES:
            _check_head_width(arch, arch, model_name, head_width)
        if activation != "auto":
            arch = arch.with_activation(activation)
        model = ClipModel(arch, pos_embed_mode)
        model.reset_parameters(seed)
        return model.eval()

    quick_gelu = False
    if _looks_like_path(pretrained) or Path(str(pretrained)).expanduser().is_file():
        path = Path(pretrained).expanduser()
        if not path.is_file():
            msg = (f"CLIP checkpoint not found: {path}. Pass an existing file, or an open_clip tag such as "
                   "'openai' together with an architecture name.")
            raise FileNotFoundError(msg)
    elif model_name in EXTRA_ARCHITECTURES:
        msg = f"{model_name!r} has no released weights: use pretrained=None (random) or a file path"
        raise ValueError(msg)
    else:
        _check_architecture_name(model_name)  # before any download or "supply this file" message
        path, quick_gelu = resolve_pretrained(model_name, str(pretrained), cache_dir)
    state_dict, openai_format = read_clip_state_dict(path)
    if activation == "auto":
        activation = "quick_gelu" if (quick_gelu or openai_format or model_name.endswith("-quickgelu")) else "gelu"
    arch = architecture_of_weights(state_dict, model_name, head_width, activation)
    model = ClipModel(arch, pos_embed_mode)
    model.load_openai_state_dict(state_dict)
    return model.eval()
