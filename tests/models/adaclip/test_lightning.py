"""AdaCLIP through anomalib's Engine on the generated demo set, with the tiny random CLIP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_reloads_identically
from anomalib import LearningType
from anomalib.data import ImageBatch, MVTecAD
from anomalib.engine import Engine
from anomalib.models.components import AnomalibModule

from anomalib_zsad.data import CrossDataset
from anomalib_zsad.models.adaclip import AdaCLIP
from anomalib_zsad.models.adaclip.checkpoint import official_state_dict

PAPER_METRICS = ("image_AUROC", "image_AUPR", "image_F1Max", "pixel_AUROC", "pixel_AUPRO", "pixel_F1Max")


def tiny_model(**kwargs) -> AdaCLIP:
    return AdaCLIP(backbone="zsad-tiny", pretrained=None, image_size=64, **kwargs)


def test_is_a_direct_anomalib_module() -> None:
    """anomalib's get_model/list_models only see direct subclasses."""
    assert AnomalibModule in AdaCLIP.__bases__


@pytest.mark.slow
def test_fit_test_predict_and_reload(demo_root: Path, tmp_path: Path) -> None:
    model = tiny_model()
    start = model.model.visual_prompter.static_prompts[1].detach().clone()
    assert model.learning_type == LearningType.ONE_CLASS  # so that Engine.fit trains it
    seen: list[list[str] | None] = []
    compute = model.model.compute

    def spy(images, class_names=None, *args, **kwargs):
        seen.append(class_names)
        return compute(images, class_names, *args, **kwargs)

    model.model.compute = spy

    engine = Engine(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, logger=False)
    datamodule = CrossDataset(train=MVTecAD(root=demo_root), test=MVTecAD(root=demo_root, category="coffee"),
                              train_categories=["brick", "grass"], train_batch_size=2, eval_batch_size=4,
                              num_workers=0)
    engine.fit(model, datamodule=datamodule)
    assert not torch.equal(model.model.visual_prompter.static_prompts[1], start), "the prompts were not trained"
    assert bool(model.learnt_parts_trained)
    # validation during fit set the thresholds: nothing to redo before test or predict
    assert not torch.isnan(model.post_processor.image_threshold)
    assert model.learning_type == LearningType.ONE_CLASS
    names = {name for batch in seen if batch for name in batch}
    assert {"brick", "grass", "coffee"} <= names, "class names were not read from the image paths"

    results = engine.test(model, datamodule=datamodule)[0]
    for name in PAPER_METRICS:
        assert 0.0 <= results[name] <= 1.0, name

    predictions = engine.predict(model, data_path=demo_root / "coffee" / "test" / "good")
    batch = predictions[0]
    assert batch.anomaly_map.shape[-2:] == (64, 64)
    assert batch.pred_score.shape == (batch.image.shape[0],)

    checkpoint = Path(engine.trainer.checkpoint_callback.best_model_path)
    del model.model.compute
    reloaded = assert_reloads_identically(model, checkpoint)
    torch.testing.assert_close(reloaded.post_processor.image_threshold, model.post_processor.image_threshold)


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


def test_example_config_matches_the_constructor() -> None:
    """Every option of configs/model/adaclip.yaml is a constructor argument with that default."""
    import inspect  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    config = yaml.safe_load((Path(__file__).parents[3] / "configs" / "model" / "adaclip.yaml").read_text())
    assert config["model"]["class_path"] == "AdaCLIP"
    defaults = {k: v.default for k, v in inspect.signature(AdaCLIP.__init__).parameters.items()}
    for key, value in config["model"]["init_args"].items():
        default = defaults[key]
        assert (list(default) if isinstance(default, tuple) else default) == value, key
