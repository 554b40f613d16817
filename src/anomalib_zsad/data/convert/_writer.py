"""What every converter shares: finding the download's folders, binary masks, and the atomic writer.

A converter is a function ``(source, writer, **options)`` that reads one published layout and hands
each file to a :class:`Writer`, which lays it out in MVTec AD layout::

    <out>/<category>/train/good/<name>                    (where the set has normal training images)
    <out>/<category>/test/good/<name>                     normal test images
    <out>/<category>/test/<defect>/<name>                 anomalous test images
    <out>/<category>/ground_truth/<defect>/<stem>_mask.png  0/255, the image's size (sets with masks)
    <out>/.zsad_convert.json                              converter, source, options, counts

:func:`convert_atomically` runs it in a temporary sibling folder (``.<out>.tmp-<pid>-<random>``,
locked while the run lives, as the demo generator does) that is renamed to ``out`` only once
complete, so a failure or an interruption never leaves a half-written set behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomalib_zsad.data.demo import _make_temporary, _remove_stale_temporaries, _unlock
from anomalib_zsad.data.errors import DatasetError
from anomalib_zsad.data.validation import IMAGE_EXTENSIONS

MANIFEST = ".zsad_convert.json"
FORMAT_VERSION = 1
LOSSY_EXTENSIONS = (".jpg", ".jpeg")


class LayoutError(DatasetError):
    """The source folder is not the published layout the converter reads (one message says what was expected)."""


def layout_error(name: str, source: Path, expected: str, found: str) -> LayoutError:
    """One message: which converter, which folder, the layout it expected and what was missing."""
    return LayoutError(f"'{source}' does not hold the {name} download: expected {expected}; {found}.")


def images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (extension case-insensitive), sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def child(folder: Path, *names: str) -> Path | None:
    """The sub-folder of ``folder`` with one of ``names`` (case-insensitive, in the order given)."""
    if not folder.is_dir():
        return None
    by_name = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    return next((by_name[n.lower()] for n in names if n.lower() in by_name), None)


def find_folder(source: Path, accept: Callable[[Path], bool], depth: int = 2) -> Path | None:
    """``source`` or the first folder below it (breadth first, up to ``depth`` levels, sorted) that
    ``accept`` takes: an archive usually unpacks into one more top folder than its description shows."""
    level = [source]
    for _ in range(depth + 1):
        for folder in level:
            if accept(folder):
                return folder
        level = [c for f in level if f.is_dir() for c in sorted(f.iterdir())
                 if c.is_dir() and not c.name.startswith(".")]
    return None


def binary_mask(path: Path) -> np.ndarray:
    """A mask file as ``uint8`` 0/255: non-zero is anomalous, or above 127 for JPEG masks (their
    compression leaves small non-zero values around the edges)."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("L") if image.mode not in {"L", "I", "I;16", "F", "1"} else image)
    except (OSError, ValueError) as error:
        msg = f"Cannot read mask '{path}': {error}. Re-download the data set or replace the file."
        raise DatasetError(msg) from error
    threshold = 127 if path.suffix.lower() in LOSSY_EXTENSIONS and array.max() > 1 else 0
    return (array > threshold).astype(np.uint8) * 255


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the header."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError) as error:
        msg = f"Cannot read image '{path}': {error}. Re-download the data set or replace the file."
        raise DatasetError(msg) from error


@dataclass
class Counts:
    """Files written for one category."""

    train_normal: int = 0
    test_normal: int = 0
    test_anomalous: int = 0
    masks: int = 0


@dataclass
class Writer:
    """Lays out files in MVTec AD layout below ``root`` (a temporary folder) and counts them."""

    root: Path
    counts: dict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))

    def _target(self, category: str, split: str, label: str, name: str) -> Path:
        target = self.root / category / split / label / name
        if target.exists():
            msg = f"Two source files map to '{target.relative_to(self.root)}'; the download holds duplicates."
            raise DatasetError(msg)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def _count(self, category: str, split: str, label: str) -> None:
        counts = self.counts[category]
        if split == "train":
            counts.train_normal += 1
        elif label == "good":
            counts.test_normal += 1
        else:
            counts.test_anomalous += 1

    def copy(self, source: Path, category: str, split: str, label: str, name: str | None = None) -> Path:
        """Copy an image file unchanged (extension lower-cased); ``label`` ``good`` is normal."""
        name = name or source.stem + source.suffix.lower()
        target = self._target(category, split, label, name)
        shutil.copyfile(source, target)
        self._count(category, split, label)
        return target

    def save(self, array: np.ndarray, category: str, split: str, label: str, stem: str) -> Path:
        """Write an image array as PNG (lossless: crops of a source image)."""
        target = self._target(category, split, label, f"{stem}.png")
        Image.fromarray(array).save(target)
        self._count(category, split, label)
        return target

    def mask(self, mask: np.ndarray, category: str, defect: str, image: Path) -> Path:
        """Write the 0/255 mask of the written anomalous ``image`` as ``ground_truth/<defect>/<stem>_mask.png``,
        refusing a mask whose size differs from the image's."""
        height, width = mask.shape[:2]
        if image_size(image) != (width, height):
            msg = (f"The mask for '{image.name}' is {width}x{height} but the image is "
                   f"{'x'.join(map(str, image_size(image)))}; the download is damaged or mixes up files.")
            raise DatasetError(msg)
        target = self._target(category, "ground_truth", defect, f"{image.stem}_mask.png")
        Image.fromarray(mask).save(target)
        self.counts[category].masks += 1
        return target


def progress(items: Iterable[Any], total: int, description: str) -> Iterator[Any]:
    """``items`` with a progress bar on a terminal (none in logs and tests)."""
    from tqdm.auto import tqdm

    yield from tqdm(items, total=total, desc=description, unit="file", disable=None, leave=False)


def _is_converted(root: Path) -> bool:
    return (root / MANIFEST).is_file()


def convert_atomically(
    name: str,
    source: str | Path,
    out: str | Path,
    build: Callable[[Path, Writer], None],
    options: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Run ``build(source, writer)`` into a temporary folder and rename it to ``out`` when complete.

    ``out`` must not exist, be empty, or (with ``overwrite``) hold an earlier conversion (a folder with
    the manifest); anything else is never deleted. Returns ``out`` as an absolute path.
    """
    source = Path(source).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    if not source.is_dir():
        msg = f"Source folder not found: '{source}'. Pass the folder the {name} download was unpacked into."
        raise DatasetError(msg)
    if out == source or out.is_relative_to(source) or source.is_relative_to(out):
        msg = f"The output '{out}' must be a new folder outside the source '{source}' (and not contain it)."
        raise DatasetError(msg)
    try:
        _remove_stale_temporaries(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (overwrite and _is_converted(out)):
            what = "an earlier conversion" if _is_converted(out) else "files that are not a conversion"
            hint = "pass --overwrite (overwrite=True) or choose" if _is_converted(out) else "choose"
            msg = f"'{out}' already contains {what}; {hint} another output folder."
            raise DatasetError(msg)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp, lock = _make_temporary(out)
    except OSError as error:
        msg = f"Cannot write the converted set to '{out}': {error.strerror or error}. Choose a writable folder."
        raise DatasetError(msg) from error
    try:
        writer = Writer(tmp)
        build(source, writer)
        if not writer.counts:
            msg = f"'{source}' holds no images for the {name} converter; check the folder."
            raise DatasetError(msg)
        manifest = {
            "version": FORMAT_VERSION,
            "converter": name,
            "source": str(source),
            "options": options,
            "categories": {c: vars(n) for c, n in sorted(writer.counts.items())},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = None
        if out.exists() and any(out.iterdir()):
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as error:
        msg = f"Cannot write the converted set to '{out}': {error.strerror or error}. Choose a writable folder."
        raise DatasetError(msg) from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _unlock(lock)
    return out
