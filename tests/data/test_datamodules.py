"""anomalib's own datamodules and MVTecLayout as CrossDataset sources and targets, on tiny trees in each set's
published layout; few-shot auxiliary training (shots_per_category)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import BMAD, MPDD, BTech, Kolektor, MVTecAD, MVTecAD2, MVTecLOCO, RealIAD

from anomalib_zsad.data import CrossDataset, DatasetError, MVTecLayout, MVTecLOCOFixed, select_shots
from anomalib_zsad.data._samples_dataset import PooledDataset
from anomalib_zsad.data._sources import available_categories, category_test_samples
from anomalib_zsad.data.convert import convert
from anomalib_zsad.data.image_io import read_image_rgb

from . import fake_layouts as fake

# name -> (datamodule factory, tree writer, category folder written)
LAYOUTS = {
    "MPDD": (lambda r: MPDD(root=r, category="tubes"), lambda r: fake.mvtec_like(r / "tubes"), "tubes"),
    "BTech": (lambda r: BTech(root=r, category="01"),
              lambda r: fake.mvtec_like(r / "01", normal="ok", defect="ko", image_ext=".bmp", mask_name="{stem}.png"),
              "01"),
    "Kolektor": (lambda r: Kolektor(root=r), fake.kolektor, "Kolektor"),
    "BMAD": (lambda r: BMAD(root=r, category="Brain"), fake.bmad, "Brain"),
    "MVTecLOCO": (lambda r: MVTecLOCO(root=r, category="juice_bottle"), fake.mvtec_loco, "juice_bottle"),
    "MVTecAD2": (lambda r: MVTecAD2(root=r, category="sheet_metal"), fake.mvtec_ad2, "sheet_metal"),
    "RealIAD": (lambda r: RealIAD(root=r, category="audiojack"), fake.real_iad, "audiojack"),
    "MVTecAD": (lambda r: MVTecAD(root=r, category="bottle"), lambda r: fake.mvtec_like(r / "bottle", defect="broken_large"), "bottle"),
}


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, int]]]:
    """Every layout written once: name -> (root, what the writer put there)."""
    built = {}
    for name, (_, write, _) in LAYOUTS.items():
        root = tmp_path_factory.mktemp(name)
        built[name] = (root, write(root))
    return built


def _datamodule(name: str, trees: dict) -> object:
    return LAYOUTS[name][0](trees[name][0])


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_test_split_counted_and_masks_aligned(name: str, trees: dict) -> None:
    datamodule = _datamodule(name, trees)
    category = LAYOUTS[name][2]
    assert available_categories(datamodule) == [category]
    samples = category_test_samples(datamodule, category)
    built = trees[name][1]
    anomalous = samples[samples.label_index == 1]
    assert len(anomalous) == built["test_anomalous"] and anomalous.has_mask.all()
    if "test_normal" in built:
        assert (samples.label_index == 0).sum() == built["test_normal"]
    else:  # Kolektor: anomalib's test split holds 20 % of the good images (train_test_split, random_state=42)
        assert (samples.label_index == 0).sum() == round(0.2 * built["good"])
    dataset = PooledDataset(samples)
    for index in np.flatnonzero(samples.label_index.to_numpy() == 1):
        item = dataset[int(index)]
        row = samples.iloc[int(index)]
        assert Path(row.image_path).stem in Path(row.mask_path).stem + Path(row.mask_path).parent.name  # LOCO: NNN/000.png
        assert item.gt_mask.shape == item.image.shape[-2:] and bool(item.gt_mask.any())
    assert (samples.loc[samples.label_index == 0, "mask_path"] == "").all()


def test_loco_masks_are_united(trees: dict) -> None:
    samples = category_test_samples(_datamodule("MVTecLOCO", trees), "juice_bottle")
    row = samples[samples.label_index == 1].iloc[0]
    assert len(row.extra_mask_paths) == 1  # two masks for the image
    mask = PooledDataset(samples)[int(samples.index[samples.label_index == 1][0])].gt_mask
    assert bool(mask[0:3, 0:3].all()) and bool(mask[8:11, 10:14].all()) and int(mask.sum()) == 9 + 12


def test_bmad_sets_without_masks(tmp_path: Path) -> None:
    """BMAD's Chest/Histopathology/OCT2017 (test/good, test/Ungood, no img/label folders): anomalib's own
    indexing finds no test image there; read with image labels only."""
    built = fake.bmad_image_level(tmp_path)
    samples = category_test_samples(BMAD(root=tmp_path, category="Chest"), "Chest")
    assert (samples.label_index == 1).sum() == built["test_anomalous"] and not samples.has_mask.any()
    assert (samples.label_index == 0).sum() == built["test_normal"]
    target = MVTecLayout(root=tmp_path, category="Chest", normal_folder="good", num_workers=0)
    target.setup()  # as a benchmark target
    assert len(target.test_data) == 5 and target.test_data.task.value == "classification"


def test_loco_as_an_anomalib_target(trees: dict) -> None:
    """MVTecLOCOFixed: anomalib's MVTec LOCO datamodule (reading, mask union) with an indexing pandas 3 accepts."""
    datamodule = MVTecLOCOFixed(root=trees["MVTecLOCO"][0], category="juice_bottle", num_workers=0,
                                eval_batch_size=8)
    datamodule.setup()
    assert (len(datamodule.train_data), len(datamodule.val_data), len(datamodule.test_data)) == (1, 1, 4)
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.gt_label.tolist().count(1) == 2 and int(batch.gt_mask.sum()) == 2 * (9 + 12)


def test_every_layout_in_one_cross_dataset(trees: dict) -> None:
    """Seven anomalib datamodules as sources, MPDD as the target; batches carry their masks."""
    sources = [_datamodule(n, trees) for n in ("BTech", "Kolektor", "BMAD", "MVTecLOCO", "MVTecAD2", "RealIAD", "MVTecAD")]
    datamodule = CrossDataset(train=sources, test=_datamodule("MPDD", trees), num_workers=0, train_batch_size=4, seed=0)
    datamodule.setup()
    samples = datamodule.train_data.samples
    assert set(samples.source) == {"BTech", "Kolektor", "BMAD", "MVTecLOCO", "MVTecAD2", "RealIAD", "MVTecAD"}
    assert datamodule.has_masks and datamodule.target_categories() == ["tubes"] and datamodule.name == "MPDD"
    for batch in datamodule.train_dataloader():
        assert batch.gt_mask is not None and batch.gt_mask.shape[0] == batch.image.shape[0]
        for mask, label in zip(batch.gt_mask, batch.gt_label, strict=True):
            assert bool(mask.any()) == bool(label)
    assert len(datamodule.test_data) == 4


def test_single_category_target(trees: dict) -> None:
    target = CrossDataset(train=_datamodule("MPDD", trees), test=_datamodule("Kolektor", trees), num_workers=0)
    target.setup()
    assert target.category == "Kolektor" and target.name == "Kolektor" and len(target.test_data) == 4


# ------------------------------------------------------------------------------------------- converted sets
@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """HeadCT (image labels only) and CVC-ColonDB (anomalous images with masks), converted."""
    root = tmp_path_factory.mktemp("converted")
    fake.headct(root / "headct_download")
    fake.polyps(root / "colondb_download" / "CVC-ColonDB")
    return {"HeadCT": convert("headct", root / "headct_download", root / "HeadCT"),
            "ColonDB": convert("colondb", root / "colondb_download", root / "ColonDB")}


def test_mvtec_layout_reads_sets_without_masks_or_normals(converted: dict[str, Path]) -> None:
    headct = MVTecLayout(root=converted["HeadCT"], category="brain", num_workers=0, eval_batch_size=8)
    headct.setup()
    batch = next(iter(headct.test_dataloader()))
    assert batch.gt_mask is None and batch.gt_label.tolist().count(1) == 3 and len(batch.gt_label) == 5
    colondb = MVTecLayout(root=converted["ColonDB"], category="colon", num_workers=0, eval_batch_size=8)
    colondb.setup()  # no normal images and no training images: the test folder is used as it is
    batch = next(iter(colondb.test_dataloader()))
    assert batch.gt_mask.shape == (3, 12, 16) and batch.gt_label.tolist() == [1, 1, 1]
    with pytest.raises(DatasetError, match="has no 'test' folder"):
        MVTecLayout(root=converted["HeadCT"], category="absent").setup()


def test_medical_protocol_cross_dataset(converted: dict[str, Path]) -> None:
    """Train on ColonDB (masks), test on HeadCT (labels only), as AnomalyCLIP's Table 3 does."""
    datamodule = CrossDataset(train=MVTecLayout(root=converted["ColonDB"]),
                              test=MVTecLayout(root=converted["HeadCT"], category="brain"), num_workers=0)
    datamodule.setup()
    assert datamodule.has_masks and datamodule.target_categories() == ["brain"]
    assert next(iter(datamodule.train_dataloader())).gt_mask is not None
    assert next(iter(datamodule.test_dataloader())).gt_mask is None


# ------------------------------------------------------------------------------------------- few-shot auxiliary training
def _shots(demo_root: Path, k: int, seed: int) -> CrossDataset:
    datamodule = CrossDataset(train=MVTecAD(root=demo_root), test=MVTecAD(root=demo_root, category="coffee"),
                              train_categories=["brick", "grass"], shots_per_category=k, seed=seed, num_workers=0)
    datamodule.setup()
    return datamodule


def test_shots_per_category_stratified_deterministic_and_disjoint(demo_root: Path) -> None:
    chosen = _shots(demo_root, 3, seed=0).train_data.samples
    for category in ("brick", "grass"):  # 2 good + 4 defective each: 1 normal + 2 anomalous
        labels = chosen[chosen.category == category].label_index.tolist()
        assert sorted(labels) == [0, 1, 1]
    assert chosen.equals(_shots(demo_root, 3, seed=0).train_data.samples)  # same seed, same images
    others = [set(_shots(demo_root, 3, seed=s).train_data.samples.image_path) for s in range(1, 4)]
    assert any(o != set(chosen.image_path) for o in others)
    assert not set(chosen.image_path) & set(_shots(demo_root, 3, seed=0).test_data.samples.image_path)
    assert len(_shots(demo_root, 100, seed=0).train_data) == 2 * 6  # more shots than images: all of them
    with pytest.raises(DatasetError, match="positive number"):
        CrossDataset(train=MVTecAD(root=demo_root), test=MVTecAD(root=demo_root), shots_per_category=0)


def test_select_shots_does_not_depend_on_other_categories() -> None:
    import pandas as pd

    def table(categories: list[str]) -> pd.DataFrame:
        rows = [(f"/{c}/{i:02d}.png", int(i % 3 == 0), "S", c) for c in categories for i in range(12)]
        return pd.DataFrame(rows, columns=["image_path", "label_index", "source", "category"])

    alone = select_shots(table(["a"]), 4, seed=7)
    together = select_shots(table(["a", "b"]), 4, seed=7)
    assert alone.image_path.tolist() == together[together.category == "a"].image_path.tolist()
    assert sorted(alone.label_index.tolist()) == [0, 0, 0, 1]  # a third anomalous: 1 of 4
    assert select_shots(table(["a"]), 2, seed=7).label_index.sum() == 1  # k >= 2: one of each kind


def test_images_are_read_in_any_layout(trees: dict) -> None:
    """BTech's .bmp and Real-IAD's .jpg load as RGB through the plugin's reader."""
    for name in ("BTech", "RealIAD"):
        samples = category_test_samples(_datamodule(name, trees), LAYOUTS[name][2])
        image = read_image_rgb(samples.image_path.iloc[0], as_tensor=True)
        assert isinstance(image, torch.Tensor) and image.shape[0] == 3
