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
    import open_clip  # noqa: PLC0415

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
    import open_clip  # noqa: PLC0415

    from anomalib_zsad.clip.architecture import named_architecture  # noqa: PLC0415
    from anomalib_zsad.clip.loading import loadable_architecture_names  # noqa: PLC0415

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
