"""Bad data gets a DatasetError that names the file; odd-but-valid images pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anomalib_zsad.data import DatasetError, validate_folder_dataset
from anomalib_zsad.data.errors import CorruptFileError
from anomalib_zsad.data.validation import validate_mvtec_category, validate_samples

from .conftest import make_mvtec_category, save_png


def test_error_type_is_a_value_error() -> None:
    assert issubclass(DatasetError, ValueError)


def test_valid_dataset_and_category(demo_root: Path) -> None:
    summary = validate_folder_dataset(demo_root)
    assert summary.layout == "mvtec_dataset" and summary.categories == ("brick", "coffee", "grass")
    assert summary.has_masks and summary.num_masks == 12 and summary.num_images == 18
    category = validate_folder_dataset(demo_root / "grass")
    assert category.layout == "mvtec_category" and category.num_images == 6


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"not found: '.*nowhere'.*demo"):
        validate_folder_dataset(tmp_path / "nowhere")


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=rf"No images found in '{tmp_path}'"):
        validate_folder_dataset(tmp_path)


def test_empty_test_folder(tmp_path: Path) -> None:
    (tmp_path / "cat" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"No test images in '.*cat/test'"):
        validate_folder_dataset(tmp_path / "cat")


def test_mask_size_differs_from_image(tmp_path: Path) -> None:
    category = make_mvtec_category(tmp_path / "cat")
    save_png(category / "ground_truth" / "dent" / "001_mask.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(DatasetError, match=r"001_mask.png' is 16x16 but its image '.*001.png' is 48x32"):
        validate_folder_dataset(category)


def test_mask_without_image(tmp_path: Path) -> None:
    category = make_mvtec_category(tmp_path / "cat")
    save_png(category / "ground_truth" / "dent" / "007_mask.png", np.zeros((32, 48), np.uint8))
    with pytest.raises(DatasetError, match=r"007_mask.png' has no image: expected '.*test/dent/007.<ext>'"):
        validate_folder_dataset(tmp_path)


def test_anomalous_image_without_mask(tmp_path: Path) -> None:
    category = make_mvtec_category(tmp_path / "cat")
    (category / "ground_truth" / "dent" / "000_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"'.*test/dent/000.png' has no mask"):
        validate_mvtec_category(category)


def test_category_without_any_masks_is_valid_but_reported(tmp_path: Path) -> None:
    summary = validate_mvtec_category(make_mvtec_category(tmp_path / "cat", masks=False))
    assert not summary.has_masks and summary.categories_without_masks == ("cat",)


def test_corrupt_file_is_named(tmp_path: Path) -> None:
    category = make_mvtec_category(tmp_path / "cat")
    (category / "test" / "good" / "001.png").write_bytes(b"this is not a png")
    with pytest.raises(DatasetError, match=r"'.*good/001.png'.*corrupt"):
        validate_folder_dataset(category)


def test_truncated_file_needs_decode(tmp_path: Path) -> None:
    category = make_mvtec_category(tmp_path / "cat", size=(64, 64))
    path = category / "test" / "good" / "000.png"
    path.write_bytes(path.read_bytes()[:200])  # header intact, pixel data cut
    validate_mvtec_category(category, decode=False)  # header-only check cannot see it ...
    with pytest.raises(DatasetError, match=r"'.*good/000.png'.*truncated"):
        validate_folder_dataset(category, decode=True)  # ... a full decode does


@pytest.mark.parametrize(
    "array",
    [
        np.full((32, 48), 128, np.uint8),  # grayscale L
        np.full((32, 48, 4), 200, np.uint8),  # RGBA
        np.full((32, 48), 40000, np.uint16),  # 16-bit grayscale
    ],
    ids=["gray", "rgba", "gray16"],
)
def test_grayscale_rgba_16bit_are_accepted(tmp_path: Path, array: np.ndarray) -> None:
    category = make_mvtec_category(tmp_path / "cat")
    save_png(category / "test" / "dent" / "000.png", array)
    summary = validate_folder_dataset(category, decode=True)
    assert summary.has_masks


def test_plain_image_folder(tmp_path: Path) -> None:
    save_png(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    save_png(tmp_path / "sub" / "b.PNG", np.zeros((8, 8), np.uint16))
    summary = validate_folder_dataset(tmp_path)
    assert summary.layout == "images" and summary.num_images == 2


def test_validate_samples_partial_masks(tmp_path: Path) -> None:
    category = make_mvtec_category(tmp_path / "cat")
    images = [category / "test" / "dent" / "000.png", category / "test" / "dent" / "001.png"]
    masks = [category / "ground_truth" / "dent" / "000_mask.png", ""]
    with pytest.raises(DatasetError, match=r"1 anomalous image\(s\) have no mask \(e.g. '.*001.png'\)"):
        validate_samples(images, masks, [1, 1], "src")
    assert validate_samples(images, ["", ""], [1, 1], "src") is False
    assert validate_samples(images, [masks[0], category / "ground_truth" / "dent" / "001_mask.png"], [1, 1], "src")


@pytest.mark.parametrize("content", [b"", b"GIF89a? no: plain text"], ids=["zero-byte", "not-an-image"])
def test_header_check_covers_every_image(tmp_path: Path, content: bytes) -> None:
    """decode=False (what CrossDataset(validate=True) runs) still opens every image, good ones included."""
    category = make_mvtec_category(tmp_path / "cat")
    bad = category / "test" / "good" / "001.png"
    bad.write_bytes(content)
    with pytest.raises(CorruptFileError, match=rf"Cannot read '{bad}'.*corrupt or not an image"):
        validate_mvtec_category(category, decode=False)
    with pytest.raises(CorruptFileError, match=rf"Cannot read '{bad}'"):
        validate_folder_dataset(tmp_path, decode=False)
    good = category / "test" / "good" / "000.png"
    with pytest.raises(CorruptFileError, match=rf"Cannot read '{bad}'"):  # normal images of an indexed set too
        validate_samples([good, bad], ["", ""], [0, 0], "src")
    assert validate_samples([good, bad], ["", ""], [0, 0], "src", check_files=False)  # caller checked them
