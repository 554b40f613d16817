"""Shared pieces of the AnomalyCLIP and VAND parity-set generators (``make_anomalyclip_set.py``,
``make_vand_set.py``): the narrow random CLIP of the sets' README section 1 (both sets use the same one),
the TorchScript container OpenAI ships it in, the synthetic images of section 8, and the run-time helpers
(legacy Pillow proxy, attribute patching, file hashes). Nothing of the official code is here.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import platform
import sys
import types
from pathlib import Path

import numpy as np
import torch

# The narrow CLIP: depth, patch size and grid of ViT-L/14@336px, width 64 (1 head), embed 32.
NARROW = {"embed_dim": 32,
          "vision_cfg": {"image_size": 336, "layers": 24, "width": 64, "patch_size": 14},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 12}}
BLOCK = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_1.weight",
         "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_2.weight",
         "ln_2.bias"]
DEFECT_BOX = (96, 160, 64, 144)  # rows 96:160, cols 64:144 of the 256 px image
TOKEN_INDEX = torch.arange(0, 1369 + 1, 8)  # 0 = CLS, T = 172
UPSAMPLED_INDEX = torch.cat([torch.arange(0, 518, 9), torch.tensor([517])])  # S = 59


def openai_keys(vision_layers: int, text_layers: int) -> list[str]:
    """Key order of OpenAI's CLIP ``state_dict()`` (ViT)."""
    keys = ["positional_embedding", "text_projection", "logit_scale", "visual.class_embedding",
            "visual.positional_embedding", "visual.proj", "visual.conv1.weight", "visual.ln_pre.weight",
            "visual.ln_pre.bias"]
    keys += [f"visual.transformer.resblocks.{i}.{b}" for i in range(vision_layers) for b in BLOCK]
    keys += ["visual.ln_post.weight", "visual.ln_post.bias"]
    keys += [f"transformer.resblocks.{i}.{b}" for i in range(text_layers) for b in BLOCK]
    return [*keys, "token_embedding.weight", "ln_final.weight", "ln_final.bias"]


def narrow_clip_state_dict(seed: int, width: int = 64) -> dict[str, torch.Tensor]:  # noqa: C901
    """README section 1: ``torch.manual_seed(seed)``, then ``torch.randn`` in key order, scaled; fp16.

    ``width`` (both towers; the sets use 64, i.e. one 64-channel head) other than 64 gives ``width // 64``
    heads, for checks of the multi-head code paths.
    """
    v, t, e = dict(NARROW["vision_cfg"], width=width), dict(NARROW["text_cfg"], width=width), NARROW["embed_dim"]
    grid = v["image_size"] // v["patch_size"]
    shapes = {"positional_embedding": (t["context_length"], t["width"]), "text_projection": (t["width"], e),
              "visual.class_embedding": (v["width"],), "visual.positional_embedding": (grid * grid + 1, v["width"]),
              "visual.proj": (v["width"], e), "visual.conv1.weight": (v["width"], 3, v["patch_size"], v["patch_size"]),
              "token_embedding.weight": (t["vocab_size"], t["width"])}
    torch.manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key in openai_keys(v["layers"], t["layers"]):
        if key == "logit_scale":
            out[key] = torch.tensor(math.log(1 / 0.07)).half()
            continue
        tower = v if key.startswith("visual.") else t
        w, layers = tower["width"], tower["layers"]
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
            value = n * w**-0.5 * (2 * layers) ** -0.5
        elif leaf == "mlp.c_fc.weight":
            value = n * (2 * w) ** -0.5
        elif key.endswith("bias"):
            value = 0.02 * n
        elif key == "visual.conv1.weight":
            value = n * (3 * v["patch_size"] ** 2) ** -0.5
        elif key in ("visual.class_embedding", "visual.positional_embedding", "visual.proj"):
            value = n * v["width"] ** -0.5
        elif key == "text_projection":
            value = n * t["width"] ** -0.5
        elif key == "token_embedding.weight":
            value = 0.02 * n
        elif key == "positional_embedding":
            value = 0.01 * n
        else:
            raise KeyError(key)
        out[key] = value.half()
    out["input_resolution"] = torch.tensor(v["image_size"])
    out["context_length"] = torch.tensor(t["context_length"])
    out["vocab_size"] = torch.tensor(t["vocab_size"])
    return out


def clip_cfg(seed: int) -> dict:
    v, t = NARROW["vision_cfg"], NARROW["text_cfg"]
    return {"vision_width": v["width"], "vision_layers": v["layers"], "vision_patch_size": v["patch_size"],
            "vision_grid": v["image_size"] // v["patch_size"], "text_width": t["width"], "text_layers": t["layers"],
            "embed_dim": NARROW["embed_dim"], "context_length": t["context_length"], "vocab_size": t["vocab_size"],
            "seed": seed, "storage_dtype": "float16"}


def torchscript_archive(state: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive whose ``state_dict()`` is ``state`` (the container of OpenAI's ``*.pt``)."""
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


def make_images(rng: np.random.Generator, count: int, defect_index: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``count`` 256 x 256 RGB images ``0.6 kron(U(8x8x3)) + 0.4 U(256x256x3)``; the one at ``defect_index``
    gets a ``[250, 40, 40]`` box (README section 8), and a 0/255 mask there."""
    coarse, fine = rng.random((count, 8, 8, 3)), rng.random((count, 256, 256, 3))
    images, masks = [], []
    top, bottom, left, right = DEFECT_BOX
    for index in range(count):
        mixed = 0.6 * np.kron(coarse[index], np.ones((32, 32, 1))) + 0.4 * fine[index]
        image = np.round(255 * mixed).clip(0, 255).astype(np.uint8)
        mask = np.zeros((256, 256), np.uint8)
        if index == defect_index:
            image[top:bottom, left:right] = [250, 40, 40]
            mask[top:bottom, left:right] = 255
        images.append(image)
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stub_module(name: str, record: list[str], note: str, **attributes) -> None:
    """Put a stub into ``sys.modules`` only when the real module is not importable."""
    try:
        __import__(name)
    except ImportError:
        module = types.ModuleType(name)
        for key, value in attributes.items():
            setattr(module, key, value)
        sys.modules[name] = module
        record.append(f"stub module {name} ({note})")


def pkg_resources_stub(record: list[str], note: str) -> None:
    from packaging import version

    stub_module("pkg_resources", record, note, packaging=types.SimpleNamespace(version=version))


class LegacyImage:
    """``PIL.Image`` proxy: ``fromarray`` of a float64 array in mode 'L' gives the all-zero image that
    Pillow < 11 made (the official data sets build normal images' masks so); everything else is real PIL."""

    def __init__(self, module) -> None:
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def fromarray(self, array, mode=None):
        if mode == "L" and np.asarray(array).dtype == np.float64:
            return self._module.fromarray(np.asarray(array).astype(np.uint8), mode="L")
        return self._module.fromarray(array) if mode is None else self._module.fromarray(array, mode=mode)


@contextlib.contextmanager
def patched(obj, name: str, make):
    """Replace ``obj.name`` by ``make(original)`` for the ``with`` block."""
    original = getattr(obj, name)
    setattr(obj, name, make(original))
    try:
        yield original
    finally:
        setattr(obj, name, original)


def cpu_only_patches(record: list[str]) -> list:
    """On a CUDA host the official scripts would pick ``cuda``: keep them on the CPU (the goldens are float32)."""
    if not torch.cuda.is_available():
        return []
    record.append("torch.cuda.is_available -> False: the goldens are the float32 CPU run")
    return [(torch.cuda, "is_available", lambda _orig: lambda: False)]


def environment(extra: tuple[str, ...] = ()) -> dict:
    import PIL
    import scipy
    import torchvision

    env = {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
           "num_threads": torch.get_num_threads(), "scipy": scipy.__version__, "PIL": PIL.__version__,
           "torchvision": torchvision.__version__}
    for name in extra:
        env[name] = __import__(name).__version__
    return env


def write_single_class_test_set(root: Path, images: np.ndarray, masks: np.ndarray, cls_name: str) -> dict:
    """The test images as PNGs in one class folder plus the ``meta.json`` that the AnomalyCLIP-derived
    ``dataset.py`` reads (``meta['test'][cls_name]``; GlocalCLIP's train.py reads the same split).
    A mask file is written only for anomalous images (a normal image's mask is made by the official code)."""
    import json

    from PIL import Image

    entries, image_paths, mask_paths = [], [], []
    for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
        anomalous = bool(mask.any())
        kind = "defect" if anomalous else "good"
        img_rel = f"{cls_name}/test/{kind}/{index:03d}.png"
        (root / img_rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / img_rel)
        mask_rel = ""
        if anomalous:
            mask_rel = f"{cls_name}/ground_truth/{kind}/{index:03d}_mask.png"
            (root / mask_rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask, mode="L").save(root / mask_rel)
        entries.append({"img_path": img_rel, "mask_path": mask_rel, "cls_name": cls_name, "specie_name": kind,
                        "anomaly": int(anomalous)})
        image_paths.append(img_rel)
        mask_paths.append(mask_rel)
    (root / "meta.json").write_text(json.dumps({"train": {cls_name: []}, "test": {cls_name: entries}}))
    return {"image_paths": image_paths, "mask_paths": mask_paths}
