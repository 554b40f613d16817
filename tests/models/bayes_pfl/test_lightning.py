"""Bayes-PFL through anomalib's Engine on the generated demo set, with a tiny random CLIP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib import LearningType
from anomalib.data import ImageBatch, MVTecAD
from anomalib.engine import Engine

from anomalib_zsad.data import CrossDataset
from anomalib_zsad.models.bayes_pfl import BayesPFL, save_official_checkpoint
from anomalib_zsad.models.components.lightning import PAPER_METRICS
from conftest import assert_reloads_identically

SMALL = {"num_samples": 2, "num_flows": 2, "prompt_num": 2, "topk": 20}


def tiny_model(**kwargs) -> BayesPFL:
    return BayesPFL(backbone="zsad-tiny", pretrained=None, image_size=64, **(SMALL | kwargs))


def test_class_names_from_paths_or_fixed() -> None:
    batch = ImageBatch(image=torch.rand(2, 3, 64, 64), image_path=["/r/bottle/test/good/0.png", "/r/x.png"])
    assert tiny_model().class_names(batch) == ["bottle", "object"]
    assert tiny_model(class_name="pill").class_names(batch) is None  # the model's fixed prompt


@pytest.mark.slow
def test_fit_test_predict_and_reload(demo_root: Path, tmp_path: Path) -> None:
    model = tiny_model(stage1_epochs=1)
    start = model.model.prompt_context.detach().clone()
    mapping = model.model.image_mapping.weight.detach().clone()
    assert model.learning_type == LearningType.ONE_CLASS  # so that Engine.fit trains it

    datamodule = CrossDataset(train=MVTecAD(root=demo_root), test=MVTecAD(root=demo_root, category="coffee"),
                              train_categories=["brick", "grass"], train_batch_size=4, eval_batch_size=4,
                              num_workers=0)
    engine = Engine(max_epochs=2, accelerator="cpu", default_root_dir=tmp_path, logger=False)
    engine.fit(model, datamodule=datamodule)
    assert not torch.equal(model.model.prompt_context, start), "stage 1 did not train the prompts"
    assert not torch.equal(model.model.image_mapping.weight, mapping), "stage 2 did not train the classifier"
    assert bool(model.learnt_parts_trained)
    # trained and validated (thresholds known): test/predict run it as it is
    assert model.learning_type == LearningType.ONE_CLASS
    assert int(model.model.inference_stage) == 2

    results = engine.test(model, datamodule=datamodule)[0]
    for name in PAPER_METRICS:
        assert 0.0 <= results[name] <= 1.0, name

    predictions = engine.predict(model, data_path=demo_root / "coffee" / "test" / "good")
    batch = predictions[0]
    assert batch.anomaly_map.shape[-2:] == (64, 64)
    assert batch.pred_score.shape == (batch.image.shape[0],)

    checkpoint = Path(engine.trainer.checkpoint_callback.best_model_path)
    reloaded = assert_reloads_identically(model, checkpoint)
    assert int(reloaded.model.inference_stage) == 2


def test_stage1_only_training_falls_back_to_the_stage1_classifier(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model(stage1_epochs=5)
    with caplog.at_level("WARNING"):
        model.on_train_end()
    assert int(model.model.inference_stage) == 1
    assert "stage 2" in caplog.text


def test_official_checkpoint_makes_it_zero_shot(tmp_path: Path) -> None:
    source = tiny_model(seed=3)
    save_official_checkpoint(source.model, tmp_path / "bayes_pfl.pth")
    model = tiny_model(official_checkpoint=tmp_path / "bayes_pfl.pth")
    assert model.learning_type == LearningType.ZERO_SHOT
    assert torch.equal(model.model.prompt_context, source.model.prompt_context)
    assert int(model.model.inference_stage) == 2
