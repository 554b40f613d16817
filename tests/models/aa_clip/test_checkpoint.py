"""Import of official AA-CLIP checkpoints: good files, folders, wrong and truncated files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_zsad.clip import ClipModel, load_clip
from anomalib_zsad.models.aa_clip import AACLIPModel, load_official_checkpoint
from conftest import require_parity_set


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    return load_clip("zsad-tiny", pretrained=None, seed=0)


def save_official(model: AACLIPModel, folder: Path, epoch: int = 20) -> tuple[Path, Path]:
    """Write the two files the official train.py saves, in its format."""
    text_opt = torch.optim.Adam(model.text_adapter.parameters(), lr=1e-5, betas=(0.5, 0.999))
    image_opt = torch.optim.Adam(model.image_adapter.parameters(), lr=5e-4, betas=(0.5, 0.999))
    text = folder / "text_adapter.pth"
    image = folder / f"image_adapter_{epoch}.pth"
    torch.save({"epoch": 5, "text_adapter": model.text_adapter.state_dict(),
                "text_optimizer": text_opt.state_dict()}, text)
    torch.save({"epoch": epoch, "image_adapter": model.image_adapter.state_dict(),
                "image_optimizer": image_opt.state_dict()}, image)
    return text, image


def test_good_files_and_folder(clip: ClipModel, tmp_path: Path) -> None:
    source = AACLIPModel(clip, seed=1)
    text, image = save_official(source, tmp_path)
    older = AACLIPModel(clip, seed=2).image_adapter.state_dict()
    torch.save({"epoch": 3, "image_adapter": older}, tmp_path / "image_adapter_3.pth")  # an older epoch
    target = AACLIPModel(clip, seed=3)
    before = target.text_features_cached().clone()
    assert load_official_checkpoint(target, text, image) == {"text_adapter": 5, "image_adapter": 20}
    for ours, theirs in zip(target.state_dict().values(), source.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs)
    assert not torch.equal(target.text_features_cached(), before)  # anchors recomputed
    fresh = AACLIPModel(clip, seed=4)
    assert load_official_checkpoint(fresh, tmp_path) == {"text_adapter": 5, "image_adapter": 20}  # latest epoch
    assert torch.equal(fresh.image_adapter.det_proj.fc.weight, source.image_adapter.det_proj.fc.weight)


def test_wrong_file(clip: ClipModel, tmp_path: Path) -> None:
    model = AACLIPModel(clip)
    other = tmp_path / "epoch_15.pth"
    torch.save({"prompt_learner": {"ctx": torch.zeros(2, 3)}}, other)
    with pytest.raises(ValueError, match=r"epoch_15\.pth is not an official AA-CLIP checkpoint"):
        load_official_checkpoint(model, other)
    # Right format, wrong model: saved with relu=True projections and another level count.
    mismatched = AACLIPModel(clip, relu=True, levels=[2, 4])
    text, image = save_official(mismatched, tmp_path)
    before = model.image_adapter.det_proj.fc.weight.clone()
    with pytest.raises(ValueError, match=r"image_adapter_20\.pth: 'image_adapter' does not fit"):
        load_official_checkpoint(model, text, image)
    assert torch.equal(model.image_adapter.det_proj.fc.weight, before)  # nothing half-loaded
    with pytest.raises(ValueError, match="holds no official AA-CLIP checkpoint"):
        load_official_checkpoint(model, _empty(tmp_path))
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(model, tmp_path / "missing.pth")


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_truncated_file(clip: ClipModel, tmp_path: Path) -> None:
    model = AACLIPModel(clip)
    text, _ = save_official(model, tmp_path)
    data = text.read_bytes()
    text.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"could not read AA-CLIP checkpoint .*text_adapter\.pth"):
        load_official_checkpoint(model, text)


def test_parity_aa_clip_official_files_load() -> None:
    """The official files of the parity set load into a model of the right widths."""
    folder = require_parity_set("aa_clip", "clip_state_dict.pt", "text_adapter.pth", "image_adapter_1.pth")
    clip = load_clip("ViT-L-14-336", folder / "clip_state_dict.pt", head_width=32, activation="gelu")
    model = AACLIPModel(clip)
    assert load_official_checkpoint(model, folder) == {"text_adapter": 1, "image_adapter": 1}
    official = torch.load(folder / "image_adapter_1.pth", weights_only=True)["image_adapter"]
    assert torch.equal(model.image_adapter.seg_proj[0].fc.weight, official["seg_proj.0.fc.weight"])
