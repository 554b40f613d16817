"""Converters: each published layout (a tiny fake tree) becomes the MVTec layout, counted, masks aligned,
split as the papers do; wrong layouts are refused with one message; writing is atomic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_zsad.data import DatasetError
from anomalib_zsad.data.convert import CONVERTERS, MANIFEST, LayoutError, convert
from anomalib_zsad.data.convert.__main__ import main
from anomalib_zsad.data.validation import list_images, validate_mvtec_category

from . import fake_layouts as fake


def _check(out: Path, expected: dict[str, int], category: str) -> dict[str, int]:
    """Counts of the converted category match the fake download's; every mask is binary and its image's size."""
    root = out / category
    summary = validate_mvtec_category(root)  # pairing by name, sizes, headers
    counts = json.loads((out / MANIFEST).read_text())["categories"][category]
    normal = len(list_images(root / "test" / "good"))
    assert (counts["test_normal"], counts["test_anomalous"]) == (normal, summary.num_images - normal)
    for key in ("test_normal", "test_anomalous", "train_normal"):
        if key in expected:
            assert counts[key] == expected[key], key
    for mask in list_images(root / "ground_truth", recursive=True):
        values = set(np.unique(np.asarray(Image.open(mask))).tolist())
        assert values <= {0, 255} and 255 in values, mask
    assert counts["masks"] == summary.num_masks
    return counts


# ------------------------------------------------------------------------------------------- industrial
def test_sdd_halves_and_the_papers_split(tmp_path: Path) -> None:
    from sklearn.model_selection import train_test_split

    built = fake.kolektorsdd(tmp_path / "download")
    out = convert("sdd", tmp_path / "download", tmp_path / "SDD")
    counts = _check(out, {"test_anomalous": built["defective_halves"]}, "electrical_commutators")
    bands = 2 * built["images"]
    assert counts["test_normal"] + counts["train_normal"] == bands - built["defective_halves"]
    # the normal halves in test are exactly scikit-learn's split over their sorted names (AdaCLIP's sdd-pre.py)
    test_good = {p.stem for p in list_images(out / "electrical_commutators" / "test" / "good")}
    normal = sorted(test_good | {p.stem for p in list_images(out / "electrical_commutators" / "train" / "good")})
    assert test_good == set(train_test_split(normal, test_size=0.25, random_state=42)[1])
    halves = [Image.open(p).size for p in list_images(out / "electrical_commutators" / "test" / "defect")]
    assert set(halves) == {(8, 12)}  # 24 x 8 images cut into two 12-row bands
    assert (out / "electrical_commutators" / "ground_truth" / "defect" / "kos01_Part1_0_mask.png").is_file()
    thirds = convert("sdd", tmp_path / "download", tmp_path / "SDD3", pieces=3)
    assert json.loads((thirds / MANIFEST).read_text())["categories"]["electrical_commutators"]["test_anomalous"] == 3


def test_ksdd2_official_test_split_and_balanced(tmp_path: Path) -> None:
    built = fake.kolektorsdd2(tmp_path / "KolektorSDD2")
    _check(convert("ksdd2", tmp_path / "KolektorSDD2", tmp_path / "out"), built, "metal")
    balanced = convert("ksdd2", tmp_path / "KolektorSDD2", tmp_path / "balanced", balanced=True)
    _check(balanced, {"test_normal": built["test_anomalous"], "test_anomalous": built["test_anomalous"]}, "metal")


def test_dagm_test_folder_is_the_test_set(tmp_path: Path) -> None:
    built = fake.dagm(tmp_path / "download")
    out = convert("dagm", tmp_path / "download", tmp_path / "DAGM")
    for cls in ("Class1", "Class2"):
        _check(out, built, cls)
    assert sorted(p.name for p in list_images(out / "Class1" / "test" / "defect")) == ["0001.png", "0003.png"]


def test_dtd_synthetic_copied_with_binary_masks(tmp_path: Path) -> None:
    built = fake.dtd_synthetic(tmp_path / "download")
    out = convert("dtd", tmp_path / "download", tmp_path / "DTD")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["Blotchy_099", "Woven_001"]
    _check(out, built, "Woven_001")  # masks were 0/1: now 0/255


# ------------------------------------------------------------------------------------------- medical
@pytest.mark.parametrize(("name", "build", "category", "defect"), [
    ("headct", fake.headct, "brain", "hemorrhage"),
    ("brainmri", lambda root: fake.yes_no(root, duplicate="brain_tumor_dataset"), "brain", "tumor"),
    ("br35h", lambda root: fake.yes_no(root, extra="pred"), "brain", "tumor"),
    ("covid19", lambda root: fake.covid(root, "first"), "chest", "covid"),
    ("covid19", lambda root: fake.covid(root, "later"), "chest", "covid"),
])
def test_image_label_sets(tmp_path: Path, name: str, build: object, category: str, defect: str) -> None:
    built = build(tmp_path / "download")
    out = convert(name, tmp_path / "download", tmp_path / name)
    counts = _check(out, built, category)
    assert counts["masks"] == 0 and not (out / category / "ground_truth").exists()  # image labels only
    assert (out / category / "test" / defect).is_dir() and not (out / category / "train").exists()


@pytest.mark.parametrize(("name", "build", "category", "defect"), [
    ("isic", fake.isic, "skin", "lesion"),
    ("colondb", lambda root: fake.polyps(root / "CVC-ColonDB"), "colon", "polyp"),
    ("clinicdb", lambda root: fake.polyps(root, "Original", "Ground Truth", ".tif", ".tif"), "colon", "polyp"),
    ("kvasir", lambda root: fake.polyps(root / "Kvasir-SEG", ext=".jpg", mask_ext=".jpg"), "colon", "polyp"),
    ("endo", fake.polyps, "colon", "polyp"),
    ("tn3k", fake.tn3k, "thyroid", "nodule"),
])
def test_anomalous_only_sets_with_masks(tmp_path: Path, name: str, build: object, category: str, defect: str) -> None:
    built = build(tmp_path / "download")
    counts = _check(convert(name, tmp_path / "download", tmp_path / name), built, category)
    assert counts["test_normal"] == 0 and counts["masks"] == counts["test_anomalous"]
    assert (tmp_path / name / category / "test" / defect).is_dir()


# ------------------------------------------------------------------------------------------- refusals, atomicity, CLI
@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_a_wrong_layout_is_refused_with_what_was_expected(tmp_path: Path, name: str) -> None:
    fake.image(tmp_path / "download" / "photos" / "a.png")
    with pytest.raises(LayoutError, match=rf"does not hold the .* download: expected {re.escape(CONVERTERS[name].layout)}"):
        convert(name, tmp_path / "download", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["download"]  # nothing written, no temporary left


def test_a_failure_midway_leaves_nothing_and_outputs_are_protected(tmp_path: Path) -> None:
    fake.polyps(tmp_path / "download")
    (tmp_path / "download" / "masks" / "10.png").unlink()  # an image without its mask
    with pytest.raises(DatasetError, match=r"1 image\(s\) have no mask, e.g. '.*10.png'"):
        convert("colondb", tmp_path / "download", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["download"]
    fake.mask(tmp_path / "download" / "masks" / "10.png")
    first = convert("colondb", tmp_path / "download", tmp_path / "out")
    with pytest.raises(DatasetError, match="already contains an earlier conversion; pass --overwrite"):
        convert("colondb", tmp_path / "download", first)
    assert convert("colondb", tmp_path / "download", first, overwrite=True) == first
    fake.image(tmp_path / "mine" / "keep.png")
    with pytest.raises(DatasetError, match="files that are not a conversion"):
        convert("colondb", tmp_path / "download", tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "keep.png").is_file()


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake.headct(tmp_path / "download")
    out = main(["headct", str(tmp_path / "download"), str(tmp_path / "HeadCT"), "--category", "head"])
    assert out == tmp_path / "HeadCT" and "2 normal + 3 anomalous test images, 0 masks" in capsys.readouterr().out
    assert main(["--list"]) is None and "ksdd2" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["sdd", str(tmp_path / "download"), str(tmp_path / "SDD")])
    assert exit_info.value.code == 2 and "error: " in capsys.readouterr().err
    with pytest.raises(DatasetError, match="has no option"):
        convert("headct", tmp_path / "download", tmp_path / "x", pieces=3)
