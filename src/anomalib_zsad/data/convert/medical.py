"""Converters for the medical sets of the zero-shot papers (AnomalyCLIP Tables 2-3, AdaCLIP, Bayes-PFL).

Image labels only (no masks; image metrics only): HeadCT, BrainMRI, Br35H, COVID-19. Anomalous images
with masks only (no normal images; pixel metrics only): ISIC, CVC-ClinicDB, CVC-ColonDB, Kvasir, Endo,
TN3K. Every image is a test image, as in the papers (AnomalyCLIP Appendix B: "we just use the test
data"); there is no ``train/`` folder. Category names are those of AnomalyCLIP's
``generate_dataset_json/`` scripts (``brain``, ``chest``, ``skin``, ``colon``, ``thyroid``).
"""

from __future__ import annotations

import csv
from pathlib import Path

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

HEADCT_LAYOUT = ("Head CT - hemorrhage as published (Kaggle, Kitamura): <folder>/labels.csv (columns id, hemorrhage) "
                 "and <folder>/head_ct/NNN.png")
YES_NO_LAYOUT = "{name} as published (Kaggle): <folder>/yes/ (tumour) and <folder>/no/ (normal) image folders"
COVID_LAYOUT = ("COVID-19 Radiography Database as published (Kaggle): <folder>/COVID(-19)/ and <folder>/NORMAL|Normal/ "
                "image folders (images directly or in images/)")
ISIC_LAYOUT = ("ISIC 2016 (ISBI 2016 challenge, part 1 test set) as published: "
               "ISBI2016_ISIC_Part1_Test_Data/ISIC_N.jpg and "
               "ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_N_Segmentation.png below <folder>")
PAIRED_LAYOUT = "{name} as published: <folder>/{images}/ and <folder>/{masks}/ with one mask per image, named as it"
CLINICDB_LAYOUT = (PAIRED_LAYOUT.format(name="CVC-ClinicDB (figshare 'Polyp DataSet')", images="images", masks="masks")
                   + ", or the original <folder>/Original/ and <folder>/Ground Truth/ (.tif)")
COLONDB_LAYOUT = PAIRED_LAYOUT.format(name="CVC-ColonDB (figshare 'Polyp DataSet')", images="images", masks="masks")
KVASIR_LAYOUT = PAIRED_LAYOUT.format(name="Kvasir-SEG", images="images", masks="masks")
ENDO_LAYOUT = PAIRED_LAYOUT.format(name="EndoTect 2020 segmentation test set", images="images", masks="masks")
TN3K_LAYOUT = "TN3K as published (TRFE-Net repository): <folder>/test-image/N.jpg and <folder>/test-mask/N.jpg"


# ------------------------------------------------------------------------------------------- image labels only
def convert_headct(source: Path, writer: Writer, category: str = "brain") -> None:
    """HeadCT: the 200 CT slices (100 normal, 100 with haemorrhage) as ``brain/test/good`` and
    ``brain/test/hemorrhage``, by ``labels.csv`` (as AdaCLIP's ``data_preprocess/headct-pre.py`` reads it)."""
    def has_labels(folder: Path) -> bool:
        return (folder / "labels.csv").is_file() and child(folder, "head_ct") is not None

    root = find_folder(source, has_labels)
    if root is None:
        raise layout_error("HeadCT (headct)", source, HEADCT_LAYOUT, "no labels.csv beside a head_ct/ folder was found")
    images_dir = child(root, "head_ct")
    nested = child(images_dir, "head_ct")  # Kaggle's archive repeats the folder
    if not images_in(images_dir) and nested is not None:
        images_dir = nested
    by_stem = {p.stem: p for p in images_in(images_dir)}
    with (root / "labels.csv").open(newline="") as file:
        rows = [[cell.strip() for cell in row] for row in csv.reader(file) if row]
    if not rows or not rows[0] or rows[0][0].lower() != "id":
        raise layout_error("HeadCT (headct)", source, HEADCT_LAYOUT, f"'{root / 'labels.csv'}' has no 'id' header")
    for image_id, label, *_ in progress(rows[1:], len(rows) - 1, "headct"):
        image = by_stem.get(f"{int(image_id):03d}") or by_stem.get(image_id)
        if image is None:
            msg = f"labels.csv lists image {image_id} but '{images_dir}' has no {int(image_id):03d}.png."
            raise DatasetError(msg)
        writer.copy(image, category, "test", "hemorrhage" if int(float(label)) else "good")


def _convert_yes_no(name: str, source: Path, writer: Writer, category: str, prefer: str | None = None) -> None:
    def has_yes_no(folder: Path) -> bool:
        yes, no = child(folder, "yes"), child(folder, "no")
        return yes is not None and no is not None and bool(images_in(yes)) and bool(images_in(no))

    root = None
    if prefer is not None:
        root = find_folder(source, lambda f: f.name.lower() == prefer and has_yes_no(f))
    root = root or find_folder(source, has_yes_no)
    if root is None:
        raise layout_error(name, source, YES_NO_LAYOUT.format(name=name.split(" (", maxsplit=1)[0]),
                           "no folder with yes/ and no/ image folders was found")
    for folder, label in ((child(root, "no"), "good"), (child(root, "yes"), "tumor")):
        images = images_in(folder)
        for image in progress(images, len(images), f"{name}: {folder.name}"):
            writer.copy(image, category, "test", label)


def convert_brainmri(source: Path, writer: Writer, category: str = "brain") -> None:
    """BrainMRI (Kaggle, Chakrabarty): ``no/`` (98) as ``brain/test/good``, ``yes/`` (155) as
    ``brain/test/tumor``. The archive holds the same images twice (top level and
    ``brain_tumor_dataset/``); the latter is read (AnomalyCLIP's ``generate_dataset_json/brainmri.py``)."""
    _convert_yes_no("BrainMRI (brainmri)", source, writer, category, prefer="brain_tumor_dataset")


def convert_br35h(source: Path, writer: Writer, category: str = "brain") -> None:
    """Br35H (Kaggle, Hamada): ``no/`` (1,500) as ``brain/test/good``, ``yes/`` (1,500) as ``brain/test/tumor``.
    The unlabelled ``pred/`` folder is left out (AnomalyCLIP's Table 6 counts 1,500 + 1,500)."""
    _convert_yes_no("Br35H (br35h)", source, writer, category)


def _images_of(folder: Path) -> list[Path]:
    nested = child(folder, "images")
    return images_in(nested) if nested is not None and not images_in(folder) else images_in(folder)


def convert_covid19(source: Path, writer: Writer, category: str = "chest") -> None:
    """COVID-19 Radiography Database: ``NORMAL``/``Normal`` as ``chest/test/good``, ``COVID-19``/``COVID`` as
    ``chest/test/covid``; the other classes (viral pneumonia, lung opacity) and the *lung* masks of later
    releases are left out: the masks outline lungs, not anomalies, so the set has image labels only. The
    first release (219 COVID + 1,341 normal) gives AnomalyCLIP's Table 6 counts."""
    def find(folder: Path) -> tuple[Path | None, Path | None]:
        return child(folder, "NORMAL", "Normal"), child(folder, "COVID-19", "COVID")

    root = find_folder(source, lambda f: all(x is not None and _images_of(x) for x in find(f)))
    if root is None:
        raise layout_error("COVID-19 (covid19)", source, COVID_LAYOUT, "no folder with both classes was found")
    normal, covid = find(root)
    for folder, label in ((normal, "good"), (covid, "covid")):
        images = _images_of(folder)
        for image in progress(images, len(images), f"covid19: {folder.name}"):
            writer.copy(image, category, "test", label)


# ----------------------------------------------------------------------------------- anomalous images with masks
def _paired(images: list[Path], masks: list[Path], suffix: str = "") -> list[tuple[Path, Path]]:
    by_stem = {m.stem.lower(): m for m in masks}
    pairs, missing = [], []
    for image in images:
        mask = by_stem.get(f"{image.stem.lower()}{suffix}")
        if mask is None:
            missing.append(image)
        else:
            pairs.append((image, mask))
    if missing:
        msg = (f"{len(missing)} image(s) have no mask, e.g. '{missing[0]}' (expected '{missing[0].stem}{suffix}.*' "
               f"in '{masks[0].parent if masks else '<masks folder>'}'); the download is incomplete.")
        raise DatasetError(msg)
    return pairs


def _write_pairs(name: str, pairs: list[tuple[Path, Path]], writer: Writer, category: str, defect: str) -> None:
    for image, mask in progress(pairs, len(pairs), name):
        written = writer.copy(image, category, "test", defect)
        writer.mask(binary_mask(mask), category, defect, written)


def convert_isic(source: Path, writer: Writer, category: str = "skin") -> None:
    """ISIC 2016 part 1 test set (379 dermoscopy images, all with a lesion): ``skin/test/lesion`` with the
    ``_Segmentation.png`` masks (AnomalyCLIP ``generate_dataset_json/isbi.py``). No normal images:
    pixel metrics only."""
    data = find_folder(source, lambda f: f.name.lower() == "isbi2016_isic_part1_test_data", depth=3)
    truth = find_folder(source, lambda f: f.name.lower() == "isbi2016_isic_part1_test_groundtruth", depth=3)
    if data is None or truth is None:
        missing = "ISBI2016_ISIC_Part1_Test_Data" if data is None else "ISBI2016_ISIC_Part1_Test_GroundTruth"
        raise layout_error("ISIC 2016 (isic)", source, ISIC_LAYOUT, f"{missing} was not found")
    _write_pairs("isic", _paired(images_in(data), images_in(truth), "_segmentation"), writer, category, "lesion")


def _convert_paired(name: str, source: Path, writer: Writer, category: str, defect: str,
                    folder_pairs: tuple[tuple[str, str], ...], layout: str) -> None:
    def pair_in(folder: Path) -> tuple[Path, Path] | None:
        for images, masks in folder_pairs:
            found = child(folder, images), child(folder, masks)
            if found[0] is not None and found[1] is not None and images_in(found[0]):
                return found
        return None

    root = find_folder(source, lambda f: pair_in(f) is not None)
    if root is None:
        raise layout_error(name, source, layout,
                           f"no folder with {' or '.join(f'{i}/ and {m}/' for i, m in folder_pairs)} was found")
    images, masks = pair_in(root)
    _write_pairs(name, _paired(images_in(images), images_in(masks)), writer, category, defect)


def convert_clinicdb(source: Path, writer: Writer, category: str = "colon") -> None:
    """CVC-ClinicDB (612 colonoscopy frames with a polyp): ``colon/test/polyp`` with masks. Reads the polyp
    collection's layout (``images/`` + ``masks/``, figshare "Polyp DataSet") or the original one
    (``Original/`` + ``Ground Truth/`` .tif)."""
    _convert_paired("CVC-ClinicDB (clinicdb)", source, writer, category, "polyp",
                    (("images", "masks"), ("Original", "Ground Truth")), CLINICDB_LAYOUT)


def convert_colondb(source: Path, writer: Writer, category: str = "colon") -> None:
    """CVC-ColonDB (380 frames with a polyp): ``colon/test/polyp`` with masks (``images/`` + ``masks/``)."""
    _convert_paired("CVC-ColonDB (colondb)", source, writer, category, "polyp", (("images", "masks"),), COLONDB_LAYOUT)


def convert_kvasir(source: Path, writer: Writer, category: str = "colon") -> None:
    """Kvasir-SEG (1,000 frames with a polyp): ``colon/test/polyp`` with masks (``images/`` + ``masks/``;
    the JPEG masks of the original archive are thresholded at 127)."""
    _convert_paired("Kvasir-SEG (kvasir)", source, writer, category, "polyp", (("images", "masks"),), KVASIR_LAYOUT)


def convert_endo(source: Path, writer: Writer, category: str = "colon") -> None:
    """Endo (EndoTect 2020 segmentation test set, 200 frames): ``colon/test/polyp`` with masks
    (``images/`` + ``masks/``, as AnomalyCLIP's ``generate_dataset_json/endoTect.py`` reads it)."""
    _convert_paired("Endo (endo)", source, writer, category, "polyp", (("images", "masks"),), ENDO_LAYOUT)


def convert_tn3k(source: Path, writer: Writer, category: str = "thyroid") -> None:
    """TN3K test set (614 thyroid ultrasound images with a nodule): ``thyroid/test/nodule`` with masks, from
    ``test-image/`` + ``test-mask/`` (AnomalyCLIP ``generate_dataset_json/tn3k.py``); the trainval part is
    not used by the papers."""
    _convert_paired("TN3K (tn3k)", source, writer, category, "nodule", (("test-image", "test-mask"),), TN3K_LAYOUT)
