"""Where weights come from: files in each format, the cache, and the offline error."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from anomalib_zsad.clip import ClipModel, ClipWeightsUnavailableError, load_clip
from anomalib_zsad.clip.model import _TEXT_KEYS


def openai_state_dict(clip: ClipModel) -> dict[str, torch.Tensor]:
    """This model's weights under OpenAI's key names, in fp16 as OpenAI ships them."""
    state = {k.removeprefix("text."): v.half() for k, v in clip.state_dict().items()}
    assert all(k.startswith(("visual.", "logit_scale", *_TEXT_KEYS)) for k in state)
    state["input_resolution"] = torch.tensor(224)
    return state


def same_outputs(a: ClipModel, b: ClipModel) -> None:
    images = torch.randn(1, 3, 64, 64)
    ids = torch.tensor([[49406, 320, 1125, 49407] + [0] * 73])
    with torch.no_grad():
        torch.testing.assert_close(a.encode_image(images), b.encode_image(images), atol=1e-6, rtol=0)
        torch.testing.assert_close(a.encode_text(ids), b.encode_text(ids), atol=1e-6, rtol=0)


def fp16_copy(clip: ClipModel) -> ClipModel:
    copy = load_clip("zsad-tiny", None)
    copy.load_state_dict({k: v.half().float() for k, v in clip.state_dict().items()})
    copy.set_activation("quick_gelu")
    return copy


def test_openai_state_dict_file(tiny_clip: ClipModel, tmp_path: Path) -> None:
    path = tmp_path / "clip.pt"
    torch.save(openai_state_dict(tiny_clip), path)
    loaded = load_clip("anything", path)
    assert loaded.arch.activation == "quick_gelu"  # OpenAI format: QuickGELU, like open_clip
    assert loaded.arch.vision_layers == 4 and loaded.arch.grid_size == 14
    assert loaded.visual.conv1.weight.dtype == torch.float32
    same_outputs(loaded, fp16_copy(tiny_clip))


class _Holder(nn.Module):
    """Gives a traced module OpenAI's key names, like OpenAI's TorchScript archives."""

    def __init__(self, clip: ClipModel) -> None:
        super().__init__()
        self.visual = clip.visual
        for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
            setattr(self, name, getattr(clip.text, name))
        self.logit_scale = clip.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.logit_scale


def test_openai_torchscript_archive(tiny_clip: ClipModel, tmp_path: Path) -> None:
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.trace(_Holder(copy.deepcopy(tiny_clip)).half(), torch.zeros(1, dtype=torch.half)).save(str(path))
    loaded = load_clip("anything", path)
    assert loaded.arch.activation == "quick_gelu"
    same_outputs(loaded, fp16_copy(tiny_clip))


def test_cached_release_is_used_without_network(tiny_clip: ClipModel, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip

    monkeypatch.setattr(open_clip.pretrained, "get_pretrained_cfg",
                        lambda name, tag: {"url": "https://example.invalid/x/tiny-release.pt", "quick_gelu": True})
    monkeypatch.setenv("ZSAD_OFFLINE", "1")
    torch.save(openai_state_dict(tiny_clip), tmp_path / "tiny-release.pt")
    loaded = load_clip("ViT-B-16", "openai", cache_dir=tmp_path)
    same_outputs(loaded, fp16_copy(tiny_clip))


def test_offline_error_names_the_file_and_the_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZSAD_OFFLINE", "1")
    with pytest.raises(ClipWeightsUnavailableError) as error:
        load_clip("ViT-L-14-336", "openai", cache_dir=tmp_path)
    message = str(error.value)
    assert "ViT-L-14-336px.pt" in message
    assert str(tmp_path / "ViT-L-14-336px.pt") in message
    assert "pretrained=" in message and "--model.pretrained" in message
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_bad_files_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="CLIP checkpoint not found"):
        load_clip("ViT-B-16", tmp_path / "absent.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read CLIP checkpoint"):
        load_clip("ViT-B-16", broken)
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="not a CLIP ViT state dict"):
        load_clip("ViT-B-16", other)
    with pytest.raises(ValueError, match="unknown CLIP architecture"):
        load_clip("ViT-Nonexistent", None)


def test_random_weights_repeat_with_the_seed() -> None:
    a, b, c = load_clip("zsad-tiny", None, seed=1), load_clip("zsad-tiny", None, seed=1), load_clip("zsad-tiny", None)
    assert torch.equal(a.visual.proj, b.visual.proj)
    assert not torch.equal(a.visual.proj, c.visual.proj)


def test_errors_list_only_names_this_layer_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SigLIP, ViTamin (timm towers), CLIPA and MetaCLIP-2 (other pooling, Hugging Face tokenizers) are
    open_clip ViTs that this CLIP layer does not build: no error may offer them, and asking for one
    stops before any download with the reason, not with a "supply this file" message."""
    import open_clip

    from anomalib_zsad.clip.architecture import named_architecture
    from anomalib_zsad.clip.loading import loadable_architecture_names

    monkeypatch.setenv("ZSAD_OFFLINE", "1")
    with pytest.raises(ValueError, match="unknown CLIP architecture") as unknown:
        load_clip("ViT-Nonexistent", None)
    listed = str(unknown.value).split("Known ViT names: ")[1].split(", ")
    assert listed == loadable_architecture_names()
    assert {"zsad-tiny", "ViT-B-16", "ViT-L-14-336"} <= set(listed)
    assert not [n for n in listed if any(s in n for s in ("SigLIP", "ViTamin", "CLIPA", "worldwide"))]
    assert {n for n in open_clip.list_models() if "SigLIP" in n}  # there were some to leave out
    for name in listed:  # every offered name builds an architecture (configs only: no weights)
        assert named_architecture(name).vision_layers > 0

    for name, tag in [("ViT-B-16-SigLIP", "webli"), ("ViT-L-14-CLIPA", "datacomp1b"), ("ViT-SO400M-14-SigLIP", None)]:
        with pytest.raises(ValueError, match="not one this CLIP layer loads") as refused:
            load_clip(name, tag, cache_dir=tmp_path)
        assert "ViT-L-14-336" in str(refused.value) and "SigLIP, " not in str(refused.value).split("names: ")[1]
    assert list(tmp_path.iterdir()) == []
    tiny = load_clip("ViT-S-32", None)  # a listed open_clip name really loads
    assert tiny.arch.vision_width == 384


def open_clip_meta_model(name: str):
    """open_clip's own CLIP for ``name``, built on the meta device (shapes only, no memory, no weights)."""
    import open_clip

    with torch.device("meta"):
        return open_clip.model.CLIP(**open_clip.get_model_config(name))


@pytest.mark.parametrize("name", ["ViT-H-14", "ViT-H-16", "ViT-g-14", "ViT-bigG-14", "ViT-e-14", "ViT-L-14-336"])
def test_weights_of_a_named_architecture_get_its_heads(name: str) -> None:
    """Weights loaded by tag (or a file for a named architecture) run with the heads open_clip builds
    for that name: ViT-H-14's vision heads are 80 channels wide (16 heads, not 20), ViT-g-14's 88,
    ViT-bigG-14's 104, ViT-e-14's 112. Checked on open_clip's own module, built without weights."""
    from anomalib_zsad.clip.loading import architecture_of_weights

    reference = open_clip_meta_model(name)
    expected = (reference.visual.transformer.resblocks[0].attn.num_heads, reference.transformer.resblocks[0].attn.num_heads)
    arch = architecture_of_weights(reference.state_dict(), name, activation="gelu")
    assert (arch.vision_heads, arch.text_heads) == expected
    assert arch.vision_mlp_width == reference.visual.transformer.resblocks[0].mlp.c_fc.out_features
    with torch.device("meta"):  # our module built from it has the same heads in every block
        ours = ClipModel(arch)
    assert {block.attn.heads for block in ours.visual.blocks} == {expected[0]}
    assert {block.attn.heads for block in ours.text.blocks} == {expected[1]}
    from anomalib_zsad.clip import named_architecture

    assert named_architecture(name).vision_heads == expected[0]  # random weights of the name: the same


def test_a_head_width_that_contradicts_the_named_architecture_is_refused() -> None:
    from anomalib_zsad.clip.loading import architecture_of_weights

    state = open_clip_meta_model("ViT-H-14").state_dict()
    with pytest.raises(ValueError, match="head_width=64 gives 20 vision heads, but 'ViT-H-14' has 16 of 80 channels"):
        architecture_of_weights(state, "ViT-H-14", head_width=64)
    given = architecture_of_weights(state, "ViT-H-14", head_width=80)  # agrees: the config's heads, both towers
    assert (given.vision_heads, given.text_heads) == (16, 16)
    with pytest.raises(ValueError, match="Leave head_width unset"):
        load_clip("ViT-H-14", None, head_width=64)
    # weights of no named shape (the parity sets' narrow CLIP under a ViT-L name): head_width decides
    narrow = dict(open_clip_meta_model("ViT-B-32").state_dict())
    assert architecture_of_weights(narrow, "ViT-L-14-336", head_width=32).vision_heads == 768 // 32


def test_release_loaded_by_tag_matches_open_clip_with_its_head_width(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end through the tag path: a registered open_clip config with 32-channel heads, its
    "release" in the cache. The loaded CLIP has the config's heads and computes what open_clip's own
    model computes with the same weights (with 64-channel heads it would not)."""
    import open_clip

    name = "ViT-zsad-test-hw32"
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 32,
                                              "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, name, config)
    monkeypatch.setattr(open_clip.pretrained, "get_pretrained_cfg",
                        lambda model, tag: {"url": "https://example.invalid/hw32-release.bin"})
    monkeypatch.setenv("ZSAD_OFFLINE", "1")
    torch.manual_seed(0)
    reference = open_clip.model.CLIP(**config).eval()
    with torch.no_grad():  # non-trivial biases and norms, so that a wrong head split shows
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    torch.save(reference.state_dict(), tmp_path / "hw32-release.bin")

    loaded = load_clip(name, "some-tag", cache_dir=tmp_path)
    assert (loaded.arch.vision_heads, loaded.arch.text_heads) == (4, 2)
    assert loaded.arch.activation == "gelu"  # not an OpenAI release: GELU, as open_clip builds this config
    images = torch.randn(2, 3, 64, 64)
    ids = torch.tensor([[49406, 320, 1125, 49407] + [0] * 73])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), reference.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.encode_text(ids), reference.encode_text(ids), atol=1e-5, rtol=1e-5)
        wrong = load_clip("anything", tmp_path / "hw32-release.bin", activation="gelu")  # no name: 64-wide heads
        assert wrong.arch.vision_heads == 2
        assert not torch.allclose(wrong.encode_image(images), reference.encode_image(images), atol=1e-3)


def test_hub_release_downloaded_into_the_clip_cache_is_found_offline(tiny_clip: ClipModel, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """open_clip downloads a tag's Hugging Face hub file into the cache directory it is given
    ($ZSAD_CLIP_CACHE), in the hub's layout; the next run, offline, must find it there."""
    import open_clip

    monkeypatch.setattr(open_clip.pretrained, "get_pretrained_cfg",
                        lambda name, tag: {"hf_hub": "someone/tiny-clip-release/", "quick_gelu": True})
    monkeypatch.setenv("ZSAD_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # nothing in the user's own hub cache
    repo = tmp_path / "models--someone--tiny-clip-release"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    torch.save(openai_state_dict(tiny_clip), repo / "snapshots" / "0123abcd" / "open_clip_pytorch_model.bin")
    loaded = load_clip("ViT-B-16", "some-hub-tag", cache_dir=tmp_path)
    same_outputs(loaded, fp16_copy(tiny_clip))
    with pytest.raises(ClipWeightsUnavailableError, match="someone/tiny-clip-release"):
        load_clip("ViT-B-16", "some-hub-tag", cache_dir=tmp_path / "empty")
