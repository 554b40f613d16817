"""The official inference paths that ``latency.py --official-src`` times against the plugin's models.

One function per method: it imports the official code from an export of its repository (``src``),
loads the weights ``latency.py`` wrote in the official formats (our random CLIP as an OpenAI
TorchScript archive, our learnt parts through each model's own ``save_official_checkpoint``-style
writer), and returns ``call(images) -> (score [B], map [B, H, W])`` computing what the official
test script computes per batch. Nothing of the official code is copied here; the run-time patches
are those of ``tools/parity/make_<method>_set.py`` (CPU-only host, absent ``pkg_resources``).
"""

from __future__ import annotations

import contextlib
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

OPENAI_ARCHIVE = "clip-openai.pt"
OfficialCall = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def openai_state_dict(clip) -> dict[str, torch.Tensor]:
    """Our CLIP's weights under OpenAI's names (the text tower's ``text.`` prefix dropped)."""
    return {k.removeprefix("text."): v.detach().clone() for k, v in clip.state_dict().items()}


def write_openai_archive(clip, path: Path) -> None:
    """A TorchScript archive whose ``state_dict()`` is our CLIP in OpenAI's layout, what every official
    loader (``open_clip``'s ``load_openai_model``, AnomalyCLIP's ``load``) reads for ``pretrained=openai``.
    The official loaders convert it to fp16 and back: :func:`round_to_fp16` beforehand keeps both sides equal."""
    state = openai_state_dict(clip)

    class Node(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Node()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, Node())
            module = getattr(module, name)
        module.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    torch.jit.script(root).save(str(path))


@torch.no_grad()
def round_to_fp16(module: torch.nn.Module) -> None:
    """Round every floating parameter to fp16 precision (kept in fp32): the official loaders' half() round trip."""
    for param in module.parameters():
        if param.is_floating_point():
            param.copy_(param.half().float())


def stub_modules() -> None:
    """``pkg_resources`` (imported by several official files for ``packaging``, absent with recent setuptools),
    ``ipdb`` and ``thop`` (imported, never used for inference)."""
    from packaging import version

    for name, attrs in (("pkg_resources", {"packaging": types.SimpleNamespace(version=version)}),
                        ("ipdb", {}), ("thop", {"profile": None})):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.SimpleNamespace(**attrs)


@contextlib.contextmanager
def cuda_to_identity():
    """``tensor.to('cuda')`` returns the tensor on a CUDA-less host (VAND's and AdaCLIP's vendored
    ``open_clip/transformer.py`` build an unused ``out_attn`` on ``cuda``)."""
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], str) and args[0].startswith("cuda") and not torch.cuda.is_available():
            return self
        return original(self, *args, **kwargs)

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = original


def vand(src: Path, work: Path) -> OfficialCall:
    """VAND (APRIL-GAN) ``test.py --mode zero_shot``: open_clip's ``encode_image(image, features_list)``,
    the ``LinearLayer``, per layer ``softmax(bilinear(100 * tokens @ text))[:, 1]`` summed; the image score
    ``softmax(100 * image @ text)[:, 1]``. Text: ``encode_text_with_prompt_ensemble`` for our class name."""
    import numpy as np
    import torch.nn.functional as F  # noqa: N812

    stub_modules()
    sys.path.insert(0, str(src))
    import open_clip
    from model import LinearLayer
    from open_clip import openai as openai_module
    from prompt_ensemble import encode_text_with_prompt_ensemble

    archive = work / OPENAI_ARCHIVE
    openai_module.get_pretrained_url = lambda _name, _tag: "local"  # also for the small test architectures
    openai_module.download_pretrained_from_url = lambda _url, cache_dir=None: str(archive)  # noqa: ARG005
    config = json.loads((work / "official.json").read_text())
    size, layers, name = config["image_size"], config["feature_layers"], config["class_name"]
    if config.get("architecture"):  # a small test architecture: open_clip checks the name's image size
        (work / f"{config['open_clip_name']}.json").write_text(json.dumps(config["architecture"]))
        open_clip.add_model_config(work / f"{config['open_clip_name']}.json")
    clip, _, _ = open_clip.create_model_and_transforms(config["open_clip_name"], size, pretrained="openai")
    clip.eval()
    head = LinearLayer(clip.visual.transformer.width, clip.text_projection.shape[1], len(layers), "ViT")
    head.load_state_dict(torch.load(work / "official-weights.pt", weights_only=True)["trainable_linearlayer"])
    with torch.no_grad(), cuda_to_identity():
        text = encode_text_with_prompt_ensemble(clip, [name], open_clip.get_tokenizer(config["open_clip_name"]),
                                                "cpu")[name][None]

    def call(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), cuda_to_identity():
            features, tokens = clip.encode_image(image, layers)
            features /= features.norm(dim=-1, keepdim=True)
            score = (100.0 * features @ text[0]).softmax(dim=-1)[:, 1]
            tokens = head(tokens)
            maps = []
            for layer in range(len(tokens)):
                tokens[layer] /= tokens[layer].norm(dim=-1, keepdim=True)
                logits = 100.0 * tokens[layer] @ text
                batch, length, _ = logits.shape
                grid = int(np.sqrt(length))
                logits = F.interpolate(logits.permute(0, 2, 1).view(batch, 2, grid, grid), size=size,
                                       mode="bilinear", align_corners=True)
                maps.append(torch.softmax(logits, dim=1)[:, 1].cpu().numpy())
            return score, torch.from_numpy(np.sum(maps, axis=0))

    return call


def export_vand(model, work: Path) -> dict:
    from anomalib_zsad.models.vand import save_official_checkpoint

    save_official_checkpoint(model.model, work / "official-weights.pt")
    return {"feature_layers": list(model.model.feature_layers), "class_name": model.model.class_name}


RUNNERS: dict[str, tuple[Callable, Callable]] = {"Vand": (vand, export_vand)}
