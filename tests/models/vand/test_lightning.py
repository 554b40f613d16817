"""The anomalib flow with Vand on the tiny CLIP and a tiny generated MVTec-layout set:
train on one category's test split (CrossDataset), then test/predict on another, zero- and few-shot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib import LearningType
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models.components import AnomalibModule
from conftest import assert_export_equals_torch

from anomalib_zsad.data import CrossDataset
from anomalib_zsad.data.demo import make_demo_dataset
from anomalib_zsad.models.vand import Vand, save_official_checkpoint
from anomalib_zsad.models.vand.lightning_model import class_name_from_path

pytestmark = pytest.mark.slow

TINY_MODEL = {"backbone": "zsad-tiny", "pretrained": None, "image_size": 64}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("vand_demo") / "demo", seed=0, categories=("brick", "grass"),
                             image_size=64, n_train=2, n_test_good=2, n_test_defect=2)


def _engine(root: Path) -> Engine:
    return Engine(max_epochs=1, accelerator="cpu", devices=1, default_root_dir=root, logger=False,
                  enable_progress_bar=False)


def _cross(demo_root: Path) -> CrossDataset:
    return CrossDataset(train=MVTecAD(root=demo_root), test=MVTecAD(root=demo_root, category="grass"),
                        train_categories="brick", train_batch_size=2, eval_batch_size=2, num_workers=0, seed=0)


def test_vand_is_a_direct_anomalib_module() -> None:
    assert Vand in AnomalibModule.__subclasses__()


def test_class_name_from_path() -> None:
    assert class_name_from_path("/d/visa/pcb_1/test/bad/000.png", "object") == "pcb 1"
    assert class_name_from_path("/d/mvtec/bottle/train/good/000.png", "object") == "bottle"
    assert class_name_from_path("/images/x.png", "object") == "object"


def test_fit_test_predict_zero_and_few_shot(demo_root: Path, tmp_path: Path) -> None:
    model = Vand(**TINY_MODEL)
    assert model.learning_type == LearningType.ONE_CLASS  # untrained: anomalib train trains it
    before = {k: v.clone() for k, v in model.model.trainable_linearlayer.state_dict().items()}
    engine = _engine(tmp_path / "fit")
    datamodule = _cross(demo_root)
    engine.fit(model=model, datamodule=datamodule)
    after = model.model.trainable_linearlayer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert bool(model.learnt_parts_trained)  # (then ONE_CLASS again: validation set the thresholds)
    assert model.model.class_name == "grass"

    results = engine.test(model=model, datamodule=datamodule)
    for key in ("image_AUROC", "pixel_AUROC"):
        assert 0.0 <= results[0][key] <= 1.0

    predictions = engine.predict(model=model, data_path=demo_root / "grass" / "test" / "good")
    assert predictions and predictions[0].anomaly_map.shape[-2:] == (64, 64)

    # The checkpoint leaves the CLIP out and restores the trained flag and the linear layers.
    ckpt = Path(engine.trainer.checkpoint_callback.best_model_path or "")
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        assert not any(key.startswith("model.clip.") for key in state)
        assert any(key.startswith("model.trainable_linearlayer.") for key in state)

    # Few-shot from the trained linear layers in the official format: memory from grass' train split.
    official = tmp_path / "vand_official.pth"
    save_official_checkpoint(model.model, official)
    few = Vand(**TINY_MODEL, official_checkpoint=official, k_shot=2)
    assert few.learning_type == LearningType.FEW_SHOT
    few_engine = _engine(tmp_path / "few")
    target = MVTecAD(root=demo_root, category="grass", train_batch_size=2, eval_batch_size=2, num_workers=0)
    few_results = few_engine.test(model=few, datamodule=target)
    assert few.model.k_shot_ready and few.model.memory_banks[0].shape[0] == 2 * 4 * 4
    assert 0.0 <= few_results[0]["pixel_AUROC"] <= 1.0


def test_few_shot_references_come_from_the_target_train_split(demo_root: Path) -> None:
    """With CrossDataset the datamodule's train split is the auxiliary data: not a memory source."""
    split = Vand._target_train_split(_cross(demo_root))  # noqa: SLF001
    paths = [Path(p) for p in split.samples.image_path]
    assert paths and all(p.parts[-4:-1] == ("grass", "train", "good") for p in paths)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["openvino", "onnx"])
def test_openvino_and_onnx_export_match_torch(tmp_path: Path, kind: str) -> None:
    """The exported graph maps images to pred_score and anomaly_map with the text features baked in."""
    model = Vand(**TINY_MODEL, class_name="grass").eval()
    path = getattr(model, f"to_{kind}")(tmp_path, input_size=(64, 64))
    assert_export_equals_torch(model, path, size=64, tolerance=1e-4)
