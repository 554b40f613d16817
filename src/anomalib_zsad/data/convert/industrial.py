"""Converters for the industrial sets anomalib 2.7 has no datamodule for: SDD, KSDD2, DAGM, DTD-Synthetic.

Each reads the layout its owners publish (described in ``docs/data.md`` with where to download it)
and splits the images as the zero-shot papers do; the layouts were read from the official
repositories' data scripts (AnomalyCLIP ``generate_dataset_json/``, AdaCLIP ``data_preprocess/``,
Bayes-PFL ``dataset/datasets/``) and the data sets' own descriptions.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from anomalib_zsad.data.convert._writer import (
    Writer,
    binary_mask,
    child,
    find_folder,
    images_in,
    layout_error,
    progress,
)
from anomalib_zsad.data.errors import DatasetError

SDD_LAYOUT = ("KolektorSDD as published (vicos.si): <folder>/kos01 ... kos50/, each with PartN.jpg and its "
              "PartN_label.bmp")
KSDD2_LAYOUT = ("KolektorSDD2 as published (vicos.si): <folder>/train/ and <folder>/test/, each with <id>.png and "
                "its <id>_GT.png")
DAGM_LAYOUT = ("DAGM 2007 as published (HCI Heidelberg / Kaggle 'DAGM_KaggleUpload'): <folder>/Class1 ... Class10/, "
               "each with Train/ and Test/ holding NNNN.PNG and Label/NNNN_label.PNG for the defective ones")
DTD_LAYOUT = ("DTD-Synthetic as published (Aota et al.): <folder>/<Texture_NNN>/train/good/, test/good/, "
              "test/<defect>/ and ground_truth/<defect>/<stem>_mask.png")

_KOS = re.compile(r"^kos\d+$", re.IGNORECASE)
_DAGM_CLASS = re.compile(r"^class\d+$", re.IGNORECASE)


def _load(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image)
    except (OSError, ValueError) as error:
        msg = f"Cannot read image '{path}': {error}. Re-download the data set or replace the file."
        raise DatasetError(msg) from error


# ------------------------------------------------------------------------------------------- SDD
def _sdd_parts(folder: Path) -> list[tuple[Path, Path]]:
    files = images_in(folder)
    labels = {p.stem.lower(): p for p in files if p.stem.lower().endswith("_label")}
    pairs = []
    for image in files:
        if image.stem.lower().endswith("_label") or image.suffix.lower() != ".jpg":
            continue
        label = labels.get(f"{image.stem.lower()}_label")
        if label is None:
            msg = f"'{image}' has no label image '{image.stem}_label.bmp' beside it; the download is incomplete."
            raise DatasetError(msg)
        pairs.append((image, label))
    return pairs


def convert_sdd(source: Path, writer: Writer, pieces: int = 2, test_fraction: float = 0.25, seed: int = 42,
                category: str = "electrical_commutators") -> None:
    """KolektorSDD (SDD) as AnomalyCLIP evaluates it (Appendix B and Table 6).

    Every image (500 x ~1250 px) is cut into ``pieces`` horizontal bands of equal height (AnomalyCLIP:
    2, "vertically divide the original 500 x 1,250 image into two images"; AdaCLIP's
    ``data_preprocess/sdd-pre.py``: 3), each band with its part of the label. A band with any labelled
    pixel is anomalous (``test/defect``); the normal bands are split by scikit-learn's
    ``train_test_split(test_size=test_fraction, random_state=seed)`` over their sorted names into
    ``test/good`` and ``train/good`` (AdaCLIP's split; with 2 bands it gives AnomalyCLIP's 181 normal
    and 74 anomalous test images). Band names: ``<kos>_<Part>_<band>.png``.
    """
    from sklearn.model_selection import train_test_split

    root = find_folder(source, lambda f: any(_KOS.match(c.name) for c in f.iterdir() if c.is_dir()))
    if root is None:
        raise layout_error("KolektorSDD (sdd)", source, SDD_LAYOUT, "no kosNN folder was found")
    if pieces < 1 or not 0.0 < test_fraction < 1.0:
        msg = f"pieces must be >= 1 and test_fraction in (0, 1); got {pieces} and {test_fraction}."
        raise DatasetError(msg)
    pairs = [(kos.name, image, label) for kos in sorted(c for c in root.iterdir() if c.is_dir() and _KOS.match(c.name))
             for image, label in _sdd_parts(kos)]
    if not pairs:
        raise layout_error("KolektorSDD (sdd)", source, SDD_LAYOUT, f"the kosNN folders in '{root}' hold no PartN.jpg")
    bands: list[tuple[str, Path, Path, int, bool]] = []  # name, image, label, band, defective
    for kos, image, label in progress(pairs, len(pairs), "sdd: reading labels"):
        mask = binary_mask(label)
        height = mask.shape[0]
        for band in range(pieces):
            rows = mask[band * height // pieces:(band + 1) * height // pieces]
            bands.append((f"{kos}_{image.stem}_{band}", image, label, band, bool(rows.any())))
    normal = sorted(b[0] for b in bands if not b[4])
    test_normal = set(train_test_split(normal, test_size=test_fraction, random_state=seed)[1] if len(normal) > 1
                      else normal)
    for name, image, label, band, defective in progress(bands, len(bands), "sdd: writing bands"):
        array = _load(image)
        mask = binary_mask(label)
        if array.shape[:2] != mask.shape:
            msg = f"'{label}' is {mask.shape[1]}x{mask.shape[0]} but '{image}' is {array.shape[1]}x{array.shape[0]}."
            raise DatasetError(msg)
        height = array.shape[0]
        rows = slice(band * height // pieces, (band + 1) * height // pieces)
        if defective:
            written = writer.save(np.ascontiguousarray(array[rows]), category, "test", "defect", name)
            writer.mask(np.ascontiguousarray(mask[rows]), category, "defect", written)
        else:
            split = "test" if name in test_normal else "train"
            writer.save(np.ascontiguousarray(array[rows]), category, split, "good", name)


# ------------------------------------------------------------------------------------------- KSDD2
def _ksdd2_pairs(folder: Path) -> list[tuple[Path, Path]]:
    files = images_in(folder)
    masks = {p.stem[:-3].lower(): p for p in files if p.stem.upper().endswith("_GT")}
    pairs = []
    for image in files:
        if image.stem.upper().endswith("_GT"):
            continue
        mask = masks.get(image.stem.lower())
        if mask is None:
            msg = f"'{image}' has no '{image.stem}_GT.png' beside it; the KolektorSDD2 download is incomplete."
            raise DatasetError(msg)
        pairs.append((image, mask))
    return pairs


def convert_ksdd2(source: Path, writer: Writer, balanced: bool = False, category: str = "metal") -> None:
    """KolektorSDD2 (KSDD2): the official test split is the test set; the normal training images are ``train/good``.

    An image is anomalous when its ``_GT`` mask has a labelled pixel (``test/defect``, mask kept); normal
    ones go to ``test/good``. ``balanced=True`` keeps only as many normal test images as anomalous ones
    (the first by name), as Bayes-PFL's loader (``dataset/datasets/KSDD2.py``) does. Category ``metal``
    follows Bayes-PFL.
    """
    root = find_folder(source, lambda f: all(any(p.stem.upper().endswith("_GT") for p in images_in(f / s))
                                             for s in ("train", "test")))
    if root is None:
        raise layout_error("KolektorSDD2 (ksdd2)", source, KSDD2_LAYOUT,
                           "no folder with train/ and test/ holding *_GT.png masks was found")
    test = [(image, mask, binary_mask(mask)) for image, mask in progress(
        _ksdd2_pairs(root / "test"), None, "ksdd2: reading test masks")]
    anomalous = [t for t in test if t[2].any()]
    normal = [t for t in test if not t[2].any()]
    if balanced:
        normal = normal[:len(anomalous)]
    for image, _, mask in progress(anomalous, len(anomalous), "ksdd2: anomalous"):
        written = writer.copy(image, category, "test", "defect")
        writer.mask(mask, category, "defect", written)
    for image, _, _ in progress(normal, len(normal), "ksdd2: normal"):
        writer.copy(image, category, "test", "good")
    train = _ksdd2_pairs(root / "train")
    for image, mask in progress(train, len(train), "ksdd2: training images"):
        if not binary_mask(mask).any():
            writer.copy(image, category, "train", "good")


# ------------------------------------------------------------------------------------------- DAGM
def _dagm_split(folder: Path) -> tuple[list[Path], dict[str, Path]]:
    labels_dir = child(folder, "Label", "Labels")
    labels = {}
    for label in images_in(labels_dir) if labels_dir else []:
        stem = label.stem[:-len("_label")] if label.stem.lower().endswith("_label") else label.stem
        labels[stem.lower()] = label
    return images_in(folder), labels


def convert_dagm(source: Path, writer: Writer) -> None:
    """DAGM 2007 as AnomalyCLIP evaluates it (``generate_dataset_json/DAGM.py``, Table 6: 6,996 + 1,054).

    Per class, the official ``Test`` folder is the test set: an image with a ``Label/<stem>_label.PNG``
    is anomalous (``test/defect``, its label binarised as the mask; DAGM's labels are ellipses around
    the defect), the others are ``test/good``; the normal images of ``Train`` are ``train/good``.
    Categories keep the class names (``Class1`` ... ``Class10``).
    """
    root = find_folder(source, lambda f: any(_DAGM_CLASS.match(c.name) and child(c, "Test") for c in f.iterdir()
                                             if c.is_dir()))
    if root is None:
        raise layout_error("DAGM 2007 (dagm)", source, DAGM_LAYOUT, "no ClassN folder with a Test/ folder was found")
    classes = sorted((c for c in root.iterdir() if c.is_dir() and _DAGM_CLASS.match(c.name)),
                     key=lambda c: int(c.name[5:]))
    for cls in classes:
        for split_name, split in (("Test", "test"), ("Train", "train")):
            folder = child(cls, split_name)
            if folder is None:
                if split == "test":
                    raise layout_error("DAGM 2007 (dagm)", source, DAGM_LAYOUT, f"'{cls}' has no Test/ folder")
                continue
            images, labels = _dagm_split(folder)
            stray = sorted(set(labels) - {i.stem.lower() for i in images})
            if stray:
                msg = f"'{labels[stray[0]]}' labels no image of '{folder}'; the DAGM download is incomplete."
                raise DatasetError(msg)
            for image in progress(images, len(images), f"dagm: {cls.name}/{split_name}"):
                label = labels.get(image.stem.lower())
                if split == "train":
                    if label is None:
                        writer.copy(image, cls.name, "train", "good")
                elif label is None:
                    writer.copy(image, cls.name, "test", "good")
                else:
                    written = writer.copy(image, cls.name, "test", "defect")
                    writer.mask(binary_mask(label), cls.name, "defect", written)


# ------------------------------------------------------------------------------------------- DTD-Synthetic
def _dtd_mask(ground_truth: Path, image: Path) -> Path:
    for candidate in images_in(ground_truth):
        if candidate.stem.lower() in {f"{image.stem.lower()}_mask", image.stem.lower()}:
            return candidate
    msg = f"Anomalous image '{image}' has no mask in '{ground_truth}' (expected {image.stem}_mask.png)."
    raise DatasetError(msg)


def convert_dtd(source: Path, writer: Writer) -> None:
    """DTD-Synthetic: already in MVTec AD layout (AnomalyCLIP's ``generate_dataset_json/DTD.py`` reads it so);
    copied with masks binarised and named ``<stem>_mask.png`` after a check that every anomalous image
    has one of its size. ``MVTecAD(root=<download>)`` also reads the download as it is."""
    def is_category(folder: Path) -> bool:
        return child(folder, "test") is not None and child(folder, "ground_truth") is not None

    root = find_folder(source, lambda f: any(is_category(c) for c in f.iterdir() if c.is_dir()))
    if root is None:
        raise layout_error("DTD-Synthetic (dtd)", source, DTD_LAYOUT,
                           "no category folder with test/ and ground_truth/ was found")
    for category in sorted(c for c in root.iterdir() if c.is_dir() and is_category(c)):
        train = child(category / "train", "good") if (category / "train").is_dir() else None
        for image in images_in(train) if train else []:
            writer.copy(image, category.name, "train", "good")
        for defect in sorted(d for d in (category / "test").iterdir() if d.is_dir()):
            images = images_in(defect)
            for image in progress(images, len(images), f"dtd: {category.name}/{defect.name}"):
                if defect.name == "good":
                    writer.copy(image, category.name, "test", "good")
                    continue
                written = writer.copy(image, category.name, "test", defect.name)
                writer.mask(binary_mask(_dtd_mask(category / "ground_truth" / defect.name, image)), category.name,
                            defect.name, written)
