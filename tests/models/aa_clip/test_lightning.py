"""AACLIP through anomalib's own flow (Engine fit / test / predict) on the tiny CLIP and a tiny
generated data set: the two stages run in order, each training only its adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib import LearningType
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models import get_model

from anomalib_zsad.data import CrossDataset
from anomalib_zsad.data.demo import make_demo_dataset
from anomalib_zsad.models.aa_clip import AACLIP


def tiny_model(**kwargs) -> AACLIP:
    return AACLIP(backbone="zsad-tiny", pretrained=None, image_size=224, text_epochs=1, image_epochs=1, **kwargs)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("aa_clip_demo") / "demo", seed=0,
                             categories=("brick", "grass"), image_size=64, n_train=2, n_test_good=2,
                             n_test_defect=2)


def datamodule(root: Path) -> CrossDataset:
    return CrossDataset(train=MVTecAD(root=root), test=MVTecAD(root=root, category="grass"),
                        train_categories=["brick"], train_batch_size=2, eval_batch_size=4, num_workers=0, seed=0)


@pytest.mark.slow
def test_fit_test_predict(demo_root: Path, tmp_path: Path) -> None:
    model = tiny_model()
    assert model.learning_type == LearningType.ONE_CLASS  # untrained: anomalib train trains it
    text_before = {k: v.clone() for k, v in model.model.text_adapter.state_dict().items()}
    image_before = {k: v.clone() for k, v in model.model.image_adapter.state_dict().items()}
    stages = []
    original = model.training_step

    def spy(batch, *args, **kwargs):
        stages.append(model.stage)
        return original(batch, *args, **kwargs)

    model.training_step = spy
    engine = Engine(default_root_dir=tmp_path, max_epochs=5, accelerator="cpu", devices=1, logger=False,
                    enable_progress_bar=False)
    data = datamodule(demo_root)
    engine.fit(model=model, datamodule=data)
    # The schedule stops after text_epochs + image_epochs, whatever max_epochs says.
    steps_per_epoch = len(data.train_dataloader())
    assert stages == ["text"] * steps_per_epoch + ["image"] * steps_per_epoch
    assert bool(model.learnt_parts_trained)  # see ZeroShotModuleMixin.learning_type
    for key, value in model.model.text_adapter.state_dict().items():
        assert not torch.equal(value, text_before[key]), key
    assert any(not torch.equal(v, image_before[k]) for k, v in model.model.image_adapter.state_dict().items())

    results = engine.test(model=model, datamodule=data)
    assert {"image_AUROC", "pixel_AUROC"} <= set(results[0])

    predictions = engine.predict(model=model, datamodule=data)
    batch = predictions[0]
    assert batch.anomaly_map.shape[-2:] == (224, 224)
    assert batch.pred_score.shape == (4,)

    # A Lightning checkpoint holds the adapters, not the frozen CLIP, and restores them.
    checkpoint = tmp_path / "aa_clip.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    stored = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert not any(key.startswith("model.clip.") for key in stored)
    restored = AACLIP.load_from_checkpoint(checkpoint, backbone="zsad-tiny", pretrained=None)
    assert bool(restored.learnt_parts_trained)
    assert torch.equal(restored.model.image_adapter.det_proj.fc.weight, model.model.image_adapter.det_proj.fc.weight)


def test_official_checkpoint_makes_it_ready(tmp_path: Path) -> None:
    source = tiny_model(seed=1)
    torch.save({"epoch": 5, "text_adapter": source.model.text_adapter.state_dict()}, tmp_path / "text_adapter.pth")
    torch.save({"epoch": 20, "image_adapter": source.model.image_adapter.state_dict()},
               tmp_path / "image_adapter_20.pth")
    model = tiny_model(official_checkpoint=tmp_path, real_names="VisA")
    assert bool(model.learnt_parts_trained)
    assert model.learning_type == LearningType.ZERO_SHOT
    assert torch.equal(model.model.text_adapter[0].fc[0].weight, source.model.text_adapter[0].fc[0].weight)
    assert model.model.real_names["pcb1"] == "dual ultrasonic distance sensor pcb module"


def test_get_model_finds_it() -> None:
    model = get_model("AACLIP", backbone="zsad-tiny", pretrained=None, text_epochs=1, image_epochs=0)
    assert isinstance(model, AACLIP)
    assert model.stage == "text"
