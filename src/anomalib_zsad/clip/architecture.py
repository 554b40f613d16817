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
    # zsad-tiny with a 4-block text tower: for tests of the methods whose text tower runs on every
    # image (AdaCLIP's and Bayes-PFL's prompts depend on the image), whose exported graphs then hold
    # the text tower; a third of the blocks makes those exports (and tests) about twice as fast.
    "zsad-tiny-text4": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 224, "layers": 4, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 4},
    },
    # The parity sets' narrow CLIP: ViT-L/14@336 depth, patch and grid at width 64.
    "zsad-narrow-L14-336": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 336, "layers": 24, "width": 64, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 12},
    },
}


# open_clip config options that change the network beyond what :class:`ClipArchitecture` holds
# (CLIPA's pooling and missing ln_pre, MetaCLIP-2's Hugging Face tokenizers, layer scale, timm or
# Hugging Face towers, SigLIP's logit bias): this CLIP layer does not implement them, so such
# configs are refused rather than built wrong (or their weights downloaded for nothing).
_UNSUPPORTED_OPTIONS = {
    "vision_cfg": ("timm_model_name", "no_ln_pre", "final_ln_after_pool", "ls_init_value", "attentional_pool",
                   "attn_pooler_queries", "output_tokens", "act_kwargs", "norm_kwargs"),
    "text_cfg": ("hf_model_name", "hf_tokenizer_name", "tokenizer_kwargs", "no_causal_mask", "eos_id",
                 "ls_init_value", "embed_cls", "pad_id", "output_tokens", "act_kwargs", "norm_kwargs",
                 "proj_bias"),
}
_SUPPORTED_POOLING = {"vision_cfg": {"tok"}, "text_cfg": {"argmax"}}


def unsupported_options(config: Mapping) -> list[str]:
    """The options of an open_clip model config that this CLIP layer does not implement (empty: it builds)."""
    found = []
    for tower in ("vision_cfg", "text_cfg"):
        cfg = config.get(tower, {})
        if isinstance(cfg.get("layers"), (list, tuple)):
            found.append(f"{tower}.layers (ResNet tower)")
        found += [f"{tower}.{key}" for key in cfg if cfg[key] not in (None, False)
                  and (key in _UNSUPPORTED_OPTIONS[tower] or key.startswith(("timm_", "hf_")))]
        if cfg.get("pool_type", next(iter(_SUPPORTED_POOLING[tower]))) not in _SUPPORTED_POOLING[tower]:
            found.append(f"{tower}.pool_type={cfg['pool_type']!r}")
        if cfg.get("proj_type", "linear") not in (None, "linear"):
            found.append(f"{tower}.proj_type={cfg['proj_type']!r}")
    extras = ("custom_text", "multimodal_cfg", "init_logit_bias")
    found += [key for key in extras if config.get(key) not in (None, False)]
    return found


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
        """From an open_clip JSON model config (``embed_dim``, ``vision_cfg``, ``text_cfg``).

        The heads are the config's, as open_clip builds them: ``vision_cfg.width //
        vision_cfg.head_width`` and ``text_cfg.heads`` (ViT-H-14: 80-channel vision heads,
        ViT-bigG-14: 104). ``head_width`` is the fallback where the config names neither (this
        package's small architectures; every open_clip CLIP ViT config gives the text heads).

        Raises:
            ValueError: for a config this CLIP layer would build wrong (ResNet, timm or Hugging Face
                towers, CLIPA's pooling, layer scale, SigLIP's logit bias, ...), naming the options.
        """
        if unsupported := unsupported_options(config):
            msg = (f"this CLIP layer cannot build this open_clip config: options {', '.join(unsupported)} are "
                   "not implemented (it builds CLIP ViTs only: SigLIP/ViTamin/ConvNeXt timm towers, CLIPA, "
                   "MetaCLIP-2 tokenizers, layer scale and Hugging Face text towers are not)")
            raise ValueError(msg)
        vision, text = config["vision_cfg"], config["text_cfg"]
        vision_width = vision["width"]
        text_width = text["width"]
        vision_head_width = vision.get("head_width", head_width)
        if vision_width % vision_head_width:
            msg = f"vision width {vision_width} is not a multiple of the head width {vision_head_width}"
            raise ValueError(msg)
        mlp_ratio = vision.get("mlp_ratio", 4.0)
        return cls(
            embed_dim=config["embed_dim"],
            image_size=vision["image_size"] if isinstance(vision["image_size"], int) else vision["image_size"][0],
            patch_size=vision["patch_size"],
            vision_width=vision_width,
            vision_layers=vision["layers"],
            vision_heads=max(1, vision_width // vision_head_width),
            vision_mlp_width=int(vision_width * mlp_ratio),
            text_width=text_width,
            text_layers=text["layers"],
            text_heads=text.get("heads", max(1, text_width // head_width)),
            text_mlp_width=int(text_width * text.get("mlp_ratio", 4.0)),
            context_length=text.get("context_length", 77),
            vocab_size=text.get("vocab_size", 49408),
            activation="quick_gelu" if config.get("quick_gelu", False) else "gelu",
        )

    def same_shape(self, other: ClipArchitecture) -> bool:
        """Whether two architectures have the same weights' shapes (heads and activation aside:
        a state dict does not tell them)."""
        ignored = {"vision_heads", "text_heads", "activation"}
        mine, theirs = self.as_dict(), other.as_dict()
        return all(mine[key] == theirs[key] for key in mine if key not in ignored)

    def with_heads_of(self, other: ClipArchitecture) -> ClipArchitecture:
        """This architecture with ``other``'s head counts (for weights of a named configuration)."""
        return replace(self, vision_heads=other.vision_heads, text_heads=other.text_heads)

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
    """An architecture by name: this package's extras first, then open_clip's registry.

    ``head_width`` sets the heads of this package's small architectures; open_clip's are built
    with the heads of their config, exactly as open_clip builds them.

    Raises:
        ValueError: for an unknown name (the error lists every name this CLIP layer builds) or an
            open_clip configuration it would build wrong (SigLIP, CLIPA, ...; see ``from_config``).
    """
    if name in EXTRA_ARCHITECTURES:
        return ClipArchitecture.from_config(EXTRA_ARCHITECTURES[name], head_width)
    import open_clip

    config = open_clip.get_model_config(name)
    if config is None:
        from .loading import loadable_architecture_names

        msg = f"unknown CLIP architecture {name!r}. Known ViT names: {', '.join(loadable_architecture_names())}"
        raise ValueError(msg)
    try:  # open_clip's own default head width (64) where its config names none, as open_clip builds it
        arch = ClipArchitecture.from_config(config)
    except ValueError as error:
        from .loading import loadable_architecture_names

        msg = f"CLIP architecture {name!r}: {error}. Known ViT names: {', '.join(loadable_architecture_names())}"
        raise ValueError(msg) from None
    if name.endswith("-quickgelu"):
        arch = arch.with_activation("quick_gelu")
    return arch
