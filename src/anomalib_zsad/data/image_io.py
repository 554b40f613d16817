"""Image reading that always yields 3-channel 8-bit-range RGB, with errors that name the file.

Why this exists: anomalib 2.7 reads every image with ``PIL.Image.open(path).convert("RGB")``.
That is right for 8-bit files, but Pillow *clips* 16-bit grayscale (mode ``I;16``/``I``) to
255 when converting, so a 16-bit PNG turns almost uniformly white, silently. Corrupt or
truncated files also fail deep inside a DataLoader worker with a message that does not say
which file is broken. :func:`read_image_rgb` fixes both; the plugin's own datamodules use it.
:func:`install_rgb_image_reader` is an explicit opt-in that makes anomalib itself (its datasets,
``PredictDataset`` behind ``anomalib predict --data <folder>``, the visualiser, the inferencers)
use it too; importing the plugin never does.

Conversion rules (documented in ``docs/data.md``):

* ``L``/``P``/``CMYK``/``YCbCr``/``1``: Pillow's own ``convert("RGB")``.
* ``RGBA``/``LA``/``PA``: the alpha channel is dropped (colour kept), as anomalib does.
* ``I;16*``/``I`` (16/32-bit integer): scaled by bit depth (``65535 -> 255``), not per image,
  so the brightness of a set of images stays comparable; values that fit 8 bits are kept.
* ``F`` (float): values in ``[0, 1]`` are scaled by 255, others are clipped to ``[0, 255]``.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from anomalib_zsad.data.errors import CorruptFileError, DatasetError

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
        CorruptFileError: the file is not an image, is truncated, or its decoder reported damage
            (e.g. libjpeg's "Corrupt JPEG data"). A :class:`DatasetError`; the message names the file.
        DatasetError: the file is missing, or too large for Pillow's decompression-bomb limit.
    """
    return _decode_file(path, pil_to_rgb_array, "Image", "image",
                        "Check the dataset root/paths, or remove the entry that refers to it.",
                        "The file is corrupt, truncated or not an image; re-export it (e.g. as PNG) or delete it "
                        "from the data set.")


def bomb_message(path: str | Path, noun: str, error: Exception) -> str:
    """One sentence for Pillow's :class:`~PIL.Image.DecompressionBombError`, naming the file."""
    return (
        f"Cannot read {noun} '{path}': {error} Resize the image, or, if the file is trusted, raise "
        "PIL.Image.MAX_IMAGE_PIXELS before loading it."
    )


def _decode_file(path: str | Path, decode, kind: str, noun: str, missing_hint: str, broken_hint: str):  # noqa: ANN001, ANN202
    """Open ``path`` with PIL and return ``decode(image)``; a missing or unreadable file raises a
    :class:`DatasetError` that names it and says what to do (``missing_hint`` / ``broken_hint``).

    The file is read once; a JPEG's bytes are also run through libjpeg's own damage report
    (:func:`jpeg_damage`), which Pillow silences.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{kind} file not found: '{path}'. {missing_hint}"
        raise DatasetError(msg)
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if getattr(image, "_ended", False):  # Pillow padded a truncated JPEG (LOAD_TRUNCATED_IMAGES)
                msg = "image file is truncated"
                raise OSError(msg)
            damage = jpeg_damage(data) if image.format == "JPEG" else None
            if damage is None:
                return decode(image)
    except Image.DecompressionBombError as error:
        raise DatasetError(bomb_message(path, noun, error)) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        msg = f"Cannot read {noun} '{path}': {error}. {broken_hint}"
        raise CorruptFileError(msg) from error
    msg = f"Cannot read {noun} '{path}': the JPEG decoder reports \"{damage}\". {broken_hint}"
    raise CorruptFileError(msg)


# ------------------------------------------------------------------ libjpeg's damage report
# Pillow's JPEG decoder silences libjpeg's warnings, so a JPEG whose scan data is corrupt decodes
# "successfully" as garbage. OpenCV (an anomalib dependency) decodes with libjpeg(-turbo) and its
# default message handler, which prints those warnings to the C ``stderr``. jpeg_damage() decodes at
# 1/8 scale (every Huffman code is still read, the IDCT is cheap: about half of Pillow's decode time)
# while file descriptor 2 points at a temporary file, then reads what libjpeg said. Lines that are not
# libjpeg damage reports are written back to stderr, so nothing printed meanwhile is lost.
_JPEG_DAMAGE = ("Corrupt JPEG data", "Premature end of JPEG file", "Invalid JPEG file structure",
                "Inconsistent progression sequence")
_CAPTURE_LOCK = threading.Lock()
_capture_file: tuple[int, object] | None = None  # (pid, file): one per process (DataLoader workers fork)


def _after_fork_in_child() -> None:
    """A forked child (DataLoader worker) gets its own lock and file: the parent's may be mid-use."""
    global _CAPTURE_LOCK, _capture_file  # noqa: PLW0603
    _CAPTURE_LOCK = threading.Lock()
    _capture_file = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _capture_sink():  # noqa: ANN202
    global _capture_file  # noqa: PLW0603
    if _capture_file is None or _capture_file[0] != os.getpid():
        _capture_file = (os.getpid(), tempfile.TemporaryFile())  # noqa: SIM115 - kept for the process
    return _capture_file[1]


def jpeg_damage(data: bytes) -> str | None:
    """What libjpeg reports about damage in the JPEG ``data`` (first message), or ``None``.

    ``None`` also when OpenCV is not importable (the check is then skipped).
    """
    try:
        import cv2
    except ImportError:
        return None
    with _CAPTURE_LOCK:
        sink = _capture_sink()
        sink.seek(0)
        sink.truncate()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all (e.g. a daemon): nothing to listen to
            return None
        try:
            os.dup2(sink.fileno(), 2)
            decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        lines = sink.read().decode("utf-8", "replace").splitlines()
    damage = [line.strip() for line in lines if line.strip().startswith(_JPEG_DAMAGE)]
    others = [line for line in lines if line.strip() and not line.strip().startswith(_JPEG_DAMAGE)]
    if others:
        os.write(2, ("\n".join(others) + "\n").encode())
    del decoded  # pixels come from Pillow; a file only OpenCV fails on is not called damaged
    return damage[0] if damage else None


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
    def open(fp, *args, **kwargs) -> Image.Image:  # noqa: ANN001
        image = Image.open(fp, *args, **kwargs)
        if image.mode.startswith("I") or image.mode == "F":
            with image:
                image.load()
                return Image.fromarray(pil_to_rgb_array(image))
        return image


_VISUALISER_MODULES = ("anomalib.visualization.image.item_visualizer", "anomalib.visualization.image.functional")


_installed: list[tuple[object, str, object]] = []  # (module, attribute, original) replaced by the opt-in


def install_rgb_image_reader() -> None:
    """Opt in: make anomalib's *own* code read images with :func:`read_image_rgb` (idempotent).

    Nothing calls this for you. The plugin's datamodules (``CrossDataset``, ``ZSADDemo``) read with
    :func:`read_image_rgb` without it; call it when anomalib's own readers should handle 16-bit files
    too (``anomalib predict --data <folder>``'s ``PredictDataset``, anomalib's datamodules such as
    ``MVTecAD``/``Folder``, the inferencers, the image visualiser). Undo with
    :func:`uninstall_rgb_image_reader`.

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

    def replace(module: object, name: str, value: object) -> None:
        current = getattr(module, name)
        if current is not value:
            _installed.append((module, name, current))
            setattr(module, name, value)

    for name, module in list(sys.modules.items()):
        if (name == "anomalib" or name.startswith("anomalib.")) and getattr(module, "read_image", None) is original:
            replace(module, "read_image", read_image_rgb)
    replace(utils_pkg, "read_image", read_image_rgb)
    replace(image_module, "read_image", read_image_rgb)
    for name in _VISUALISER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # layout of a future anomalib: the data path above still works
            continue
        if getattr(module, "Image", None) is Image:
            replace(module, "Image", _WideAwarePIL())


def uninstall_rgb_image_reader() -> None:
    """Undo :func:`install_rgb_image_reader`: anomalib's own functions are put back (idempotent)."""
    while _installed:
        module, name, original = _installed.pop()
        setattr(module, name, original)
