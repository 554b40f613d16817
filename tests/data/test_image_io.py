"""Any image mode loads as 3-channel RGB with a sensible scale; anomalib can be made to use it."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_zsad.data import DatasetError, install_rgb_image_reader, read_image_rgb, uninstall_rgb_image_reader
from anomalib_zsad.data.errors import CorruptFileError
from anomalib_zsad.data.image_io import load_rgb_array, read_mask_binary
from anomalib_zsad.data.validation import image_size

from .conftest import save_png


@pytest.fixture
def opted_in() -> Iterator[None]:
    """anomalib's readers replaced for one test (the explicit opt-in), then put back."""
    install_rgb_image_reader()
    yield
    uninstall_rgb_image_reader()


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


def test_predict_dataset_loads_odd_images_as_rgb_after_install(tmp_path: Path, opted_in: None) -> None:
    """What `anomalib predict --data <folder>` builds: PredictDataset over a plain folder."""
    from anomalib.data import PredictDataset

    save_png(tmp_path / "a_gray16.png", np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16))
    save_png(tmp_path / "b_rgba.png", np.full((16, 16, 4), 77, np.uint8))
    save_png(tmp_path / "c_gray.png", np.full((16, 16), 9, np.uint8))
    install_rgb_image_reader()  # idempotent
    dataset = PredictDataset(tmp_path)
    images = [dataset[i].image for i in range(len(dataset))]
    assert all(img.shape == (3, 16, 16) for img in images)
    assert 0.4 < float(images[0].mean()) < 0.6  # not clipped to white
    assert torch.allclose(images[1], torch.full_like(images[1], 77 / 255))
    batch = dataset.collate_fn([dataset[i] for i in range(len(dataset))])
    assert batch.image.shape == (3, 3, 16, 16) and batch.gt_mask is None and batch.gt_label is None


def test_install_patches_anomalib_readers_and_uninstall_restores_them() -> None:
    import anomalib.data.datasets.base.image as base_dataset
    import anomalib.data.predict as predict_module
    import anomalib.data.utils as data_utils
    import anomalib.data.utils.image as image_module
    from anomalib.visualization.image import item_visualizer
    from PIL import Image as pil_image

    original = image_module.read_image
    assert original is not read_image_rgb and base_dataset.read_image is original  # nothing installed by import
    install_rgb_image_reader()
    try:
        assert data_utils.read_image is read_image_rgb
        assert base_dataset.read_image is read_image_rgb
        assert predict_module.read_image is read_image_rgb
        assert item_visualizer.Image is not pil_image
    finally:
        uninstall_rgb_image_reader()
    assert data_utils.read_image is original and base_dataset.read_image is original
    assert predict_module.read_image is original and item_visualizer.Image is pil_image
    uninstall_rgb_image_reader()  # idempotent


def test_visualiser_draws_16bit_inputs_with_contrast(tmp_path: Path, opted_in: None) -> None:
    """anomalib's ImageVisualizer re-opens the file with Pillow; after install it is not white."""
    from anomalib.data import ImageItem
    from anomalib.visualization.image.item_visualizer import visualize_image_item

    path = save_png(tmp_path / "g16.png", np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16))
    item = ImageItem(image=read_image_rgb(path, as_tensor=True), image_path=str(path))
    drawn = np.asarray(visualize_image_item(item, fields=["image"], text_config={"enable": False}).convert("L"))
    assert drawn.min() < 20 and 110 < drawn.mean() < 145


# ------------------------------------------------------------------ decompression bombs, damaged JPEGs
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_bomb(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit ``side x side`` PNG of zeros, compressed row by row (a few tens of KB on disk)."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed pixels
    stream = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", stream)
                     + _png_chunk(b"IEND", b""))
    return path


def test_decompression_bomb_names_the_file(tmp_path: Path) -> None:
    bomb = _write_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 500_000
    for read in (load_rgb_array, read_mask_binary, image_size):  # full read, mask read, header check
        with pytest.raises(DatasetError, match=rf"'{bomb}'.*400000000 pixels.*MAX_IMAGE_PIXELS") as caught:
            read(bomb)
        assert "\n" not in str(caught.value)


def _jpeg_bytes() -> bytes:
    y, x = np.mgrid[0:96, 0:128]
    array = np.dstack([(x * 2) % 256, (y * 3) % 256, (x + y) % 256]).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_corrupt_jpeg_scan_data_is_an_error_not_garbage(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    data = _jpeg_bytes()
    clean = tmp_path / "clean.jpg"
    clean.write_bytes(data)
    assert load_rgb_array(clean).shape == (96, 128, 3)  # an intact JPEG still loads
    scan = data.index(b"\xff\xda") + 300
    damaged = tmp_path / "damaged.jpg"
    damaged.write_bytes(data[:scan] + bytes(200) + data[scan + 200:])  # scan data overwritten, size kept
    with Image.open(damaged) as image:  # what Pillow alone does: decodes, silently, as garbage
        image.load()
    for read in (load_rgb_array, read_image_rgb, read_mask_binary):
        with pytest.raises(CorruptFileError, match=rf"'{damaged}': the JPEG decoder reports \"Corrupt JPEG data"):
            read(damaged)
    assert "Corrupt JPEG data" not in capfd.readouterr().err  # reported through the error, not printed


def test_truncation_is_reported_even_when_pillow_is_told_to_pad(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    data = _jpeg_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=rf"'{truncated}'.*truncated"):
        load_rgb_array(truncated)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # set by some libraries, process-wide
    with pytest.raises(CorruptFileError, match=rf"'{truncated}'.*truncated"):
        load_rgb_array(truncated)
