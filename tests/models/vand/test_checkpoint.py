"""Import of official ``{"trainable_linearlayer": state_dict}`` files: good, wrong and broken ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_zsad.clip import ClipModel
from anomalib_zsad.models.vand import VandModel, load_official_checkpoint, save_official_checkpoint


@pytest.fixture
def model(tiny_clip: ClipModel) -> VandModel:
    return VandModel(tiny_clip)


def _official_state(layers: int = 4, width: int = 64, embed: int = 32, seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        state[f"fc.{i}.weight"] = torch.randn(embed, width, generator=gen)
        state[f"fc.{i}.bias"] = torch.randn(embed, generator=gen)
    return state


def test_good_file_loads(model: VandModel, tmp_path: Path) -> None:
    path = tmp_path / "epoch_15.pth"
    state = _official_state()
    torch.save({"trainable_linearlayer": state}, path)
    load_official_checkpoint(model, path)
    for name, value in model.trainable_linearlayer.state_dict().items():
        assert torch.equal(value, state[name])


def test_round_trip_in_the_official_format(model: VandModel, tmp_path: Path) -> None:
    torch.save({"trainable_linearlayer": _official_state(seed=9)}, tmp_path / "a.pth")
    load_official_checkpoint(model, tmp_path / "a.pth")
    save_official_checkpoint(model, tmp_path / "b.pth")
    saved = torch.load(tmp_path / "b.pth", weights_only=True)
    assert set(saved) == {"trainable_linearlayer"}
    for name, value in saved["trainable_linearlayer"].items():
        assert torch.equal(value, _official_state(seed=9)[name])


def test_wrong_file_names_what_was_expected(model: VandModel, tmp_path: Path) -> None:
    path = tmp_path / "prompt_learner.pth"
    torch.save({"prompt_learner": {"ctx_pos": torch.zeros(1, 1, 12, 64)}}, path)
    with pytest.raises(ValueError, match=r"prompt_learner\.pth.*trainable_linearlayer"):
        load_official_checkpoint(model, path)


def test_wrong_shapes_and_layer_count(model: VandModel, tmp_path: Path) -> None:
    path = tmp_path / "vitb.pth"
    torch.save({"trainable_linearlayer": _official_state(width=768, embed=512)}, path)
    with pytest.raises(ValueError, match=r"vitb\.pth.*wrong shapes.*fc\.0\.weight: \(512, 768\) \(expected \(32, 64\)\)"):
        load_official_checkpoint(model, path)
    path = tmp_path / "three_layers.pth"
    torch.save({"trainable_linearlayer": _official_state(layers=3)}, path)
    with pytest.raises(ValueError, match=r"missing \['fc\.3\.bias', 'fc\.3\.weight'\]"):
        load_official_checkpoint(model, path)


def test_truncated_file(model: VandModel, tmp_path: Path) -> None:
    path = tmp_path / "truncated.pth"
    torch.save({"trainable_linearlayer": _official_state()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"could not read VAND checkpoint .*truncated\.pth"):
        load_official_checkpoint(model, path)


def test_not_a_dict_and_missing_file(model: VandModel, tmp_path: Path) -> None:
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="not an official VAND checkpoint"):
        load_official_checkpoint(model, path)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_official_checkpoint(model, tmp_path / "nowhere.pth")
