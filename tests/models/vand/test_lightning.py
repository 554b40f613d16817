"""The anomalib flow with Vand on the tiny CLIP and a tiny generated MVTec-layout set:
train on one category's test split (CrossDataset), then test/predict on another, zero- and few-shot."""

from __future__ import annotations

from pathlib import Path

import pytest
from anomalib import LearningType
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_zsad.data import CrossDataset
from anomalib_zsad.data.demo import make_demo_dataset
from anomalib_zsad.models.components.references import target_train_split
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


def test_class_name_from_path() -> None:
    assert class_name_from_path("/d/visa/pcb_1/test/bad/000.png", "object") == "pcb 1"
    assert class_name_from_path("/d/mvtec/bottle/train/good/000.png", "object") == "bottle"
    assert class_name_from_path("/images/x.png", "object") == "object"


def test_few_shot_memory_from_the_target_train_split(demo_root: Path, tmp_path: Path) -> None:
    """Official linear layers plus a k-shot memory of the target's normal images: FEW_SHOT, and the
    memory holds k images' patch tokens per layer."""
    official = tmp_path / "vand_official.pth"
    save_official_checkpoint(Vand(**TINY_MODEL).model, official)
    few = Vand(**TINY_MODEL, official_checkpoint=official, k_shot=2)
    assert few.learning_type == LearningType.FEW_SHOT
    target = MVTecAD(root=demo_root, category="grass", train_batch_size=2, eval_batch_size=2, num_workers=0)
    few_results = _engine(tmp_path / "few").test(model=few, datamodule=target)
    assert few.model.k_shot_ready and few.model.memory_banks[0].shape[0] == 2 * 4 * 4
    assert few.model.class_name == "grass"  # class_name="auto": the datamodule's category
    assert 0.0 <= few_results[0]["pixel_AUROC"] <= 1.0


def test_few_shot_references_come_from_the_target_train_split(demo_root: Path) -> None:
    """With CrossDataset the datamodule's train split is the auxiliary data: not a memory source."""
    split = target_train_split(_cross(demo_root))
    paths = [Path(p) for p in split.samples.image_path]
    assert paths and all(p.parts[-4:-1] == ("grass", "train", "good") for p in paths)
