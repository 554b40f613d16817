"""Up-front checks of image folders, so bad data fails early with a message that helps.

Why: anomalib 2.7 assigns masks to anomalous images *by position* after sorting, never
compares mask and image sizes, and reads images lazily inside DataLoader workers. An extra
mask, a missing image, a mask of the wrong size or a corrupt file therefore surfaces as a
pandas length error, a silently misaligned mask or a worker crash that does not name the
file. These functions find such problems before training and raise :class:`DatasetError`
naming the file and the fix. They import no anomalib, so they are cheap to call.

Header checks open *every* image and mask with Pillow without decoding its pixels (sizes, a
readable header: catches zero-byte, non-image and decompression-bomb files); they cost a fraction
of a millisecond per file (``benchmarks/validate_headers.py``, figures in ``docs/data.md``), so
``CrossDataset`` runs them by default.
``decode=True`` additionally decodes every pixel to catch truncated or corrupt files (slower).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from anomalib_zsad.data.errors import CorruptFileError, DatasetError
from anomalib_zsad.data.image_io import bomb_message, load_rgb_array, read_mask_binary

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIX = "_mask"

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "FolderSummary",
    "find_categories",
    "image_size",
    "list_images",
    "validate_folder_dataset",
    "validate_good_bad_folder",
    "validate_image_folder",
    "validate_mvtec_category",
    "validate_samples",
]


@dataclass(frozen=True)
class FolderSummary:
    """What :func:`validate_folder_dataset` found (useful for logging and tests)."""

    root: Path
    layout: str  # "mvtec_dataset" (root/<category>/test/...), "mvtec_category", "good_bad" or "images"
    categories: tuple[str, ...] = ()
    num_images: int = 0
    num_masks: int = 0
    categories_without_masks: tuple[str, ...] = field(default=())

    @property
    def has_masks(self) -> bool:
        """True when every category has masks for its anomalous images."""
        return self.num_masks > 0 and not self.categories_without_masks


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files (by extension, case-insensitive) in ``folder``, sorted."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def image_size(path: str | Path, decode: bool = False, is_mask: bool = False) -> tuple[int, int]:
    """``(width, height)`` of an image, raising :class:`DatasetError` if it cannot be read.

    With ``decode=False`` only the header is parsed (fast); with ``decode=True`` the pixels are
    decoded too, which also catches truncated files.
    """
    path = Path(path)
    if decode:
        array = read_mask_binary(path) if is_mask else load_rgb_array(path)
        return int(array.shape[1]), int(array.shape[0])
    if not path.is_file():
        kind = "Mask" if is_mask else "Image"
        msg = f"{kind} file not found: '{path}'. Fix the path or remove the entry that refers to it."
        raise DatasetError(msg)
    try:
        with Image.open(path) as image:
            return image.size
    except Image.DecompressionBombError as error:
        raise DatasetError(bomb_message(path, "mask" if is_mask else "image", error)) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        msg = f"Cannot read '{path}': {error}. The file is corrupt or not an image; re-export or delete it."
        raise CorruptFileError(msg) from error


def _check_pair(image_path: Path, mask_path: Path, decode: bool) -> None:
    image_wh = image_size(image_path, decode=decode)
    mask_wh = image_size(mask_path, decode=decode, is_mask=True)
    if image_wh != mask_wh:
        msg = (
            f"Mask '{mask_path}' is {mask_wh[0]}x{mask_wh[1]} but its image '{image_path}' is "
            f"{image_wh[0]}x{image_wh[1]} (width x height). Masks must have exactly the image's size: "
            "resize the mask with nearest-neighbour interpolation or re-export it."
        )
        raise DatasetError(msg)


def validate_image_folder(root: str | Path, decode: bool = True, recursive: bool = True) -> list[Path]:
    """Check a plain folder of images (e.g. for ``anomalib predict``); return the images found."""
    root = Path(root)
    if not root.exists():
        msg = f"Folder not found: '{root}'. Pass an existing folder or image file."
        raise DatasetError(msg)
    images = [root] if root.is_file() else list_images(root, recursive=recursive)
    if not images:
        msg = (
            f"No images found in '{root}' (looked for {', '.join(IMAGE_EXTENSIONS)}"
            f"{' recursively' if recursive else ''}). Put the images there or point to the right folder."
        )
        raise DatasetError(msg)
    for path in images:
        image_size(path, decode=decode)
    return images


def _mask_image_stem(mask: Path) -> str:
    return mask.stem[: -len(MASK_SUFFIX)] if mask.stem.endswith(MASK_SUFFIX) else mask.stem


def validate_mvtec_category(category_root: str | Path, decode: bool = False, normal: str = "good") -> FolderSummary:
    """Check one category in MVTec AD layout (``test/<defect>/``, ``ground_truth/<defect>/``).

    Rules: ``test/`` holds at least one image; every mask matches an existing image
    ``test/<defect>/<stem>.*`` (mask named ``<stem>_mask.png`` or ``<stem>.png``); if the category
    has any mask, every anomalous image has one; masks have their image's size. A category with
    no ``ground_truth`` folder at all is valid but reported as having no masks. ``normal`` is the
    folder of normal images (``good``; BTech: ``ok``).
    """
    root = Path(category_root)
    test_dir = root / "test"
    if not root.is_dir():
        msg = f"Category folder not found: '{root}'. Check the data set root and category name."
        raise DatasetError(msg)
    if not test_dir.is_dir():
        msg = f"'{root}' has no 'test' folder. Expected MVTec AD layout: {root}/test/<good|defect>/<image>.png."
        raise DatasetError(msg)
    test_images = {d.name: list_images(d) for d in sorted(test_dir.iterdir()) if d.is_dir()}
    num_images = sum(len(v) for v in test_images.values())
    if num_images == 0:
        msg = f"No test images in '{test_dir}' (empty folder?). Add images under {test_dir}/<good|defect>/."
        raise DatasetError(msg)

    gt_dir = root / "ground_truth"
    masks = list_images(gt_dir, recursive=True) if gt_dir.is_dir() else []
    masks_by_image: dict[Path, Path] = {}
    by_stem: dict[tuple[str, str], list[Path]] = {}  # (defect, stem) -> images: linear, not images x masks
    for defect, paths in test_images.items():
        for path in paths:
            by_stem.setdefault((defect, path.stem), []).append(path)
    for mask in masks:
        defect = mask.parent.name
        stem = _mask_image_stem(mask)
        candidates = by_stem.get((defect, stem), [])
        if not candidates:
            msg = (
                f"Mask '{mask}' has no image: expected '{test_dir / defect / stem}.<ext>'. "
                "Delete the stray mask or add the missing image."
            )
            raise DatasetError(msg)
        masks_by_image[candidates[0]] = mask

    anomalous = [p for defect, paths in test_images.items() if defect != normal for p in paths]
    if masks:
        for image in anomalous:
            if image not in masks_by_image:
                msg = (
                    f"Anomalous image '{image}' has no mask; expected "
                    f"'{gt_dir / image.parent.name / (image.stem + MASK_SUFFIX)}.png'. Add the mask, or remove "
                    "all of this category's masks to use it for image-level labels only."
                )
                raise DatasetError(msg)
    for image, mask in masks_by_image.items():
        _check_pair(image, mask, decode)
    for paths in test_images.values():  # every other image too (good ones included): header or pixels
        for path in paths:
            if path not in masks_by_image:
                image_size(path, decode=decode)
    return FolderSummary(
        root=root,
        layout="mvtec_category",
        categories=(root.name,),
        num_images=num_images,
        num_masks=len(masks),
        categories_without_masks=() if masks or not anomalous else (root.name,),
    )


def find_categories(root: str | Path, marker: str = "test") -> list[str]:
    """Names of the sub-folders of ``root`` that look like categories: they have a ``marker`` folder
    (``test/`` in MVTec AD layout, ``test_public/`` in MVTec AD 2's)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and (d / marker).is_dir())


def validate_folder_dataset(root: str | Path, decode: bool = True) -> FolderSummary:
    """Validate a folder, detecting its layout, and raise :class:`DatasetError` on the first problem.

    * ``root/test/...`` -> one MVTec-layout category (:func:`validate_mvtec_category`);
    * ``root/<category>/test/...`` -> a whole MVTec-layout data set, every category checked;
    * ``root/good/`` beside other image folders (``bad/``, ``crack/`` ...) and optionally ``masks/`` ->
      a folder of good and bad images, as anomalib's ``Folder`` reads it (:func:`validate_good_bad_folder`);
    * anything else -> a plain image folder (searched recursively), as ``anomalib predict`` takes.
    """
    root = Path(root)
    if not root.exists():
        msg = (
            f"Data set folder not found: '{root}'. Check the path "
            "(generate the demo set with `python -m anomalib_zsad.data.demo`)."
        )
        raise DatasetError(msg)
    if root.is_dir() and (root / "test").is_dir():
        return validate_mvtec_category(root, decode=decode)
    categories = find_categories(root)
    if categories:
        summaries = [validate_mvtec_category(root / c, decode=decode) for c in categories]
        return FolderSummary(
            root=root,
            layout="mvtec_dataset",
            categories=tuple(categories),
            num_images=sum(s.num_images for s in summaries),
            num_masks=sum(s.num_masks for s in summaries),
            categories_without_masks=tuple(c for s in summaries for c in s.categories_without_masks),
        )
    if root.is_dir() and _normal_folder(root) is not None:
        return validate_good_bad_folder(root, decode=decode)
    images = validate_image_folder(root, decode=decode)
    return FolderSummary(root=root, layout="images", num_images=len(images))


NORMAL_FOLDER_NAMES = ("good", "normal", "ok")
MASK_FOLDER_NAMES = ("masks", "mask", "ground_truth", "gt")


def _normal_folder(root: Path) -> Path | None:
    for name in NORMAL_FOLDER_NAMES:
        if (root / name).is_dir() and list_images(root / name):
            return root / name
    return None


def validate_good_bad_folder(root: str | Path, decode: bool = True, normal_dir: str | None = None,
                             mask_dir: str | None = None) -> FolderSummary:
    """Check a folder of good and bad images as anomalib's ``Folder`` reads it.

    Layout: ``root/<normal_dir>/`` (default: the first of ``good``, ``normal``, ``ok`` that holds images)
    for normal images; every other sub-folder with images (``bad/``, ``crack/`` ...) for anomalous ones;
    optionally ``root/<mask_dir>/`` (default: ``masks``, ``mask``, ``ground_truth`` or ``gt``) with one mask
    per anomalous image, named ``<stem>.png`` or ``<stem>_mask.png``.

    Rules: every image and mask is readable (``decode=True``: every pixel); anomalous image names are
    unique across their folders when there are masks (``Folder`` pairs masks by name); every mask has
    its image and every anomalous image a mask (or no mask at all: image labels only); masks have their
    image's size. Raises :class:`DatasetError` on the first problem, naming the file and the fix.
    """
    root = Path(root)
    normal = root / normal_dir if normal_dir else _normal_folder(root)
    if normal is None or not normal.is_dir():
        msg = (f"'{root}' has no folder of normal images: expected {root}/good/ (or normal/, ok/) with images, "
               "beside the anomalous ones (e.g. bad/) and optionally masks/.")
        raise DatasetError(msg)
    masks_root = root / mask_dir if mask_dir else next(
        (root / n for n in MASK_FOLDER_NAMES if (root / n).is_dir()), None)
    anomalous_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and d not in {normal, masks_root}
                      and list_images(d)]
    normal_images = list_images(normal)
    by_stem: dict[str, Path] = {}
    for folder in anomalous_dirs:
        for image in list_images(folder):
            if image.stem in by_stem and masks_root is not None:
                msg = (f"Anomalous images '{by_stem[image.stem]}' and '{image}' share the name '{image.stem}', so a "
                       "mask cannot tell which one it belongs to. Rename one of them (and its mask).")
                raise DatasetError(msg)
            by_stem.setdefault(image.stem, image)
    masks = list_images(masks_root, recursive=True) if masks_root is not None else []
    paired: dict[Path, Path] = {}
    for mask in masks:
        image = by_stem.get(_mask_image_stem(mask))
        if image is None:
            msg = (f"Mask '{mask}' has no anomalous image named '{_mask_image_stem(mask)}.<ext>' in "
                   f"{', '.join(str(d) for d in anomalous_dirs) or 'any anomalous folder'}. Delete the stray mask "
                   "(a mask of a good image is not needed) or add the missing image.")
            raise DatasetError(msg)
        paired[image] = mask
    if masks:
        missing = [image for image in by_stem.values() if image not in paired]
        if missing:
            msg = (f"Anomalous image '{missing[0]}' has no mask; expected '{masks_root / missing[0].stem}.png' (or "
                   f"'{missing[0].stem}{MASK_SUFFIX}.png'). Add the masks of all {len(missing)} such image(s), or "
                   "remove the masks folder to use the images with labels only.")
            raise DatasetError(msg)
    for image, mask in paired.items():
        _check_pair(image, mask, decode)
    for image in [*normal_images, *(i for i in by_stem.values() if i not in paired)]:
        image_size(image, decode=decode)
    return FolderSummary(
        root=root,
        layout="good_bad",
        categories=(root.name,),
        num_images=len(normal_images) + len(by_stem),
        num_masks=len(masks),
        categories_without_masks=() if masks or not by_stem else (root.name,),
    )


def main(argv: Sequence[str] | None = None) -> FolderSummary | None:
    """``python -m anomalib_zsad.data.validation <folder> [--no-decode]``: check a folder, print what was found."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m anomalib_zsad.data.validation",
                                     description="Check a data set folder before training or testing on it.")
    parser.add_argument("folder")
    parser.add_argument("--no-decode", action="store_true", help="read headers only (fast), not every pixel")
    args = parser.parse_args(argv)
    try:
        summary = validate_folder_dataset(args.folder, decode=not args.no_decode)
    except DatasetError as error:
        parser.exit(2, f"error: {error}\n")
    masks = ("no masks (image labels only)" if not summary.num_masks else
             f"{summary.num_masks} masks" + (f"; without masks: {', '.join(summary.categories_without_masks)}"
                                             if summary.categories_without_masks else ""))
    print(f"{summary.root}: {summary.layout}, {len(summary.categories) or 1} categor"
          f"{'ies' if len(summary.categories) > 1 else 'y'}, {summary.num_images} images, {masks}: OK")
    return summary


if __name__ == "__main__":
    main()


def validate_samples(
    image_paths: Iterable[str | Path],
    mask_paths: Iterable[str | Path | Sequence[str | Path] | None],
    labels: Iterable[int],
    source: str,
    decode: bool = False,
    check_files: bool = True,
) -> bool:
    """Check the images and image/mask pairs of an already indexed data set (any anomalib datamodule).

    Every image's header is read (``decode=True``: its pixels too), normal images included, so a
    zero-byte or non-image file fails here rather than mid-epoch. ``check_files=False`` skips the
    file checks (the caller has made them) and only checks that masks are all there or all absent.

    An image may have several masks (a list: MVTec LOCO's one mask per defect); each is checked
    against the image.

    Returns True when every anomalous sample (label 1) has a mask, False when none has one.
    Raises :class:`DatasetError` when only some have masks, a file is unreadable/missing, or a
    mask's size differs from its image's.
    """
    with_mask, without_mask = [], []
    for image, mask, label in zip(image_paths, mask_paths, labels, strict=True):
        masks = [m for m in (mask if isinstance(mask, list | tuple) else [mask])
                 if isinstance(m, str | Path) and str(m) not in {"", "nan", "None"}]
        if int(label) == 1:
            (with_mask if masks else without_mask).append(Path(image))
        if not check_files:
            continue
        if masks and int(label) == 1:
            for one in masks:
                _check_pair(Path(image), Path(one), decode)
        else:
            image_size(image, decode=decode)
    if with_mask and without_mask:
        msg = (
            f"{source}: {len(without_mask)} anomalous image(s) have no mask (e.g. '{without_mask[0]}') while "
            f"{len(with_mask)} have one. Provide a mask for every anomalous image, or none."
        )
        raise DatasetError(msg)
    return bool(with_mask) or not without_mask
