"""The narrow random CLIP of every parity set, in OpenAI's state-dict layout, and its TorchScript archive.

All six generators (and ``check_anomalyclip_heads.py``) draw their CLIP here, so that one recipe (the
sets' README section 1) makes all of them: the depth, patch size and grid of ViT-L/14@336px (24 vision
blocks, 12 text blocks, patch 14, 24 x 24 grid) with small widths, stored in fp16. Each generator names
its widths in an open_clip-style config (``narrow_config``), which is also what the official code reads.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

BLOCK = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_1.weight",
         "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_2.weight",
         "ln_2.bias"]
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # CLIP's bpe_simple_vocab_16e6


def narrow_config(embed_dim: int, vision_width: int, text_width: int, *, text_heads: int = 1,
                  vision_head_width: int | None = None) -> dict:
    """open_clip model config (the ``ViT-L-14-336.json`` layout; key order as the sets store it)."""
    vision = {"image_size": 336, "layers": 24, "width": vision_width, "patch_size": 14}
    if vision_head_width is not None:
        vision["head_width"] = vision_head_width
    return {"embed_dim": embed_dim, "vision_cfg": vision,
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": text_heads,
                         "layers": 12}}


def openai_keys(vision_layers: int, text_layers: int) -> list[str]:
    """Key order of OpenAI's CLIP ``state_dict()`` (ViT): the order the random draws follow."""
    keys = ["positional_embedding", "text_projection", "logit_scale", "visual.class_embedding",
            "visual.positional_embedding", "visual.proj", "visual.conv1.weight", "visual.ln_pre.weight",
            "visual.ln_pre.bias"]
    keys += [f"visual.transformer.resblocks.{i}.{b}" for i in range(vision_layers) for b in BLOCK]
    keys += ["visual.ln_post.weight", "visual.ln_post.bias"]
    keys += [f"transformer.resblocks.{i}.{b}" for i in range(text_layers) for b in BLOCK]
    return [*keys, "token_embedding.weight", "ln_final.weight", "ln_final.bias"]


def _shape(key: str, leaf: str, w: int, v: dict, t: dict, embed: int) -> tuple[int, ...]:
    if "resblocks" in key:
        return {"attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,), "attn.out_proj.weight": (w, w),
                "mlp.c_fc.weight": (4 * w, w), "mlp.c_fc.bias": (4 * w,),
                "mlp.c_proj.weight": (w, 4 * w)}.get(leaf, (w,))
    if ".ln_" in key or key.startswith("ln_"):
        return (w,)
    grid = v["image_size"] // v["patch_size"]
    return {"positional_embedding": (t["context_length"], t["width"]), "text_projection": (t["width"], embed),
            "visual.class_embedding": (v["width"],), "visual.positional_embedding": (grid * grid + 1, v["width"]),
            "visual.proj": (v["width"], embed),
            "visual.conv1.weight": (v["width"], 3, v["patch_size"], v["patch_size"]),
            "token_embedding.weight": (t["vocab_size"], t["width"])}[key]


def _scaled(n: torch.Tensor, key: str, leaf: str, w: int, layers: int,  # noqa: PLR0911
            v: dict, t: dict) -> torch.Tensor:
    if any(part.startswith("ln_") for part in key.split(".")):
        return 1 + 0.1 * n if key.endswith("weight") else 0.1 * n
    if leaf == "attn.in_proj_weight":
        return n * w**-0.5
    if leaf in ("attn.out_proj.weight", "mlp.c_proj.weight"):
        return n * (w**-0.5 * (2 * layers) ** -0.5)  # one product: bitwise what the sets hold for any width
    if leaf == "mlp.c_fc.weight":
        return n * (2 * w) ** -0.5
    if key.endswith("bias"):
        return 0.02 * n
    if key == "visual.conv1.weight":
        return n * (3 * v["patch_size"] ** 2) ** -0.5
    if key in ("visual.class_embedding", "visual.positional_embedding", "visual.proj"):
        return n * v["width"] ** -0.5
    if key == "text_projection":
        return n * t["width"] ** -0.5
    if key == "token_embedding.weight":
        return 0.02 * n
    if key == "positional_embedding":
        return 0.01 * n
    raise KeyError(key)


def narrow_clip_state_dict(seed: int, config: dict) -> dict[str, torch.Tensor]:
    """README section 1: ``torch.manual_seed(seed)``, one ``torch.randn`` a key in OpenAI's key order, scaled; fp16.

    LayerNorm weight ``1+0.1N``, bias ``0.1N``; ``in_proj N w^-1/2``; ``out_proj``/``c_proj N (w 2L)^-1/2``;
    ``c_fc N (2w)^-1/2``; linear biases ``0.02N``; ``conv1 N (3 p^2)^-1/2``; class embedding, visual
    pos-embed and ``visual.proj N wv^-1/2``; ``token_embedding 0.02N``; text pos-embed ``0.01N``;
    ``text_projection N wt^-1/2``; ``logit_scale = ln(1/0.07)``. ``config`` is a ``narrow_config``.
    """
    v, t, embed = config["vision_cfg"], config["text_cfg"], config["embed_dim"]
    torch.manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key in openai_keys(v["layers"], t["layers"]):
        if key == "logit_scale":
            out[key] = torch.tensor(math.log(1 / 0.07)).half()
            continue
        tower = v if key.startswith("visual.") else t
        leaf = key.split("resblocks.")[1].split(".", 1)[1] if "resblocks" in key else key.split(".")[-1]
        n = torch.randn(_shape(key, leaf, tower["width"], v, t, embed))
        out[key] = _scaled(n, key, leaf, tower["width"], tower["layers"], v, t).half()
    out["input_resolution"] = torch.tensor(v["image_size"])
    out["context_length"] = torch.tensor(t["context_length"])
    out["vocab_size"] = torch.tensor(t["vocab_size"])
    return out


def write_narrow_clip(seed: int, config: dict, out: Path, work: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The set's ``clip_state_dict.pt`` in ``out``, and in ``work`` the archive the official loaders get instead
    of OpenAI's download (``ViT-L-14-336px.pt``); returns the state dict and the archive's path."""
    state = narrow_clip_state_dict(seed, config)
    torch.save(state, out / "clip_state_dict.pt")
    archive = work / "ViT-L-14-336px.pt"
    torchscript_archive(state, archive)
    return state, archive


def clip_cfg(config: dict, seed: int) -> dict:
    """The sets' ``meta.clip_cfg``: the narrow CLIP in the words of README section 1."""
    v, t = config["vision_cfg"], config["text_cfg"]
    return {"vision_width": v["width"], "vision_layers": v["layers"], "vision_patch_size": v["patch_size"],
            "vision_grid": v["image_size"] // v["patch_size"], "text_width": t["width"], "text_layers": t["layers"],
            "embed_dim": config["embed_dim"], "context_length": t["context_length"], "vocab_size": t["vocab_size"],
            "seed": seed, "storage_dtype": "float16"}


def torchscript_archive(state: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive whose ``state_dict()`` is ``state``: the container of OpenAI's ``*.pt``, which the
    official loaders open with ``torch.jit.load``."""
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
        module.register_buffer(leaf, value.clone())
    torch.jit.save(torch.jit.script(root), str(path))
