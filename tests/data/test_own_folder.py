"""A user's own folder of good and bad images (masks optional): validate_folder_dataset says what is wrong, and
the YAML configs read it as a target with no code (the docs run train/test/predict on it: docs/data.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from anomalib.data import AnomalibDataModule, Folder

from anomalib_zsad.data import CrossDataset, DatasetError, validate_folder_dataset
from anomalib_zsad.data.validation import main

from . import fake_layouts as fake

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"


def _own_folder(root: Path, masks: bool = True) -> Path:
    for i in range(3):
        fake.image(root / "good" / f"g{i}.png")
    for folder in ("bad", "crack"):
        fake.image(root / folder / f"{folder}{0}.png")
        if masks:
            fake.mask(root / "masks" / f"{folder}0_mask.png")
    return root


def test_a_good_folder_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = validate_folder_dataset(_own_folder(tmp_path / "parts"))
    assert (summary.layout, summary.num_images, summary.num_masks, summary.has_masks) == ("good_bad", 5, 2, True)
    plain = validate_folder_dataset(_own_folder(tmp_path / "plain", masks=False))
    assert plain.num_masks == 0 and plain.categories_without_masks == ("plain",)
    assert main([str(tmp_path / "parts")]).num_images == 5
    assert "parts: good_bad, 1 category, 5 images, 2 masks: OK" in capsys.readouterr().out


@pytest.mark.parametrize(("damage", "message"), [
    (lambda r: fake.mask(r / "masks" / "g0_mask.png"), r"Mask '.*g0_mask.png' has no anomalous image named 'g0"),
    (lambda r: (r / "masks" / "crack0_mask.png").unlink(), r"Anomalous image '.*crack0.png' has no mask"),
    (lambda r: fake.mask(r / "masks" / "bad0_mask.png", size=(5, 5)), r"is 5x5 but its image .* is 16x12"),
    (lambda r: fake.image(r / "crack" / "bad0.png"), r"share the name 'bad0'"),
    (lambda r: (r / "good" / "g1.png").write_bytes(b"not an image"), r"Cannot read image '.*g1.png'"),
    (lambda r: shutil.rmtree(r / "good"), r"plain image folder"),
])
def test_what_is_wrong_is_named(tmp_path: Path, damage: object, message: str) -> None:
    root = _own_folder(tmp_path / "parts")
    damage(root)
    if message == "plain image folder":  # no good/: a folder of images for `anomalib predict`, not an error
        assert validate_folder_dataset(root).layout == "images"
        return
    with pytest.raises(DatasetError, match=message):
        validate_folder_dataset(root)
    with pytest.raises(SystemExit) as exit_info:
        main([str(root)])
    assert exit_info.value.code == 2


def _parse(config: dict) -> AnomalibDataModule:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibDataModule, "data")
    return parser.instantiate_classes(parser.parse_args(["--data", yaml.safe_dump(config)])).data


def test_yaml_only_target_and_cross_dataset(tmp_path: Path, demo_root: Path) -> None:
    root = _own_folder(tmp_path / "my_parts")
    folder_config = yaml.safe_load((CONFIGS / "own_folder.yaml").read_text())
    folder_config["init_args"].update(root=str(root), abnormal_dir=["bad", "crack"], num_workers=0)
    folder = _parse(folder_config)
    assert isinstance(folder, Folder)
    folder.setup()
    assert len(folder.test_data) == 5 and folder.test_data.has_anomalous  # every image is a test image
    cross_config = yaml.safe_load((CONFIGS / "own_folder_cross.yaml").read_text())
    cross_config["init_args"]["train"]["init_args"]["root"] = str(demo_root)
    cross_config["init_args"]["test"]["init_args"].update(root=str(root), abnormal_dir=["bad", "crack"])
    cross_config["init_args"]["num_workers"] = 0
    cross = _parse(cross_config)
    assert isinstance(cross, CrossDataset)
    cross.setup()
    assert cross.category == "my_parts" and len(cross.test_data) == 5 and cross.has_masks
    batch = next(iter(cross.test_dataloader()))
    assert batch.gt_mask is not None and int(batch.gt_label.sum()) == 2
