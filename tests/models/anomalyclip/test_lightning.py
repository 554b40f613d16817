"""AnomalyCLIP through anomalib's Engine on the generated demo set, with a tiny random CLIP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_reloads_identically
from anomalib import LearningType
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_zsad.data import CrossDataset
from anomalib_zsad.models import AnomalyCLIP

PAPER_METRICS = ("image_AUROC", "image_AUPR", "image_F1Max", "pixel_AUROC", "pixel_AUPRO", "pixel_F1Max")


def tiny_model(**kwargs) -> AnomalyCLIP:
    return AnomalyCLIP(backbone="zsad-tiny", pretrained=None, image_size=64, **kwargs)


def cross_data(root: Path) -> CrossDataset:
    """Prompts learnt on brick and grass; tested zero-shot on coffee."""
    return CrossDataset(train=MVTecAD(root=root), test=MVTecAD(root=root, category="coffee"),
                        train_categories=["brick", "grass"],
                        train_batch_size=4, eval_batch_size=4, num_workers=0)


@pytest.mark.slow
def test_fit_test_predict_and_reload(demo_root: Path, tmp_path: Path) -> None:
    model = tiny_model()
    start = model.model.prompt_learner.ctx_neg.detach().clone()
    assert model.learning_type == LearningType.ONE_CLASS  # so that Engine.fit trains it

    engine = Engine(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, logger=False)
    datamodule = cross_data(demo_root)
    engine.fit(model, datamodule=datamodule)
    assert not torch.equal(model.model.prompt_learner.ctx_neg, start), "the prompts were not trained"
    assert bool(model.learnt_parts_trained)
    # validation during fit set the thresholds: nothing to redo before test or predict
    assert not torch.isnan(model.post_processor.image_threshold)
    assert model.learning_type == LearningType.ONE_CLASS

    results = engine.test(model, datamodule=datamodule)[0]
    for name in PAPER_METRICS:
        assert 0.0 <= results[name] <= 1.0, name
    assert list(tmp_path.rglob("images/**/*.png")), "the visualizer wrote no images"

    predictions = engine.predict(model, data_path=demo_root / "coffee" / "test" / "good")
    batch = predictions[0]
    assert batch.anomaly_map.shape[-2:] == (64, 64)
    assert batch.pred_score.shape == (batch.image.shape[0],)

    checkpoint = Path(engine.trainer.checkpoint_callback.best_model_path)
    assert checkpoint.is_file()
    reloaded = assert_reloads_identically(model, checkpoint)
    torch.testing.assert_close(reloaded.post_processor.image_threshold, model.post_processor.image_threshold)


def test_labels_only_training_warns_and_trains_image_loss(caplog: pytest.LogCaptureFixture) -> None:
    """Auxiliary data without masks: only the image cross-entropy, and a warning that says so."""
    from anomalib.data import ImageBatch  # noqa: PLC0415

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
