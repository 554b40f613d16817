"""AnomalyCLIP through anomalib's Engine on the generated demo set, with a tiny random CLIP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib import LearningType
from anomalib.data import MVTecAD

from anomalib_zsad.data import CrossDataset
from anomalib_zsad.models import AnomalyCLIP


def tiny_model(**kwargs) -> AnomalyCLIP:
    return AnomalyCLIP(backbone="zsad-tiny", pretrained=None, image_size=64, **kwargs)


def cross_data(root: Path) -> CrossDataset:
    """Prompts learnt on brick and grass; tested zero-shot on coffee."""
    return CrossDataset(train=MVTecAD(root=root), test=MVTecAD(root=root, category="coffee"),
                        train_categories=["brick", "grass"],
                        train_batch_size=4, eval_batch_size=4, num_workers=0)


def test_labels_only_training_warns_and_trains_image_loss(caplog: pytest.LogCaptureFixture) -> None:
    """Auxiliary data without masks: only the image cross-entropy, and a warning that says so."""
    from anomalib.data import ImageBatch

    model = tiny_model()
    batch = ImageBatch(image=torch.rand(2, 3, 64, 64), gt_label=torch.tensor([0, 1]))
    with caplog.at_level("WARNING"):
        loss = model.training_step(batch, 0)
    loss.backward()
    assert "no masks" in caplog.text
    assert model.model.prompt_learner.ctx_neg.grad is not None


def test_official_prompts_make_it_zero_shot(tmp_path: Path) -> None:
    source = tiny_model()
    torch.save({"prompt_learner": source.model.prompt_learner.state_dict()}, tmp_path / "epoch_15.pth")
    model = tiny_model(official_checkpoint=tmp_path / "epoch_15.pth")
    assert model.learning_type == LearningType.ZERO_SHOT  # Engine validates it for thresholds, never trains it
