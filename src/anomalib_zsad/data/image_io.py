"""Image reading that always yields 3-channel 8-bit-range RGB, with errors that name the file.

Why this exists: anomalib 2.7 reads every image with ``PIL.Image.open(path).convert("RGB")``.
That is right for 8-bit files, but Pillow *clips* 16-bit grayscale (mode ``I;16``/``I``) to
255 when converting, so a 16-bit PNG turns almost uniformly white, silently. Corrupt or
truncated files also fail deep inside a DataLoader worker with a message that does not say
which file is broken. :func:`read_image_rgb` fixes both, and :func:`install_rgb_image_reader`
makes anomalib itself (datasets, ``PredictDataset`` behind ``anomalib predict --data <folder>``,
the visualiser, the inferencers) use it.

Conversion rules (documented in ``docs/data.md``):

* ``L``/``P``/``CMYK``/``YCbCr``/``1``: Pillow's own ``convert("RGB")``.
* ``RGBA``/``LA``/``PA``: the alpha channel is dropped (colour kept), as anomalib does.
* ``I;16*``/``I`` (16/32-bit integer): scaled by bit depth (``65535 -> 255``), not per image,
  so the brightness of a set of images stays comparable; values that fit 8 bits are kept.
* ``F`` (float): values in ``[0, 1]`` are scaled by 255, others are clipped to ``[0, 255]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from anomalib_zsad.data.errors import DatasetError

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _array_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Map a high-bit-depth single-channel array to ``uint8`` by its bit depth."""
    array = np.asarray(array)
    if mode == "F":
        data = array.astype(np.float64)
        finite = data[np.isfinite(data)]
        scale = 255.0 if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0 else 1.0
        return np.clip(np.nan_to_num(data * scale), 0, 255).astype(np.uint8)
    data = array.astype(np.int64)
    peak = int(data.max()) if data.size else 0
    if peak <= 255:  # 8-bit content stored in a wide container: keep the values
        return np.clip(data, 0, 255).astype(np.uint8)
    if peak <= 65535:
        return (np.clip(data, 0, 65535) / 257.0).round().astype(np.uint8)
    return (np.clip(data, 0, None) / (peak / 255.0)).round().astype(np.uint8)


def pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert any Pillow image to an ``HxWx3`` ``uint8`` RGB array (see module rules)."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        gray = _array_to_uint8(np.asarray(image), mode)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in _ALPHA_MODES or mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)


def load_rgb_array(path: str | Path) -> np.ndarray:
    """Read ``path`` as an ``HxWx3`` ``uint8`` RGB array.

    Raises:
        DatasetError: if the file is missing, not an image, truncated or otherwise unreadable.
            The message names the file and says what to do.
    """
    return _decode_file(path, pil_to_rgb_array, "Image", "image",
                        "Check the dataset root/paths, or remove the entry that refers to it.",
                        "The file is corrupt, truncated or not an image; re-export it (e.g. as PNG) or delete it "
                        "from the data set.")


def _decode_file(path: str | Path, decode, kind: str, noun: str, missing_hint: str, broken_hint: str):  # noqa: ANN001, ANN202
    """Open ``path`` with PIL and return ``decode(image)``; a missing or unreadable file raises a
    :class:`DatasetError` that names it and says what to do (``missing_hint`` / ``broken_hint``)."""
    path = Path(path)
    if not path.is_file():
        msg = f"{kind} file not found: '{path}'. {missing_hint}"
        raise DatasetError(msg)
    try:
        with Image.open(path) as image:
            image.load()
            return decode(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        msg = f"Cannot read {noun} '{path}': {error}. {broken_hint}"
        raise DatasetError(msg) from error


def read_image_rgb(path: str | Path, as_tensor: bool = False):  # noqa: ANN201 (same contract as anomalib's)
    """Drop-in replacement for :func:`anomalib.data.utils.read_image`.

    Returns a ``float32`` ``torchvision.tv_tensors.Image`` of shape ``3xHxW`` in ``[0, 1]`` when
    ``as_tensor`` is true, otherwise an ``HxWx3`` float array in ``[0, 1]`` (as anomalib does).
    """
    array = load_rgb_array(path)
    if not as_tensor:
        return array / 255.0
    import torch
    from torchvision.transforms.v2.functional import to_dtype, to_image

    return to_dtype(to_image(array), torch.float32, scale=True)


def _mask_array(image: Image.Image) -> np.ndarray:
    wide = image.mode.startswith("I") or image.mode == "F"
    return np.asarray(image if wide else image.convert("L"))  # "L" ignores alpha


def read_mask_binary(path: str | Path, as_tensor: bool = False):  # noqa: ANN201
    """Read a mask (any mode/bit depth) as binary; non-zero pixels are anomalous.

    Same return contract as :func:`anomalib.data.utils.read_mask`, but a broken file raises a
    :class:`DatasetError` naming it.
    """
    mask = _decode_file(path, _mask_array, "Mask", "mask",
                        "Every anomalous image needs a mask, or none of its data set does.",
                        "Re-export it as a single-channel PNG (0 = normal, >0 = defect).")
    if not as_tensor:
        return (mask > 0).astype(np.uint8) * 255
    import torch
    from torchvision.tv_tensors import Mask

    return Mask(torch.from_numpy(np.ascontiguousarray(mask > 0)), dtype=torch.uint8)


class _WideAwarePIL:
    """Stand-in for the ``PIL.Image`` module whose ``open`` turns 16-bit/float images into RGB.

    anomalib's image visualiser re-reads the input with ``Image.open(path).convert("RGB")``, which
    would draw a 16-bit image white. Everything else is delegated to the real module.
    """

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(Image, name)

    @staticmethod
    def open(fp, *args, **kwargs) -> Image.Image:  # noqa: ANN001, ANN002, ANN003
        image = Image.open(fp, *args, **kwargs)
        if image.mode.startswith("I") or image.mode == "F":
            with image:
                image.load()
                return Image.fromarray(pil_to_rgb_array(image))
        return image


_VISUALISER_MODULES = ("anomalib.visualization.image.item_visualizer", "anomalib.visualization.image.functional")


def install_rgb_image_reader() -> None:
    """Make anomalib read images with :func:`read_image_rgb` (idempotent).

    anomalib modules import ``read_image`` by name, so the function is replaced in
    ``anomalib.data.utils`` (what later imports pick up) and in every already imported
    ``anomalib.*`` module that still holds the original. The image visualiser opens files with
    Pillow directly; its ``Image`` global is swapped for :class:`_WideAwarePIL`. Masks are left to
    anomalib: its ``convert("L") > 0`` is already correct for any bit depth.
    """
    import importlib
    import sys

    import anomalib.data.utils as utils_pkg
    import anomalib.data.utils.image as image_module

    original = getattr(image_module, "_zsad_original_read_image", image_module.read_image)
    image_module._zsad_original_read_image = original  # noqa: SLF001 - remember for idempotency
    for name, module in list(sys.modules.items()):
        if (name == "anomalib" or name.startswith("anomalib.")) and getattr(module, "read_image", None) is original:
            module.read_image = read_image_rgb
    utils_pkg.read_image = read_image_rgb
    image_module.read_image = read_image_rgb
    for name in _VISUALISER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # layout of a future anomalib: the data path above still works
            continue
        if getattr(module, "Image", None) is Image:
            module.Image = _WideAwarePIL()
