"""AdaCLIP through anomalib's Engine on the generated demo set, with the tiny random CLIP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib import LearningType
from anomalib.data import ImageBatch

from anomalib_zsad.models.adaclip import AdaCLIP
from anomalib_zsad.models.adaclip.checkpoint import official_state_dict


def tiny_model(**kwargs) -> AdaCLIP:
    return AdaCLIP(backbone="zsad-tiny", pretrained=None, image_size=64, **kwargs)


def test_training_step_without_masks_trains_the_image_loss(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model()
    batch = ImageBatch(image=torch.rand(1, 3, 64, 64), gt_label=torch.tensor([1]))
    with caplog.at_level("WARNING"):
        loss = model.training_step(batch, 0)
    loss.backward()
    assert "no masks" in caplog.text
    assert model.model.cls_token_layer.head[0].weight.grad is not None


def test_optimizer_is_the_official_adamw() -> None:
    optimizer = tiny_model().configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.01, (0.5, 0.999), 0.01)
    assert sum(p.numel() for p in group["params"]) == sum(
        p.numel() for n, p in tiny_model().model.named_parameters() if not n.startswith("clip."))


def test_official_weights_make_it_zero_shot(tmp_path: Path) -> None:
    torch.save(official_state_dict(tiny_model(seed=3).model), tmp_path / "pretrained_all.pth")
    model = tiny_model(official_checkpoint=tmp_path / "pretrained_all.pth")
    assert model.learning_type == LearningType.ZERO_SHOT  # Engine validates it for thresholds, never trains it


def test_class_names_come_from_the_image_paths() -> None:
    """``class_name="auto"``: each image's category folder names the object, in training and tests."""
    batch = ImageBatch(image=torch.rand(2, 3, 64, 64),
                       image_path=["/d/mvtec/bottle/test/broken/000.png", "/d/visa/candle/Data/Images/Normal/1.JPG"])
    assert tiny_model().inference_class_names(batch) == ["bottle", "candle"]
    assert tiny_model(class_name="pill").inference_class_names(batch) is None  # the model's fixed word
