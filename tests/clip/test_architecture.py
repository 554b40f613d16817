"""Architectures by name and from open_clip configs: what is built, and what is refused and why."""

from __future__ import annotations

import pytest

from anomalib_zsad.clip import named_architecture
from anomalib_zsad.clip.architecture import ClipArchitecture


def open_clip_config(name: str) -> dict:
    import open_clip

    return open_clip.get_model_config(name)


def test_unknown_name_lists_exactly_the_names_this_layer_builds() -> None:
    import open_clip

    from anomalib_zsad.clip.loading import loadable_architecture_names

    with pytest.raises(ValueError, match="unknown CLIP architecture 'ViT-Q-99'") as error:
        named_architecture("ViT-Q-99")
    listed = str(error.value).split("Known ViT names: ")[1].split(", ")
    assert listed == loadable_architecture_names()
    assert {"zsad-tiny", "ViT-B-16", "ViT-L-14-336", "ViT-H-14"} <= set(listed)
    offered_elsewhere = {n for n in open_clip.list_models() if any(s in n for s in ("SigLIP", "CLIPA", "worldwide"))}
    assert offered_elsewhere  # open_clip has such ViT names ...
    assert not offered_elsewhere & set(listed)  # ... and none is offered here


@pytest.mark.parametrize(("name", "options"), [
    ("ViT-B-16-SigLIP", ["vision_cfg.timm_model_name", "init_logit_bias"]),       # timm tower, sigmoid loss
    ("ViT-L-14-CLIPA", ["vision_cfg.no_ln_pre", "vision_cfg.pool_type='avg'"]),   # CLIPA pooling, no ln_pre
    ("ViT-H-14-worldwide", ["text_cfg.hf_tokenizer_name", "text_cfg.pool_type='eos'"]),  # MetaCLIP-2
    ("ViT-M-16-alt", ["vision_cfg.ls_init_value"]),                               # layer scale
    ("ViTamin-S", ["vision_cfg.timm_model_name"]),
])
def test_configs_this_layer_would_build_wrong_are_refused(name: str, options: list[str]) -> None:
    config = open_clip_config(name)
    with pytest.raises(ValueError, match="this CLIP layer cannot build this open_clip config") as error:
        ClipArchitecture.from_config(config)
    for option in options:
        assert option in str(error.value)
    with pytest.raises(ValueError, match=f"CLIP architecture '{name}': .*cannot build") as by_name:
        named_architecture(name)
    assert "Known ViT names: zsad-narrow-L14-336, zsad-tiny, zsad-tiny-text4, ViT-B-16" in str(by_name.value)


def test_a_plain_vit_config_builds_with_its_own_heads() -> None:
    config = open_clip_config("ViT-bigG-14")
    arch = ClipArchitecture.from_config(config)
    assert (arch.vision_heads, arch.text_heads) == (1664 // 104, 20)
    assert arch.vision_mlp_width == 8192 and arch.activation == "gelu"
    assert ClipArchitecture.from_config(config, head_width=32).vision_heads == 16  # the config's head_width wins
    plain = ClipArchitecture.from_config(open_clip_config("ViT-B-16"))
    assert (plain.vision_heads, plain.text_heads, plain.grid_size) == (12, 8, 14)
    assert named_architecture("ViT-L-14-336-quickgelu").activation == "quick_gelu"
    # this package's small architectures: head_width sets the vision heads (no head_width in their config)
    assert named_architecture("zsad-tiny", head_width=32).vision_heads == 2
    assert named_architecture("zsad-tiny").vision_heads == 1


def test_broken_head_width_is_refused() -> None:
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 100, "head_width": 64,
                                              "patch_size": 16},
              "text_cfg": {"width": 64, "heads": 1, "layers": 2}}
    with pytest.raises(ValueError, match="vision width 100 is not a multiple of the head width 64"):
        ClipArchitecture.from_config(config)
