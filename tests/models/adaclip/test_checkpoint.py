"""Import of official AdaCLIP weight files: good, wrong and damaged files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_zsad.models.adaclip import AdaCLIPModel, load_official_checkpoint
from anomalib_zsad.models.adaclip.checkpoint import official_state_dict

SIZE = 64


def official_file(model: AdaCLIPModel, path: Path) -> Path:
    """``model``'s learnt tensors as ``AdaCLIP_Trainer.save()`` writes them."""
    torch.save(official_state_dict(model), path)
    return path


def test_official_file_loads_and_changes_outputs(tiny_clip, tmp_path: Path) -> None:
    source = AdaCLIPModel(tiny_clip, seed=1).eval()
    target = AdaCLIPModel(tiny_clip, seed=2).eval()
    path = official_file(source, tmp_path / "pretrained_all.pth")
    assert all(k.startswith("clip_model.") for k in torch.load(path, weights_only=True))
    images = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert not torch.allclose(source(images).anomaly_map, target(images).anomaly_map)
        load_official_checkpoint(target, path)
        torch.testing.assert_close(target(images).pred_score, source(images).pred_score, atol=0, rtol=0)
        torch.testing.assert_close(target(images).anomaly_map, source(images).anomaly_map, atol=0, rtol=0)


def test_missing_file(tiny_clip, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_official_checkpoint(AdaCLIPModel(tiny_clip), tmp_path / "nothing.pth")


def test_truncated_file_is_named(tiny_clip, tmp_path: Path) -> None:
    model = AdaCLIPModel(tiny_clip)
    good = official_file(model, tmp_path / "good.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"could not read AdaCLIP checkpoint .*broken\.pth.*download complete"):
        load_official_checkpoint(model, broken)


@pytest.mark.parametrize("content", [
    {"state_dict": {"a": torch.zeros(1)}},  # a Lightning-like file
    {"prompt_learner": {"ctx_pos": torch.zeros(1)}},  # AnomalyCLIP's format
    torch.zeros(3),
])
def test_wrong_format_is_named(tiny_clip, tmp_path: Path, content) -> None:
    path = tmp_path / "other.pth"
    torch.save(content, path)
    with pytest.raises(ValueError, match=r"other\.pth is not an official AdaCLIP checkpoint"):
        load_official_checkpoint(AdaCLIPModel(tiny_clip), path)


def test_other_configuration_lists_the_tensors(tiny_clip, tmp_path: Path) -> None:
    path = official_file(AdaCLIPModel(tiny_clip, prompt_length=3), tmp_path / "length3.pth")
    model = AdaCLIPModel(tiny_clip)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"length3\.pth does not fit.*text_prompter\.static_prompts\.0: "
                                         r"file \(3, 64\) vs model \(5, 64\)"):
        load_official_checkpoint(model, path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "a failed import changed weights"
    partial = tmp_path / "partial.pth"
    state = official_state_dict(model)
    del state["clip_model.cls_token_layer.head.0.bias"]
    torch.save(state, partial)
    with pytest.raises(ValueError, match=r"missing cls_token_layer\.head\.0\.bias"):
        load_official_checkpoint(model, partial)


def test_untrusted_code_is_not_run(tiny_clip, tmp_path: Path) -> None:
    """weights_only=True: a pickle that would build an arbitrary object is refused, not executed."""
    path = tmp_path / "evil.pth"
    torch.save({"clip_model.x": Path("x")}, path)
    with pytest.raises(ValueError, match="could not read"):
        load_official_checkpoint(AdaCLIPModel(tiny_clip), path)
