"""The few-anomaly protocol as data (``anomalib_zsad.data.few_anomalies``): the draw, the splits,
the record, k = 0, Folder and MVTec-layout datamodules, copy-paste anomalies."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from anomalib.data import Folder, MVTecAD

from anomalib_zsad.data.demo import make_demo_dataset
from anomalib_zsad.data.few_anomalies import FewAnomalies, copy_paste_item, draw_anomalies


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two categories, 3 normal training images, 8 anomalous test images over 4 defect types."""
    return make_demo_dataset(tmp_path_factory.mktemp("few") / "demo", seed=0, categories=("brick", "coffee"),
                             image_size=32, n_train=3, n_test_good=2, n_test_defect=8)


def _samples(types: dict[str, int]) -> pd.DataFrame:
    rows = [{"image_path": f"/d/test/{t}/{i:03}.png", "mask_path": f"/d/gt/{t}/{i:03}_mask.png", "label_index": 1}
            for t, n in types.items() for i in range(n)]
    return pd.DataFrame(rows)


def test_draw_spreads_k_over_defect_types_and_is_seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("anomalib_zsad.data.few_anomalies._has_mask", lambda path: True)
    samples = _samples({"crack": 6, "hole": 5, "scratch": 4})
    drawn = draw_anomalies(samples, k=10, seed=0)
    types = drawn["image_path"].map(lambda p: p.split("/")[3]).value_counts().to_dict()
    assert len(drawn) == 10 and drawn["image_path"].is_unique
    assert min(types.values()) >= 3 and sum(types.values()) == 10  # 10 // 3 = 3 each, then 1 more
    assert drawn.equals(draw_anomalies(samples, k=10, seed=0))
    assert not drawn.equals(draw_anomalies(samples, k=10, seed=1))
    assert len(draw_anomalies(samples, k=20, seed=0)) == 15  # fewer than k: all of them


def test_images_without_masks_are_not_drawn(demo: Path) -> None:
    samples = _samples({"crack": 3})  # mask files that do not exist
    assert draw_anomalies(samples, k=2).empty


def test_splits_and_record(demo: Path, tmp_path: Path) -> None:
    data = FewAnomalies(MVTecAD(root=demo, category="coffee", num_workers=0, train_batch_size=4), k=4, seed=3,
                        reuse=2, copy_paste=1, record_path=tmp_path / "draw.json")
    data.setup("fit")
    drawn = set(data.drawn["image_path"])
    assert len(drawn) == 4 and len({Path(p).parent.name for p in drawn}) == 4  # one of each defect type
    test_paths, val_paths = set(data.test_data.samples["image_path"]), set(data.val_data.samples["image_path"])
    assert not drawn & test_paths and not drawn & val_paths
    assert len(test_paths) == 2 + 8 - 4
    train = data.train_data.samples
    assert (train["label_index"] == 0).sum() == 3
    assert (~train["synthetic"] & (train["label_index"] == 1)).sum() == 4 * 2  # reused real anomalies
    assert train["synthetic"].sum() == 4 * 1  # copy-paste anomalies
    items = [data.train_data[i] for i in range(len(train))]
    for item, row in zip(items, train.itertuples(), strict=True):
        assert int(item.gt_label) == row.label_index
        assert (item.gt_mask.sum() > 0) == bool(row.label_index)  # every anomaly brings its mask
    record = json.loads((tmp_path / "draw.json").read_text())
    assert {d["image_path"] for d in record["drawn"]} == drawn and record["k"] == 4 and record["category"] == "coffee"
    batch = next(iter(data.train_dataloader()))
    assert batch.gt_mask.shape == (4, 32, 32)
    again = FewAnomalies(MVTecAD(root=demo, category="coffee", num_workers=0), k=4, seed=3)
    again.setup()
    assert set(again.drawn["image_path"]) == drawn  # seeded


def test_k_zero_and_evaluation_only(demo: Path) -> None:
    plain = MVTecAD(root=demo, category="brick", num_workers=0)
    plain.setup()
    none = FewAnomalies(MVTecAD(root=demo, category="brick", num_workers=0), k=0)
    none.setup()
    assert none.drawn.empty
    assert len(none.train_data) == len(plain.train_data) and len(none.test_data) == len(plain.test_data)
    left_out = FewAnomalies(MVTecAD(root=demo, category="brick", num_workers=0), k=2, in_training=False)
    left_out.setup()
    assert len(left_out.train_data) == len(plain.train_data)  # normal images only
    assert len(left_out.test_data) == len(plain.test_data) - 2
    assert left_out.name == "MVTecAD" and left_out.category == "brick"


def test_folder_datamodule(demo: Path) -> None:
    category = demo / "brick"
    folder = Folder(name="brick", root=category, normal_dir="train/good", normal_test_dir="test/good",
                    abnormal_dir=[f"test/{t}" for t in ("color", "hole", "patch", "scratch")],
                    mask_dir=[f"ground_truth/{t}" for t in ("color", "hole", "patch", "scratch")], num_workers=0)
    data = FewAnomalies(folder, k=3, seed=0, copy_paste=0)
    data.setup("fit")
    assert len(data.drawn) == 3
    assert not set(data.drawn["image_path"]) & set(data.test_data.samples["image_path"])
    assert (data.train_data.samples["label_index"] == 1).sum() == 3 * 5
    item = data.train_data[int((data.train_data.samples["label_index"] == 1).idxmax())]
    assert item.gt_mask.sum() > 0


def test_copy_paste_pastes_the_masked_region_onto_the_normal_image() -> None:
    anomaly, normal = torch.ones(3, 8, 8), torch.zeros(3, 8, 8)
    mask = torch.zeros(8, 8)
    mask[2:4, 5:7] = 1
    image, pasted = copy_paste_item(anomaly, mask, normal, augmenters=[])  # no augmentation: same place
    assert torch.equal(pasted, mask.to(torch.uint8))
    assert torch.equal(image, mask.expand(3, 8, 8))
    torch.manual_seed(0)
    from anomalib_zsad.data.few_anomalies import copy_paste_augmenters

    image, pasted = copy_paste_item(anomaly, mask, normal, copy_paste_augmenters())
    assert image.shape == (3, 8, 8) and torch.equal(image[0] > 0.5, pasted.bool())
