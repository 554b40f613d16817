"""Import of official Bayes-PFL checkpoints: a good file, a wrong file, a truncated file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_zsad.clip import load_clip
from anomalib_zsad.models.bayes_pfl import BayesPFLModel, load_official_checkpoint, save_official_checkpoint
from anomalib_zsad.models.bayes_pfl.checkpoint import learnable_state_dict


def make_model(init_seed: int = 0, **kwargs) -> BayesPFLModel:
    clip = load_clip("zsad-tiny", pretrained=None, activation="gelu", seed=0)
    options = {"num_samples": 1, "num_flows": 2, "prompt_num": 2, "inference_stage": 1} | kwargs
    return BayesPFLModel(clip, init_seed=init_seed, **options).eval()


@pytest.fixture(scope="module")
def official_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BayesPFLModel]:
    source = make_model(init_seed=1)
    path = tmp_path_factory.mktemp("bayes_pfl") / "epoch_post_3_2.pth"
    save_official_checkpoint(source, path)
    return path, source


def test_good_file_loads_every_tensor(official_file: tuple[Path, BayesPFLModel]) -> None:
    path, source = official_file
    stored = torch.load(path, weights_only=True)["MyModel"]
    # the official layout names the shared encoders under every alias
    assert torch.equal(stored["PFL_normal.encoder.weight_mean.module.0.weight"],
                       stored["state_encoder.weight_mean.module.0.weight"])
    assert "PFL_context.decoder.weight_mean.module.4.bias" in stored
    target = make_model(init_seed=2)
    assert not torch.equal(target.prompt_context, source.prompt_context)
    load_official_checkpoint(target, path)
    for key, value in learnable_state_dict(source).items():
        assert torch.equal(learnable_state_dict(target)[key], value), key
    assert int(target.inference_stage) == 2  # released checkpoints run the stage-2 classifier


def test_wrong_file_names_file_and_expectation(tmp_path: Path) -> None:
    path = tmp_path / "epoch_15.pth"
    torch.save({"prompt_learner": {"ctx_pos": torch.zeros(1, 1, 12, 64)}}, path)
    with pytest.raises(ValueError, match="epoch_15.pth") as error:
        load_official_checkpoint(make_model(), path)
    assert "prompt_context" in str(error.value)


def test_truncated_file_is_a_clear_error(official_file: tuple[Path, BayesPFLModel], tmp_path: Path) -> None:
    data = official_file[0].read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.pth.*complete"):
        load_official_checkpoint(make_model(), path)


def test_shape_mismatch_names_the_hyper_parameters(official_file: tuple[Path, BayesPFLModel]) -> None:
    with pytest.raises(ValueError, match="prompt_num"):
        load_official_checkpoint(make_model(prompt_num=3), official_file[0])


def test_inconsistent_aliases_are_rejected(official_file: tuple[Path, BayesPFLModel], tmp_path: Path) -> None:
    stored = torch.load(official_file[0], weights_only=True)
    key = "PFL_abnormal.encoder.weight_mean.module.0.bias"
    stored["MyModel"][key] = stored["MyModel"][key] + 1  # a new tensor: aliases share storage in the file
    path = tmp_path / "edited.pth"
    torch.save(stored, path)
    with pytest.raises(ValueError, match="shared module"):
        load_official_checkpoint(make_model(), path)


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_official_checkpoint(make_model(), "/nonexistent/bayes_pfl.pth")
