"""The numbers that define a CLIP ViT, read from a state dict or from a named configuration.

Every method in this package builds its CLIP from a :class:`ClipArchitecture`, so shapes are
never hard-coded in a model folder (the official AA-CLIP code, for one, hard-codes ViT-L/14
widths; here they follow the weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import torch

# Small architectures for tests, demos and CPU smoke runs. open_clip's registry holds the real
# ones (ViT-B-16, ViT-L-14-336, ...); these are looked up first.
EXTRA_ARCHITECTURES: dict[str, dict] = {
    # Four vision blocks at width 64: builds in milliseconds; used by the test-suite and the demo
    # configs. The text tower keeps CLIP's 12 blocks (cheap at this width) so that every
    # method's official prompt depth fits.
    "zsad-tiny": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 224, "layers": 4, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 12},
    },
    # The parity sets' narrow CLIP: ViT-L/14@336 depth, patch and grid at width 64.
    "zsad-narrow-L14-336": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 336, "layers": 24, "width": 64, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 12},
    },
}


@dataclass(frozen=True)
class ClipArchitecture:
    """Shape of a CLIP ViT. ``activation`` is ``"quick_gelu"`` (OpenAI weights) or ``"gelu"``."""

    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp_width: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp_width: int
    context_length: int = 77
    vocab_size: int = 49408
    activation: str = "quick_gelu"

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def with_activation(self, activation: str) -> ClipArchitecture:
        if activation not in {"quick_gelu", "gelu"}:
            msg = f"activation must be 'quick_gelu' or 'gelu', got {activation!r}"
            raise ValueError(msg)
        return replace(self, activation=activation)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config: Mapping, head_width: int = 64) -> ClipArchitecture:
        """From an open_clip JSON model config (``embed_dim``, ``vision_cfg``, ``text_cfg``)."""
        vision, text = config["vision_cfg"], config["text_cfg"]
        if isinstance(vision.get("layers"), (list, tuple)) or "timm_model_name" in vision:
            msg = "only ViT vision towers are supported (ResNet and timm towers are not)"
            raise ValueError(msg)
        vision_width = vision["width"]
        text_width = text["width"]
        mlp_ratio = vision.get("mlp_ratio", 4.0)
        return cls(
            embed_dim=config["embed_dim"],
            image_size=vision["image_size"] if isinstance(vision["image_size"], int) else vision["image_size"][0],
            patch_size=vision["patch_size"],
            vision_width=vision_width,
            vision_layers=vision["layers"],
            vision_heads=max(1, vision_width // vision.get("head_width", head_width)),
            vision_mlp_width=int(vision_width * mlp_ratio),
            text_width=text_width,
            text_layers=text["layers"],
            text_heads=text.get("heads", max(1, text_width // head_width)),
            text_mlp_width=int(text_width * text.get("mlp_ratio", 4.0)),
            context_length=text.get("context_length", 77),
            vocab_size=text.get("vocab_size", 49408),
            activation="quick_gelu" if config.get("quick_gelu", False) else "gelu",
        )

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        head_width: int = 64,
        activation: str = "quick_gelu",
    ) -> ClipArchitecture:
        """Infer the shape from OpenAI-format keys, as OpenAI's and open_clip's loaders do.

        Heads are ``width // head_width`` in both towers (the rule of every official method).
        """
        required = ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight",
                    "positional_embedding", "ln_final.weight", "text_projection")
        missing = [k for k in required if k not in state_dict]
        if missing:
            msg = (f"not a CLIP ViT state dict in OpenAI/open_clip format: missing {missing}. "
                   "Expected keys such as 'visual.conv1.weight' and 'token_embedding.weight'.")
            raise ValueError(msg)

        def count(prefix: str) -> int:
            return len({k.split(".")[prefix.count(".")] for k in state_dict
                        if k.startswith(prefix) and k.endswith(".attn.in_proj_weight")})

        conv = state_dict["visual.conv1.weight"]
        vision_width, patch = conv.shape[0], conv.shape[-1]
        grid = round(math.sqrt(state_dict["visual.positional_embedding"].shape[0] - 1))
        text_width = state_dict["ln_final.weight"].shape[0]
        return cls(
            embed_dim=state_dict["text_projection"].shape[1],
            image_size=grid * patch,
            patch_size=patch,
            vision_width=vision_width,
            vision_layers=count("visual.transformer.resblocks."),
            vision_heads=max(1, vision_width // head_width),
            vision_mlp_width=state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            text_width=text_width,
            text_layers=count("transformer.resblocks."),
            text_heads=max(1, text_width // head_width),
            text_mlp_width=state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            context_length=state_dict["positional_embedding"].shape[0],
            vocab_size=state_dict["token_embedding.weight"].shape[0],
            activation=activation,
        )


def named_architecture(name: str, head_width: int = 64) -> ClipArchitecture:
    """An architecture by name: this package's extras first, then open_clip's registry."""
    if name in EXTRA_ARCHITECTURES:
        return ClipArchitecture.from_config(EXTRA_ARCHITECTURES[name], head_width)
    import open_clip  # noqa: PLC0415  (slow import, only when a real name is asked for)

    config = open_clip.get_model_config(name)
    if config is None:
        known = sorted(EXTRA_ARCHITECTURES) + [n for n in open_clip.list_models() if n.startswith("ViT")]
        msg = f"unknown CLIP architecture {name!r}. Known ViT names: {', '.join(known)}"
        raise ValueError(msg)
    arch = ClipArchitecture.from_config(config, head_width)
    if name.endswith("-quickgelu"):
        arch = arch.with_activation("quick_gelu")
    return arch
