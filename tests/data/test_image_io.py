"""Any image mode loads as 3-channel RGB with a sensible scale; anomalib can be made to use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anomalib_zsad.data import DatasetError, install_rgb_image_reader, read_image_rgb
from anomalib_zsad.data.image_io import load_rgb_array, read_mask_binary

from .conftest import save_png


@pytest.mark.parametrize(
    ("array", "expected_rgb"),
    [
        (np.full((4, 6), 100, np.uint8), (100, 100, 100)),  # L
        (np.dstack([np.full((4, 6), v, np.uint8) for v in (10, 20, 30, 0)]), (10, 20, 30)),  # RGBA, alpha 0
        (np.full((4, 6), 65535, np.uint16), (255, 255, 255)),  # 16-bit white
        (np.full((4, 6), 32896, np.uint16), (128, 128, 128)),  # 16-bit mid-grey (32896 = 128 * 257)
        (np.full((4, 6), 200, np.uint16), (200, 200, 200)),  # 8-bit values in a 16-bit file stay
    ],
    ids=["gray8", "rgba", "gray16-white", "gray16-mid", "gray16-low"],
)
def test_modes_become_rgb(tmp_path: Path, array: np.ndarray, expected_rgb: tuple[int, int, int]) -> None:
    path = save_png(tmp_path / "x.png", array)
    rgb = load_rgb_array(path)
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == expected_rgb
    tensor = read_image_rgb(path, as_tensor=True)
    assert tensor.shape == (3, 4, 6) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, 0, 0], torch.tensor(expected_rgb) / 255.0)


def test_16bit_gradient_keeps_contrast(tmp_path: Path) -> None:
    """anomalib's convert("RGB") clips 16-bit to white; ours keeps the gradient."""
    gradient = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    rgb = load_rgb_array(save_png(tmp_path / "g.png", gradient))
    assert rgb.min() == 0 and rgb.max() == 255 and 120 < rgb.mean() < 135


def test_unreadable_and_missing_files_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match=r"Cannot read image '.*bad.png'"):
        read_image_rgb(bad)
    with pytest.raises(DatasetError, match=r"Image file not found: '.*gone.png'"):
        read_image_rgb(tmp_path / "gone.png")
    with pytest.raises(DatasetError, match=r"Cannot read mask '.*bad.png'"):
        read_mask_binary(bad)


def test_masks_any_mode_are_binary(tmp_path: Path) -> None:
    mask16 = np.zeros((5, 5), np.uint16)
    mask16[1, 1] = 1000
    rgba = np.zeros((5, 5, 4), np.uint8)
    rgba[..., 3] = 255  # opaque everywhere: alpha must not count as defect
    rgba[2, 2, :3] = 255
    assert read_mask_binary(save_png(tmp_path / "m16.png", mask16), as_tensor=True).sum() == 1
    out = read_mask_binary(save_png(tmp_path / "rgba.png", rgba), as_tensor=True)
    assert out.sum() == 1 and out[2, 2] == 1 and out.dtype == torch.uint8


def test_predict_dataset_loads_odd_images_as_rgb_after_install(tmp_path: Path) -> None:
    """What `anomalib predict --data <folder>` builds: PredictDataset over a plain folder."""
    from anomalib.data import PredictDataset

    save_png(tmp_path / "a_gray16.png", np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16))
    save_png(tmp_path / "b_rgba.png", np.full((16, 16, 4), 77, np.uint8))
    save_png(tmp_path / "c_gray.png", np.full((16, 16), 9, np.uint8))
    install_rgb_image_reader()
    install_rgb_image_reader()  # idempotent
    dataset = PredictDataset(tmp_path)
    images = [dataset[i].image for i in range(len(dataset))]
    assert all(img.shape == (3, 16, 16) for img in images)
    assert 0.4 < float(images[0].mean()) < 0.6  # not clipped to white
    assert torch.allclose(images[1], torch.full_like(images[1], 77 / 255))
    batch = dataset.collate_fn([dataset[i] for i in range(len(dataset))])
    assert batch.image.shape == (3, 3, 16, 16) and batch.gt_mask is None and batch.gt_label is None


def test_install_patches_anomalib_readers(tmp_path: Path) -> None:
    import anomalib.data.datasets.base.image as base_dataset
    import anomalib.data.predict as predict_module
    import anomalib.data.utils as data_utils

    install_rgb_image_reader()
    assert data_utils.read_image is read_image_rgb
    assert base_dataset.read_image is read_image_rgb
    assert predict_module.read_image is read_image_rgb


def test_visualiser_draws_16bit_inputs_with_contrast(tmp_path: Path) -> None:
    """anomalib's ImageVisualizer re-opens the file with Pillow; after install it is not white."""
    from anomalib.data import ImageItem
    from anomalib.visualization.image.item_visualizer import visualize_image_item

    path = save_png(tmp_path / "g16.png", np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16))
    install_rgb_image_reader()
    item = ImageItem(image=read_image_rgb(path, as_tensor=True), image_path=str(path))
    drawn = np.asarray(visualize_image_item(item, fields=["image"], text_config={"enable": False}).convert("L"))
    assert drawn.min() < 20 and 110 < drawn.mean() < 145
