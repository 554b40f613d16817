"""WinClipFixed: offline construction, pre-processed few-shot references, class names."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from anomalib.data import Folder, MVTecAD

from anomalib_zsad.benchmark import WinClipFixed
from anomalib_zsad.benchmark.evaluation import BenchmarkEngine, use_raw_scores

TINY = {"backbone": "zsad-tiny", "pretrained": None, "image_size": 64}


def _engine(tmp_path: Path) -> BenchmarkEngine:
    return BenchmarkEngine(accelerator="cpu", devices=1, default_root_dir=tmp_path, enable_progress_bar=False,
                           enable_model_summary=False)


def _data(root: Path, category: str = "brick") -> MVTecAD:
    return MVTecAD(root=root, category=category, train_batch_size=2, eval_batch_size=4, num_workers=0)


def test_builds_offline_with_input_size_following_the_backbone() -> None:
    model = WinClipFixed(**TINY)
    assert model.model.grid_size == (4, 4)  # 64 px / patch 16
    resize = model.pre_processor.transform.transforms[0]
    assert tuple(resize.size) == (64, 64)  # not anomalib's hard-coded 240
    with pytest.raises(ValueError, match="smaller than the largest window scale"):
        WinClipFixed(backbone="zsad-tiny", pretrained=None, image_size=32)  # 2x2 grid, scale 3


@pytest.mark.slow
def test_few_shot_references_go_through_the_pre_processor(demo_root: Path, tmp_path: Path) -> None:
    model = WinClipFixed(k_shot=2, **TINY)
    use_raw_scores(model)
    datamodule = _data(demo_root)
    results = _engine(tmp_path).test(model, datamodule=datamodule, verbose=False)
    assert 0.0 <= results[0]["image_AUROC"] <= 1.0 and 0.0 <= results[0]["pixel_AUPRO"] <= 1.0
    assert model.model.k_shot == 2
    # The stored reference embeddings are those of the *transformed* training images
    # (64 px, CLIP-normalised), exactly as the queries are embedded.
    raw = torch.stack([datamodule.train_data[i].image for i in range(len(datamodule.train_data))])
    assert raw.shape[-1] == 64
    ordered = model.model.reference_images
    matches = [any(torch.allclose(ref, img, atol=1e-5) for img in model.pre_processor.transform(raw)) for ref in ordered]
    assert all(matches), "reference images were not pre-processed like the test images"
    _, _, patches = model.model.encode_image(ordered)
    assert torch.allclose(model.model.patch_embeddings, patches, atol=1e-5)


@pytest.mark.slow
def test_few_shot_source_folder(demo_root: Path, tmp_path: Path) -> None:
    """anomalib's WinClip reads ``pre_processor.test_transform`` here, which no longer exists."""
    source = tmp_path / "refs"
    shutil.copytree(demo_root / "grass" / "train" / "good", source)
    model = WinClipFixed(k_shot=1, few_shot_source=source, **TINY)
    use_raw_scores(model)
    _engine(tmp_path).test(model, datamodule=_data(demo_root), verbose=False)
    assert model.model.reference_images.shape == (1, 3, 64, 64)


@pytest.mark.slow
def test_class_name_from_category_folder_name_or_fallback(demo_root: Path, tmp_path: Path) -> None:
    model = WinClipFixed(**TINY)
    use_raw_scores(model)
    _engine(tmp_path).test(model, datamodule=_data(demo_root, "coffee"), verbose=False)
    assert model.class_name == "coffee"

    defect = next(p.name for p in sorted((demo_root / "brick" / "test").iterdir()) if p.name != "good")
    folder = Folder(name="hazel_nut", root=demo_root / "brick", normal_dir="train/good",
                    abnormal_dir=f"test/{defect}", normal_test_dir="test/good", train_batch_size=2, eval_batch_size=4, num_workers=0)
    assert folder.category == ""  # what made upstream WinClip prompt with an empty name
    model = WinClipFixed(**TINY)
    use_raw_scores(model)
    _engine(tmp_path / "f").test(model, datamodule=folder, verbose=False)
    assert model.class_name == "hazel nut"
    assert model.model._text_embeddings.shape[0] == 2
