"""CrossDataset: target images never reach training, masks/labels flow, configs build it."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from anomalib.data import AnomalibDataModule, Folder, MVTecAD, Visa

from anomalib_zsad.data import CrossDataset, DatasetError

from .conftest import TINY, make_mvtec_category, save_png

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"
PER_CATEGORY = TINY["n_test_good"] + TINY["n_test_defect"]


def _cross(root: Path, test_category: str = "coffee", **kwargs: object) -> CrossDataset:
    kwargs.setdefault("train_categories", [c for c in ("brick", "grass", "coffee") if c != test_category])
    datamodule = CrossDataset(
        train=MVTecAD(root=root), test=MVTecAD(root=root, category=test_category), num_workers=0, **kwargs
    )
    datamodule.setup()
    return datamodule


def _resolved(paths: object) -> set[str]:
    return {str(Path(p).resolve()) for p in paths}


def test_train_uses_other_categories_test_splits_only(demo_root: Path) -> None:
    datamodule = _cross(demo_root, "coffee", train_batch_size=4)
    train_paths = _resolved(datamodule.train_data.samples.image_path)
    test_paths = _resolved(datamodule.test_data.samples.image_path)
    assert train_paths.isdisjoint(test_paths)
    assert all("/test/" in p for p in train_paths)  # test splits, never train/good
    assert {Path(p).parents[2].name for p in train_paths} == {"brick", "grass"}
    assert {Path(p).parents[2].name for p in test_paths} == {"coffee"}
    assert len(train_paths) == 2 * PER_CATEGORY and len(test_paths) == PER_CATEGORY
    # every image the loaders yield agrees
    loaded_train = {p for batch in datamodule.train_dataloader() for p in _resolved(batch.image_path)}
    loaded_test = {p for batch in datamodule.test_dataloader() for p in _resolved(batch.image_path)}
    assert loaded_train == train_paths and loaded_test == test_paths


def test_target_in_training_is_refused(demo_root: Path) -> None:
    with pytest.raises(DatasetError, match=r"target \(test\) image\(s\) are also in the training sources"):
        _cross(demo_root, "coffee", train_categories=None)  # "all" includes the target category


def test_refused_through_a_symlinked_root(demo_root: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(demo_root, target_is_directory=True)
    datamodule = CrossDataset(train=MVTecAD(root=alias), test=MVTecAD(root=demo_root, category="brick"),
                              train_categories=["brick"], num_workers=0)
    with pytest.raises(DatasetError, match="also in the training sources"):
        datamodule.setup()


def test_batches_carry_masks_and_labels(demo_root: Path) -> None:
    datamodule = _cross(demo_root, "grass", train_batch_size=8)
    assert datamodule.has_masks is True
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.image.shape == (8, 3, 64, 64)
    assert batch.gt_mask.shape == (8, 64, 64) and batch.gt_label.shape == (8,)
    for mask, label in zip(batch.gt_mask, batch.gt_label, strict=True):
        assert bool(mask.any()) == bool(label)  # anomalous images have their mask, normal ones zeros
    test_batch = next(iter(datamodule.test_dataloader()))
    assert test_batch.gt_mask is not None and int(test_batch.gt_label.sum()) == TINY["n_test_defect"]


def test_validation_is_the_target_test_split(demo_root: Path) -> None:
    datamodule = _cross(demo_root, "brick")
    val_paths = [p for batch in datamodule.val_dataloader() for p in batch.image_path]
    test_paths = [p for batch in datamodule.test_dataloader() for p in batch.image_path]
    assert val_paths == test_paths and len(val_paths) == PER_CATEGORY


def test_name_and_category_for_results_folders(demo_root: Path) -> None:
    datamodule = CrossDataset(train=MVTecAD(root=demo_root), test=MVTecAD(root=demo_root),
                              train_categories="brick", test_categories="grass", num_workers=0)
    assert datamodule.name == "MVTecAD" and datamodule.category == "grass"  # the target's, as anomalib names runs
    assert datamodule.target_categories() == ["grass"]
    assert datamodule.source_categories() == {f"MVTecAD({str(demo_root)!r})": ["brick"]}


def test_several_or_all_target_categories(demo_root: Path, tmp_path: Path) -> None:
    other = make_mvtec_category(tmp_path / "other" / "widget")
    pooled = CrossDataset(train=MVTecAD(root=other.parent), test=MVTecAD(root=demo_root),
                          test_categories="all", num_workers=0)
    pooled.setup()
    assert pooled.target_categories() == ["brick", "coffee", "grass"]
    assert len(pooled.test_data) == 3 * PER_CATEGORY and pooled.category == "brick+coffee+grass"
    listed = CrossDataset(train=MVTecAD(root=other.parent), test=MVTecAD(root=demo_root),
                          test_categories=["grass", "brick"], num_workers=0)
    listed.setup()
    assert set(listed.test_data.samples.category) == {"grass", "brick"}


def test_unknown_category_lists_available(demo_root: Path) -> None:
    datamodule = CrossDataset(train=MVTecAD(root=demo_root), test=MVTecAD(root=demo_root),
                              train_categories="brick", test_categories="marble", num_workers=0)
    with pytest.raises(DatasetError, match=r"\['marble'\] not found .* available: \['brick', 'coffee', 'grass'\]"):
        datamodule.setup()


def test_missing_dataset_points_to_demo(tmp_path: Path) -> None:
    datamodule = CrossDataset(train=MVTecAD(root=tmp_path / "absent"), test=MVTecAD(root=tmp_path / "absent2"),
                              num_workers=0)
    with pytest.raises(DatasetError, match="No categories found for MVTecAD.*anomalib_zsad.data.demo"):
        datamodule.setup()


def test_several_sources_and_a_maskless_one(demo_root: Path, tmp_path: Path) -> None:
    maskless = make_mvtec_category(tmp_path / "plain" / "widget", masks=False)
    datamodule = CrossDataset(
        train=[MVTecAD(root=demo_root), MVTecAD(root=maskless.parent)],
        test=MVTecAD(root=demo_root, category="coffee"),
        train_categories=None,
        num_workers=0,
        train_batch_size=3,
        seed=0,
    )
    with pytest.raises(DatasetError, match="also in the training sources"):
        datamodule.setup()  # demo_root "all" includes coffee
    datamodule.train_categories = ["brick", "widget"]
    datamodule.sources = [MVTecAD(root=demo_root), MVTecAD(root=maskless.parent)]
    with pytest.raises(DatasetError, match="'widget'.* not found"):
        datamodule.setup()  # a category list applies to every source
    datamodule = CrossDataset(
        train=[MVTecAD(root=demo_root), MVTecAD(root=maskless.parent)],
        test=MVTecAD(root=demo_root, category="coffee"),
        train_categories="all",
        num_workers=0,
    )
    datamodule.sources[0] = Folder(name="brick", root=demo_root / "brick", normal_dir="train/good",
                                   abnormal_dir="test/hole", mask_dir="ground_truth/hole")
    with pytest.warns(UserWarning, match=r"without masks: \['MVTecAD/widget'\].*gt_mask=None"):
        datamodule.setup()
    assert datamodule.has_masks is False
    kinds = set()
    for batch in datamodule.train_dataloader():
        assert batch.gt_label is not None
        if batch.gt_mask is None:
            kinds.add("labels-only")
            assert all("/plain/" in p for p in batch.image_path)
        else:
            kinds.add("masks")
            assert not any("/plain/" in p for p in batch.image_path)
    assert kinds == {"labels-only", "masks"}


def test_folder_without_masks_is_labels_only(demo_root: Path) -> None:
    source = Folder(name="brick_nomask", root=demo_root / "brick", normal_dir="train/good",
                    normal_test_dir="test/good", abnormal_dir=["test/scratch", "test/color"])
    datamodule = CrossDataset(train=source, test=MVTecAD(root=demo_root, category="grass"), num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        datamodule.setup()
    assert any("without masks" in str(w.message) for w in caught)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.gt_mask is None and batch.gt_label.shape[0] == 4


def test_bad_mask_in_a_source_is_named(demo_copy: Path) -> None:
    save_png(demo_copy / "brick" / "ground_truth" / "hole" / "000_mask.png", np.zeros((10, 10), np.uint8))
    datamodule = CrossDataset(train=MVTecAD(root=demo_copy), test=MVTecAD(root=demo_copy, category="coffee"),
                              train_categories=["brick"], num_workers=0)
    with pytest.raises(DatasetError, match=r"brick/ground_truth/hole/000_mask.png' is 10x10 but its image"):
        datamodule.setup()


def _anomalib_reader_untouched() -> bool:
    import anomalib.data.datasets.base.image as base_dataset
    import anomalib.data.utils.image as image_module

    from anomalib_zsad.data import read_image_rgb

    return image_module.read_image is not read_image_rgb and base_dataset.read_image is image_module.read_image


def test_odd_image_modes_load_as_rgb(demo_copy: Path) -> None:
    """The plugin's own datamodules read 16-bit/RGBA right with anomalib's reader left alone."""
    from anomalib_zsad.data import ZSADDemo

    save_png(demo_copy / "brick" / "test" / "good" / "000.png", np.full((64, 64), 30000, np.uint16))
    save_png(demo_copy / "brick" / "test" / "good" / "001.png", np.full((64, 64, 4), 90, np.uint8))
    expected = round(30000 / 257) / 255  # anomalib's convert("RGB") would give 1.0 (white)
    datamodule = _cross(demo_copy, "coffee", train_categories=["brick"], train_batch_size=PER_CATEGORY)
    assert _anomalib_reader_untouched()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.image.shape == (PER_CATEGORY, 3, 64, 64)
    by_name = dict(zip(batch.image_path, batch.image, strict=True))
    gray16 = by_name[str(demo_copy / "brick" / "test" / "good" / "000.png")]
    assert abs(float(gray16.mean()) - expected) < 1e-6
    demo = ZSADDemo(root=demo_copy, category="brick", num_workers=0, eval_batch_size=PER_CATEGORY)
    demo.setup()
    batch = next(iter(demo.test_dataloader()))
    by_name = dict(zip(batch.image_path, batch.image, strict=True))
    assert abs(float(by_name[str(demo_copy / "brick" / "test" / "good" / "000.png")].mean()) - expected) < 1e-6
    assert torch.allclose(by_name[str(demo_copy / "brick" / "test" / "good" / "001.png")], torch.tensor(90 / 255))
    assert batch.gt_mask.shape == (PER_CATEGORY, 64, 64) and int(batch.gt_label.sum()) == TINY["n_test_defect"]
    assert _anomalib_reader_untouched()


def test_visa_layout_source(demo_root: Path, tmp_path: Path) -> None:
    """VisA after anomalib's split (visa_pytorch/<category>/...): used as is, nothing downloaded."""
    visa_root = tmp_path / "visa"
    shutil.copytree(demo_root / "brick", visa_root / "visa_pytorch" / "candle")
    datamodule = CrossDataset(train=Visa(root=visa_root), test=MVTecAD(root=demo_root, category="grass"),
                              num_workers=0)
    datamodule.setup()
    assert set(datamodule.train_data.samples.category) == {"candle"}
    assert datamodule.has_masks and len(datamodule.train_data) == PER_CATEGORY


def _parse(config: dict, *args: str) -> CrossDataset:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibDataModule, "data")
    parsed = parser.parse_args(["--data", yaml.safe_dump(config), *args])
    return parser.instantiate_classes(parsed).data


def test_cli_style_arguments(demo_root: Path) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibDataModule, "data")
    args = ["--data", "anomalib_zsad.data.CrossDataset",
            "--data.train", "MVTecAD", f"--data.train.root={demo_root}",
            "--data.test", "MVTecAD", f"--data.test.root={demo_root}", "--data.test.category", "coffee",
            "--data.train_categories", "[brick, grass]", "--data.num_workers", "0"]
    datamodule = parser.instantiate_classes(parser.parse_args(args)).data
    assert isinstance(datamodule, CrossDataset) and datamodule.train_categories == ["brick", "grass"]
    datamodule.setup()
    assert datamodule.category == "coffee" and len(datamodule.train_data) == 2 * PER_CATEGORY


@pytest.mark.parametrize("name", ["visa_to_mvtec.yaml", "mvtec_to_visa.yaml", "demo_cross.yaml"])
def test_example_configs_build(name: str) -> None:
    config = yaml.safe_load((CONFIGS / name).read_text())
    datamodule = _parse(config)
    assert isinstance(datamodule, CrossDataset)
    assert datamodule.train_batch_size == 8
    if name != "demo_cross.yaml":
        train_cls = {"visa_to_mvtec.yaml": Visa, "mvtec_to_visa.yaml": MVTecAD}[name]
        assert all(isinstance(s, train_cls) for s in datamodule.sources)


def test_demo_config_runs_against_the_demo_set(tmp_path: Path) -> None:
    from anomalib_zsad.data import make_demo_dataset

    config = yaml.safe_load((CONFIGS / "demo_cross.yaml").read_text())
    root = make_demo_dataset(tmp_path / "zsad_demo", **TINY)  # default categories, tiny images
    text = yaml.safe_dump(config).replace("datasets/zsad_demo", str(root))
    (tmp_path / "cfg.yaml").write_text(text)
    datamodule = AnomalibDataModule.from_config(tmp_path / "cfg.yaml")
    datamodule.num_workers = 0
    datamodule.setup()
    assert isinstance(datamodule, CrossDataset)
    train_categories = set(datamodule.train_data.samples.category)
    assert datamodule.target_categories()[0] not in train_categories and len(train_categories) >= 2


def test_zsad_demo_generates_on_demand(tmp_path: Path) -> None:
    from anomalib_zsad.data import ZSADDemo

    root = tmp_path / "auto_demo"
    datamodule = CrossDataset(
        train=ZSADDemo(root=root, image_size=48),
        test=ZSADDemo(root=root, category="coffee", image_size=48),
        train_categories=["brick"],
        num_workers=0,
    )
    datamodule.setup()  # no prepare_data() call needed; nothing is downloaded
    assert (root / "brick" / "test").is_dir() and len(datamodule.train_data) == 4 + 6
    assert next(iter(datamodule.test_dataloader())).image.shape[-1] == 48


@pytest.mark.slow
def test_anomalib_cli_builds_it_from_the_config(demo_root: Path, tmp_path: Path) -> None:
    """`anomalib train --data configs/data/demo_cross.yaml` parses and instantiates (not run)."""
    from anomalib.cli import AnomalibCLI

    config = (CONFIGS / "demo_cross.yaml").read_text().replace("datasets/zsad_demo", str(demo_root))
    (tmp_path / "data.yaml").write_text(config)
    cli = AnomalibCLI(
        ["train", "--model", "Padim", "--model.backbone", "resnet18", "--model.pre_trained", "false",
         "--data", str(tmp_path / "data.yaml"), "--data.test_categories", "grass",
         "--default_root_dir", str(tmp_path / "results")],
        run=False,
    )
    assert isinstance(cli.datamodule, CrossDataset)
    assert cli.datamodule.target_categories() == ["grass"] and cli.datamodule.train_batch_size == 8


def test_short_class_names_after_activate(demo_root: Path) -> None:
    """What the plugin hook enables: `--data CrossDataset --data.train ZSADDemo ...`."""
    from jsonargparse import ArgumentParser

    import anomalib_zsad.data as data_package

    data_package.activate()
    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibDataModule, "data")
    args = ["--data", "CrossDataset", "--data.train", "ZSADDemo", f"--data.train.root={demo_root}",
            "--data.test", "ZSADDemo", f"--data.test.root={demo_root}", "--data.test_categories", "brick",
            "--data.train_categories", "grass"]
    datamodule = parser.instantiate_classes(parser.parse_args(args)).data
    assert isinstance(datamodule, CrossDataset) and datamodule.target_categories() == ["brick"]


def test_raw_visa_is_split_once_and_used(tmp_path: Path, demo_root: Path) -> None:
    """Raw VisA layout + split_csv/1cls.csv: anomalib's one-class split runs, then its test split trains."""
    from PIL import Image

    root = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    rng = np.random.default_rng(0)
    plan = [("train", "normal"), ("test", "normal"), ("test", "anomaly"), ("test", "anomaly")]
    for i, (split, label) in enumerate(plan):
        kind = "Anomaly" if label == "anomaly" else "Normal"
        image_rel = f"candle/Data/Images/{kind}/{i:03d}.JPG"
        (root / image_rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / image_rel, format="JPEG")
        mask_rel = ""
        if label == "anomaly":
            mask_rel = f"candle/Data/Masks/Anomaly/{i:03d}.png"
            mask = np.zeros((40, 50), np.uint8)
            mask[5:15, 5:20] = 1  # VisA masks are 0/1-ish; anomalib binarises them to 0/255
            save_png(root / mask_rel, mask)
        rows.append(f"candle,{split},{label},{image_rel},{mask_rel}")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")

    datamodule = CrossDataset(train=Visa(root=root), test=MVTecAD(root=demo_root, category="brick"),
                              num_workers=0, train_batch_size=3)
    datamodule.prepare_data()
    datamodule.setup()
    assert datamodule.source_categories() == {f"Visa({str(root)!r})": ["candle"]}  # empty split folders ignored
    samples = datamodule.train_data.samples
    assert len(samples) == 3 and samples.label_index.tolist().count(1) == 2
    assert all("/visa_pytorch/candle/test/" in p for p in samples.image_path)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.gt_mask is not None and int(batch.gt_mask.sum()) > 0


# ------------------------------------------------------------------ copies of target images (issue 12)
@pytest.mark.parametrize("kind", ["hard-linked", "byte-identical"])
def test_a_copy_of_the_target_is_refused(demo_root: Path, tmp_path: Path, kind: str) -> None:
    """`cp -al` (hard links) or `cp -r` of the target category under another name trains on every target image."""
    aux = tmp_path / "aux"
    copy = os.link if kind == "hard-linked" else shutil.copy2
    shutil.copytree(demo_root / "brick", aux / "wall", copy_function=copy)
    if kind == "hard-linked":
        assert (aux / "wall" / "test" / "good" / "000.png").stat().st_ino == \
            (demo_root / "brick" / "test" / "good" / "000.png").stat().st_ino
    datamodule = CrossDataset(train=MVTecAD(root=aux), test=MVTecAD(root=demo_root, category="brick"), num_workers=0)
    how = "the same file as" if kind == "hard-linked" else "a byte-identical copy of"
    with pytest.raises(DatasetError, match=rf"^{PER_CATEGORY} target \(test\) image\(s\) are also in the training "
                                           rf"sources, e.g. '.*aux/wall/test/.*' \({how} '.*/brick/test/"):
        datamodule.setup()


def test_one_copied_image_among_others_is_found(demo_root: Path, tmp_path: Path) -> None:
    aux = tmp_path / "aux"
    shutil.copytree(demo_root / "coffee", aux / "mocha")
    shutil.copy(demo_root / "brick" / "test" / "good" / "001.png", aux / "mocha" / "test" / "good" / "000.png")
    datamodule = CrossDataset(train=MVTecAD(root=aux), test=MVTecAD(root=demo_root, category="brick"), num_workers=0)
    with pytest.raises(DatasetError, match=r"^1 target .*mocha/test/good/000.png' \(a byte-identical copy of "
                                           r"'.*brick/test/good/001.png'\)"):
        datamodule.setup()


def test_same_size_different_content_is_not_a_copy(tmp_path: Path) -> None:
    """Uncompressed PNGs of one shape all have one size: the content decides, not the size."""
    from PIL import Image

    from anomalib_zsad.data.cross_dataset import find_shared_images

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(path, compress_level=0)
        paths.append(str(path))
    assert len({Path(p).stat().st_size for p in paths}) == 1 and Path(paths[0]).stat().st_size > 2 * 65536
    assert find_shared_images(paths[:2], paths[2:]) == []
    shutil.copy(paths[2], tmp_path / "same.png")
    # a copy that differs only in the middle (first/last 64 KiB equal) is not a copy either
    middle = bytearray(Path(paths[2]).read_bytes())
    middle[len(middle) // 2] ^= 0xFF
    (tmp_path / "middle.png").write_bytes(bytes(middle))
    found = find_shared_images([*paths[:2], str(tmp_path / "same.png"), str(tmp_path / "middle.png")], paths[2:])
    assert found == [(str(tmp_path / "same.png"), paths[2], "a byte-identical copy of")]


# ------------------------------------------------------------------ every image's header up front (issue 12)
@pytest.mark.parametrize("content", [b"", b"<html>not an image</html>"], ids=["zero-byte", "not-an-image"])
def test_a_broken_good_image_fails_at_setup_not_mid_epoch(demo_copy: Path, content: bytes) -> None:
    bad = demo_copy / "brick" / "test" / "good" / "001.png"
    bad.write_bytes(content)
    mvtec = CrossDataset(train=MVTecAD(root=demo_copy), test=MVTecAD(root=demo_copy, category="coffee"),
                         train_categories=["brick"], num_workers=0)
    with pytest.raises(DatasetError, match=rf"Cannot read '{bad}'"):
        mvtec.setup()
    folder = Folder(name="brick", root=demo_copy / "brick", normal_dir="train/good", normal_test_dir="test/good",
                    abnormal_dir="test/hole", mask_dir="ground_truth/hole")  # indexed by anomalib, not by layout
    through_folder = CrossDataset(train=folder, test=MVTecAD(root=demo_copy, category="coffee"), num_workers=0)
    with pytest.raises(DatasetError, match=rf"Cannot read '{bad}'"):
        through_folder.setup()
    unchecked = CrossDataset(train=MVTecAD(root=demo_copy), test=MVTecAD(root=demo_copy, category="coffee"),
                             train_categories=["brick"], num_workers=0, validate=False)
    unchecked.setup()  # validate=False: found only when read, still naming the file
    with pytest.raises(DatasetError, match=rf"Cannot read image '{bad}'"):
        list(unchecked.train_dataloader())


# ------------------------------------------------------------------ results tree (issue 13)
def test_runs_land_in_the_tree_of_anomalib_test_on_the_target(demo_root: Path, tmp_path: Path) -> None:
    """A CrossDataset run and `anomalib test --data MVTecAD --data.category coffee` share one results tree.

    Uses what anomalib itself computes: the Engine's workspace (``<root>/<model>/<name>/<category>``) and
    the image visualiser's output file for every test image.
    """
    from anomalib.engine import Engine
    from anomalib.models import Padim
    from anomalib.utils.path import generate_output_filename

    model = Padim(backbone="resnet18", pre_trained=False)
    trees = []
    for datamodule in (
        MVTecAD(root=demo_root, category="coffee", num_workers=0),
        CrossDataset(train=MVTecAD(root=demo_root), test=MVTecAD(root=demo_root, category="coffee"),
                     train_categories=["brick"], num_workers=0),
    ):
        datamodule.setup()
        engine = Engine(default_root_dir=tmp_path / "results")
        engine._setup_workspace(model, datamodule=datamodule)
        run_dir = Path(engine._cache.args["default_root_dir"])
        images = sorted(
            generate_output_filename(path, run_dir / "images", datamodule.name, datamodule.category, mkdir=False)
            for path in datamodule.test_data.samples.image_path
        )
        trees.append((run_dir, images))
    assert trees[0] == trees[1]
    run_dir, images = trees[1]
    assert run_dir.relative_to(tmp_path / "results").parts[:3] == ("Padim", "MVTecAD", "coffee")
    assert len(set(images)) == PER_CATEGORY and all(p.parent.parent == run_dir / "images" for p in images)


@pytest.mark.parametrize(("count", "batch_size", "replicas", "seed"), [(11, 2, 2, 5), (7, 4, 3, None), (3, 2, 4, 1)])
def test_mask_grouped_batches_under_ddp_as_lightning_injects_them(count: int, batch_size: int, replicas: int,
                                                                  seed: int | None) -> None:
    """Lightning rebuilds a training loader's batch sampler with its DistributedSampler (found by the
    argument name ``sampler``). Every process must then get the same number of batches, none mixing
    samples with and without masks, together covering every sample, in one order they agree on."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler

    from anomalib_zsad.data._samples_dataset import MaskGroupedBatchSampler

    has_mask = [i % 3 != 0 for i in range(count)]
    dataset = list(range(count))
    with _replace_dunder_methods(BatchSampler):
        loader = DataLoader(dataset, batch_sampler=MaskGroupedBatchSampler(
            SequentialSampler(dataset), batch_size, has_mask=has_mask, seed=seed))
    per_rank = []
    for rank in range(replicas):
        distributed = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=True)
        rebuilt = _update_dataloader(loader, distributed, mode=RunningStage.TRAINING)
        sampler = rebuilt.batch_sampler
        assert isinstance(sampler, MaskGroupedBatchSampler) and sampler.has_mask == has_mask
        batches = list(sampler)
        assert len(batches) == len(sampler)
        per_rank.append(batches)
    assert len({len(batches) for batches in per_rank}) == 1  # DDP needs the same number of steps
    seen = [index for batches in per_rank for batch in batches for index in batch]
    assert set(seen) == set(range(count))
    assert all(len({has_mask[i] for i in batch}) == 1 for batches in per_rank for batch in batches)
    single = list(MaskGroupedBatchSampler(SequentialSampler(dataset), batch_size, has_mask=has_mask, seed=seed))
    if seed is not None:  # the processes share the one-process batches (padded by repetition)
        assert {tuple(b) for batches in per_rank for b in batches} == {tuple(b) for b in single}
