"""Shared pieces of the parity-set generators: the narrow random CLIP, its TorchScript archive,
synthetic test images and small run-time patching helpers.

The narrow CLIP keeps the depth, patch size and grid of ViT-L/14@336px (24 vision blocks, 12 text
blocks, patch 14, 24 x 24 position grid) with small widths, in OpenAI's state-dict layout and fp16,
as the shared parity sets describe (README section 1 of each set).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np
import torch

BLOCK = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_1.weight",
         "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_2.weight",
         "ln_2.bias"]
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def openai_keys(vision_layers: int, text_layers: int) -> list[str]:
    """Key order of OpenAI's CLIP ``state_dict()`` (ViT)."""
    keys = ["positional_embedding", "text_projection", "logit_scale", "visual.class_embedding",
            "visual.positional_embedding", "visual.proj", "visual.conv1.weight", "visual.ln_pre.weight",
            "visual.ln_pre.bias"]
    keys += [f"visual.transformer.resblocks.{i}.{b}" for i in range(vision_layers) for b in BLOCK]
    keys += ["visual.ln_post.weight", "visual.ln_post.bias"]
    keys += [f"transformer.resblocks.{i}.{b}" for i in range(text_layers) for b in BLOCK]
    return [*keys, "token_embedding.weight", "ln_final.weight", "ln_final.bias"]


def narrow_clip_state_dict(seed: int, vision_width: int, text_width: int, embed_dim: int, *,  # noqa: C901
                           vision_layers: int = 24,
                           text_layers: int = 12, patch: int = 14, grid: int = 24, context: int = 77,
                           vocab: int = 49408) -> dict[str, torch.Tensor]:
    """The sets' narrow random CLIP: ``torch.manual_seed(seed)``, one ``torch.randn`` a key in key order.

    LayerNorm weight ``1+0.1N``, bias ``0.1N``; ``in_proj N w^-1/2``; ``out_proj``/``c_proj N (w 2L)^-1/2``;
    ``c_fc N (2w)^-1/2``; linear biases ``0.02N``; ``conv1 N (3 p^2)^-1/2``; class embedding, visual
    pos-embed and ``visual.proj N wv^-1/2``; ``token_embedding 0.02N``; text pos-embed ``0.01N``;
    ``text_projection N wt^-1/2``; ``logit_scale = ln(1/0.07)``; then fp16.
    """
    wv, wt = vision_width, text_width
    shapes = {"positional_embedding": (context, wt), "text_projection": (wt, embed_dim),
              "visual.class_embedding": (wv,), "visual.positional_embedding": (grid * grid + 1, wv),
              "visual.proj": (wv, embed_dim), "visual.conv1.weight": (wv, 3, patch, patch),
              "token_embedding.weight": (vocab, wt)}
    torch.manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key in openai_keys(vision_layers, text_layers):
        if key == "logit_scale":
            out[key] = torch.tensor(np.log(1 / 0.07)).half()
            continue
        visual = key.startswith("visual.")
        w, layers = (wv, vision_layers) if visual else (wt, text_layers)
        leaf = key.split("resblocks.")[1].split(".", 1)[1] if "resblocks" in key else key.split(".")[-1]
        if "resblocks" in key:
            shape = {"attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,), "attn.out_proj.weight": (w, w),
                     "mlp.c_fc.weight": (4 * w, w), "mlp.c_fc.bias": (4 * w,), "mlp.c_proj.weight": (w, 4 * w)}.get(
                leaf, (w,))
        elif ".ln_" in key or key.startswith("ln_"):
            shape = (w,)
        else:
            shape = shapes[key]
        n = torch.randn(shape)
        layer_norm = any(part.startswith("ln_") for part in key.split("."))
        if layer_norm and key.endswith("weight"):
            value = 1 + 0.1 * n
        elif layer_norm:
            value = 0.1 * n
        elif leaf == "attn.in_proj_weight":
            value = n * w**-0.5
        elif leaf in ("attn.out_proj.weight", "mlp.c_proj.weight"):
            value = n * (w**-0.5 * (2 * layers) ** -0.5)
        elif leaf == "mlp.c_fc.weight":
            value = n * (2 * w) ** -0.5
        elif key.endswith("bias"):
            value = 0.02 * n
        elif key == "visual.conv1.weight":
            value = n * (3 * patch**2) ** -0.5
        elif key in ("visual.class_embedding", "visual.positional_embedding", "visual.proj"):
            value = n * wv**-0.5
        elif key == "text_projection":
            value = n * wt**-0.5
        elif key == "token_embedding.weight":
            value = 0.02 * n
        elif key == "positional_embedding":
            value = 0.01 * n
        else:
            raise KeyError(key)
        out[key] = value.half()
    out["input_resolution"] = torch.tensor(grid * patch)
    out["context_length"] = torch.tensor(context)
    out["vocab_size"] = torch.tensor(vocab)
    return out


def torchscript_archive(state: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive whose ``state_dict()`` is ``state`` (what OpenAI distributes)."""
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


DEFECTS = [None, (96, 160, 64, 144), (40, 100, 150, 230), (170, 230, 20, 90)]
DEFECT_COLOURS = [None, (250, 40, 40), (30, 230, 60), (20, 20, 240)]


def make_images(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` 256 x 256 RGB images ``0.6 kron(U(8x8x3)) + 0.4 U(256x256x3)`` (``default_rng(seed)``),
    coloured rectangles (defects) on images 1.. and their 0/255 masks."""
    rng = np.random.default_rng(seed)
    coarse, fine = rng.random((count, 8, 8, 3)), rng.random((count, 256, 256, 3))
    images, masks = [], []
    for index in range(count):
        mixed = 0.6 * np.kron(coarse[index], np.ones((32, 32, 1))) + 0.4 * fine[index]
        image = np.round(255 * mixed).clip(0, 255).astype(np.uint8)
        mask = np.zeros((256, 256), np.uint8)
        if DEFECTS[index] is not None:
            r0, r1, c0, c1 = DEFECTS[index]
            image[r0:r1, c0:c1] = DEFECT_COLOURS[index]
            mask[r0:r1, c0:c1] = 255
        images.append(image)
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def pack_bits(array: torch.Tensor) -> dict:
    """Binary map -> ``{"bits": uint8, "shape": [...]}`` (``np.packbits`` of the C-order values)."""
    values = np.asarray(array.detach().cpu().numpy() != 0, dtype=np.uint8)
    return {"bits": torch.from_numpy(np.packbits(values.reshape(-1))), "shape": list(values.shape)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def patched(obj, name: str, make):
    """Replace ``obj.name`` by ``make(original)`` for the duration of the block."""
    original = getattr(obj, name)
    setattr(obj, name, make(original))
    try:
        yield original
    finally:
        setattr(obj, name, original)


class LegacyImage:
    """``PIL.Image`` proxy: ``fromarray`` of a float64 array in mode 'L' gives the all-zero image that
    Pillow < 11 made (the official datasets build normal images' masks so)."""

    def __init__(self, module) -> None:
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def fromarray(self, array, mode=None):
        if mode == "L" and np.asarray(array).dtype == np.float64:
            return self._module.fromarray(np.asarray(array).astype(np.uint8), mode="L")
        return self._module.fromarray(array) if mode is None else self._module.fromarray(array, mode=mode)
