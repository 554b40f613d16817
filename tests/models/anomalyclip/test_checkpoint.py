"""Import of official AnomalyCLIP prompt weights: good, wrong and damaged files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_zsad.models.anomalyclip import AnomalyCLIPModel
from anomalib_zsad.models.anomalyclip.checkpoint import load_official_checkpoint


def official_file(model: AnomalyCLIPModel, path: Path) -> Path:
    """Write ``model``'s prompts in the official format, with the buffers the official file has."""
    state = dict(model.prompt_learner.state_dict())
    state["token_prefix_pos"] = torch.zeros(1, 1, 1, 64)  # present in released files, not learnt
    state["compound_prompt_projections.0.weight"] = torch.zeros(896, 64)
    torch.save({"prompt_learner": state}, path)
    return path


def test_official_prompts_load_and_change_outputs(tiny_clip, tmp_path: Path) -> None:
    source = AnomalyCLIPModel(tiny_clip, seed=1).eval()
    target = AnomalyCLIPModel(tiny_clip, seed=2).eval()
    images = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(source(images).pred_score, target(images).pred_score)
    load_official_checkpoint(target, official_file(source, tmp_path / "epoch_15.pth"))
    torch.testing.assert_close(target(images).pred_score, source(images).pred_score)
    torch.testing.assert_close(target(images).anomaly_map, source(images).anomaly_map)


def test_wrong_format_is_named(tiny_clip, tmp_path: Path) -> None:
    model = AnomalyCLIPModel(tiny_clip)
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="expected a dict with key 'prompt_learner'"):
        load_official_checkpoint(model, path)


def test_truncated_file_is_named(tiny_clip, tmp_path: Path) -> None:
    model = AnomalyCLIPModel(tiny_clip)
    good = official_file(model, tmp_path / "good.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="could not read AnomalyCLIP checkpoint .*broken.pth"):
        load_official_checkpoint(model, broken)


def test_shape_mismatch_lists_the_tensors(tiny_clip, tmp_path: Path) -> None:
    path = official_file(AnomalyCLIPModel(tiny_clip, n_ctx=8), tmp_path / "n_ctx8.pth")
    with pytest.raises(ValueError, match=r"ctx_pos: file \(1, 1, 8, 64\) vs model \(1, 1, 12, 64\)"):
        load_official_checkpoint(AnomalyCLIPModel(tiny_clip), path)


def test_untrusted_code_is_not_run(tiny_clip, tmp_path: Path) -> None:
    """weights_only=True: a pickle that would call a function is refused, not executed."""
    path = tmp_path / "evil.pth"
    torch.save({"prompt_learner": {"ctx_pos": Path("x")}}, path)
    with pytest.raises(ValueError, match="could not read"):
        load_official_checkpoint(AnomalyCLIPModel(tiny_clip), path)
