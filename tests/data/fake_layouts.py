"""Tiny fake downloads in each data set's published layout (file names and folders as published, images generated).

Every writer returns what a correct reading must find (counts), so the tests compare against the layout
they built rather than against numbers repeated by hand. Images are a few pixels wide: the tests check
indexing, splitting and mask alignment, not pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

RNG = np.random.default_rng(0)


def image(path: Path, size: tuple[int, int] = (12, 16), gray: bool = False) -> Path:
    """A random image of ``size`` (height, width) written in the format of ``path``'s extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = size if gray else (*size, 3)
    Image.fromarray(RNG.integers(0, 255, shape, dtype=np.uint8)).save(path)
    return path


def mask(path: Path, size: tuple[int, int] = (12, 16), box: tuple[int, int, int, int] | None = (2, 6, 3, 9),
         value: int = 255, noise: bool = False) -> Path:
    """A mask of ``size`` with ``box`` (top, bottom, left, right) set to ``value`` (``None``: empty).
    ``noise`` adds the small values a JPEG mask has around its edges."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros(size, np.uint8)
    if box is not None:
        top, bottom, left, right = box
        array[top:bottom, left:right] = value
    if noise:
        array[0, 0] = 9
    Image.fromarray(array).save(path)
    return path


# ------------------------------------------------------------------------------------------- industrial sets, for the converters
def kolektorsdd(root: Path) -> dict[str, int]:
    """KolektorSDD: kos01..kos03 with Part0..Part3.jpg (24 x 8 px) and PartN_label.bmp.

    Defects: kos01/Part1 in the top rows, kos02/Part2 across the middle (both halves, two of three thirds)."""
    defects = {("kos01", 1): (1, 5, 2, 5), ("kos02", 2): (7, 13, 2, 5)}
    for k in range(1, 4):
        for part in range(4):
            folder = root / "KolektorSDD" / f"kos{k:02d}"
            image(folder / f"Part{part}.jpg", (24, 8), gray=True)
            mask(folder / f"Part{part}_label.bmp", (24, 8), defects.get((f"kos{k:02d}", part)))
    return {"images": 12, "defective_halves": 3, "defective_thirds": 3}


def kolektorsdd2(root: Path) -> dict[str, int]:
    """KolektorSDD2: train/ and test/ with <id>.png and <id>_GT.png (3 defective + 4 good test images)."""
    names = {"test": [(10000 + i, i < 3) for i in range(7)], "train": [(20000 + i, i < 1) for i in range(3)]}
    for split, items in names.items():
        for number, defective in items:
            image(root / split / f"{number}.png")
            mask(root / split / f"{number}_GT.png", box=(2, 6, 3, 9) if defective else None)
    return {"test_anomalous": 3, "test_normal": 4, "train_normal": 2}


def dagm(root: Path) -> dict[str, int]:
    """DAGM 2007 (Kaggle upload): Class1, Class2 with Train/ and Test/, Label/NNNN_label.PNG and Labels.txt."""
    for cls in ("Class1", "Class2"):
        for split, defective in (("Train", {2}), ("Test", {1, 3})):
            folder = root / "DAGM_KaggleUpload" / cls / split
            lines = []
            for number in range(5):
                image(folder / f"{number:04d}.PNG", gray=True)
                if number in defective:
                    mask(folder / "Label" / f"{number:04d}_label.PNG")
                lines.append(f"{number}\t{int(number in defective)}")
            (folder / "Label" / "Labels.txt").write_text("\n".join(lines))
    return {"categories": 2, "test_anomalous": 2, "test_normal": 3, "train_normal": 4}


def dtd_synthetic(root: Path) -> dict[str, int]:
    """DTD-Synthetic: Woven_001, Blotchy_099 in MVTec layout with ground_truth/bad/<stem>_mask.png."""
    for texture in ("Woven_001", "Blotchy_099"):
        folder = root / "DTD-Synthetic" / texture
        for i in range(2):
            image(folder / "train" / "good" / f"{i:03d}.png")
            image(folder / "test" / "good" / f"{i:03d}.png")
            image(folder / "test" / "bad" / f"{i:03d}.png")
            mask(folder / "ground_truth" / "bad" / f"{i:03d}_mask.png", value=1)
    return {"categories": 2, "test_anomalous": 2, "test_normal": 2, "train_normal": 2}


# ------------------------------------------------------------------------------------------- medical sets, for the converters
def headct(root: Path) -> dict[str, int]:
    """Head CT - hemorrhage (Kaggle): labels.csv ("id, hemorrhage") and head_ct/head_ct/NNN.png."""
    labels = [0, 1, 1, 0, 1]
    for i in range(len(labels)):
        image(root / "head_ct" / "head_ct" / f"{i:03d}.png", gray=True)
    (root / "labels.csv").write_text("id, hemorrhage\n" + "".join(f"{i}, {v}\n" for i, v in enumerate(labels)))
    return {"test_normal": 2, "test_anomalous": 3}


def yes_no(root: Path, duplicate: str | None = None, extra: str | None = None) -> dict[str, int]:
    """BrainMRI / Br35H (Kaggle): yes/ and no/ (mixed extensions); a duplicate tree and an unlabelled folder."""
    for folder in [root, *([root / duplicate] if duplicate else [])]:
        for i in range(3):
            image(folder / "yes" / (f"Y{i}.jpg" if i else f"Y{i}.JPG"))
        for i in range(2):
            image(folder / "no" / f"no {i}.jpeg")
    if extra:
        image(root / extra / "pred0.jpg")
    return {"test_normal": 2, "test_anomalous": 3}


def covid(root: Path, release: str) -> dict[str, int]:
    """COVID-19 Radiography Database: the first release (COVID-19/, NORMAL/, Viral Pneumonia/) or a later one
    (COVID/images + COVID/masks (lung masks), Normal/images, Lung_Opacity/images, metadata .xlsx)."""
    base = root / "COVID-19 Radiography Database"
    if release == "first":
        for name, count in (("COVID-19", 2), ("NORMAL", 3), ("Viral Pneumonia", 2)):
            for i in range(count):
                image(base / name / f"{name} ({i + 1}).png", gray=True)
    else:
        for name, count in (("COVID", 2), ("Normal", 3), ("Lung_Opacity", 2)):
            for i in range(count):
                image(base / name / "images" / f"{name}-{i + 1}.png", gray=True)
                mask(base / name / "masks" / f"{name}-{i + 1}.png")
        (base / "COVID.metadata.xlsx").write_bytes(b"")
    return {"test_normal": 3, "test_anomalous": 2}


def isic(root: Path) -> dict[str, int]:
    """ISIC 2016 part 1 test: ISBI2016_ISIC_Part1_Test_Data/ISIC_N.jpg + ..._GroundTruth/ISIC_N_Segmentation.png."""
    for i in (3, 12, 15):
        image(root / "ISBI2016_ISIC_Part1_Test_Data" / f"ISIC_{i:07d}.jpg")
        mask(root / "ISBI2016_ISIC_Part1_Test_GroundTruth" / f"ISIC_{i:07d}_Segmentation.png")
    return {"test_normal": 0, "test_anomalous": 3}


def polyps(root: Path, images: str = "images", masks: str = "masks", ext: str = ".png",
           mask_ext: str = ".png") -> dict[str, int]:
    """A polyp set: images/ + masks/ (figshare "Polyp DataSet", Kvasir-SEG with JPEG masks), or CVC-ClinicDB's
    original Original/ + Ground Truth/ (.tif)."""
    for i in (1, 2, 10):
        image(root / images / f"{i}{ext}")
        mask(root / masks / f"{i}{mask_ext}", noise=mask_ext == ".jpg")
    return {"test_normal": 0, "test_anomalous": 3}


def tn3k(root: Path) -> dict[str, int]:
    """TN3K: tn3k/test-image/N.jpg + tn3k/test-mask/N.jpg (and trainval-*, not used)."""
    for i in range(3):
        image(root / "tn3k" / "test-image" / f"{i:04d}.jpg", gray=True)
        mask(root / "tn3k" / "test-mask" / f"{i:04d}.jpg")
    image(root / "tn3k" / "trainval-image" / "0000.jpg", gray=True)
    mask(root / "tn3k" / "trainval-mask" / "0000.jpg")
    return {"test_normal": 0, "test_anomalous": 3}


# ------------------------------------------------------------------------------------------- sets anomalib reads itself
def mvtec_like(category_root: Path, normal: str = "good", defect: str = "dent", image_ext: str = ".png",
               mask_name: str = "{stem}_mask.png", train: int = 2, good: int = 2, bad: int = 2) -> dict[str, int]:
    """MVTec AD / MPDD / BTech layout: train/<normal>, test/<normal>, test/<defect>, ground_truth/<defect>."""
    for i in range(train):
        image(category_root / "train" / normal / f"{i:03d}{image_ext}")
    for i in range(good):
        image(category_root / "test" / normal / f"{100 + i:03d}{image_ext}")
    for i in range(bad):
        image(category_root / "test" / defect / f"{i:03d}{image_ext}")
        mask(category_root / "ground_truth" / defect / mask_name.format(stem=f"{i:03d}"))
    return {"test_normal": good, "test_anomalous": bad}


def kolektor(root: Path) -> dict[str, int]:
    """Kolektor (KolektorSDD read by anomalib): kos01, kos02 with PartN.jpg + PartN_label.bmp; 2 defective of 10.

    anomalib's test split is every defective image and 20 % of the good ones (``random_state=42``)."""
    for k in (1, 2):
        for part in range(5):
            image(root / f"kos{k:02d}" / f"Part{part}.jpg", gray=True)
            mask(root / f"kos{k:02d}" / f"Part{part}_label.bmp", box=(2, 6, 3, 9) if part == 3 else None)
    return {"test_anomalous": 2, "good": 8}


def bmad(root: Path, category: str = "Brain") -> dict[str, int]:
    """BMAD (anomalib's layout): train/good/*.png, valid|test/{good,Ungood}/{img,label}/*.png."""
    folder = root / category
    for i in range(2):
        image(folder / "train" / "good" / f"{i:05d}.png")
    for split in ("valid", "test"):
        for i in range(2):
            image(folder / split / "good" / "img" / f"{100 + i:05d}.png")
            mask(folder / split / "good" / "label" / f"{100 + i:05d}.png", box=None)
        for i in range(3):
            image(folder / split / "Ungood" / "img" / f"{i:05d}.png")
            mask(folder / split / "Ungood" / "label" / f"{i:05d}.png")
    return {"test_normal": 2, "test_anomalous": 3}


def bmad_image_level(root: Path, category: str = "Chest") -> dict[str, int]:
    """A BMAD category without masks (Chest, Histopathology, Retina_OCT2017): {train,valid,test}/{good,Ungood}/*.png."""
    folder = root / category
    image(folder / "train" / "good" / "00000.png")
    for split in ("valid", "test"):
        for i in range(2):
            image(folder / split / "good" / f"{100 + i:05d}.png")
        for i in range(3):
            image(folder / split / "Ungood" / f"{i:05d}.png")
    return {"test_normal": 2, "test_anomalous": 3}


def mvtec_loco(root: Path, category: str = "juice_bottle") -> dict[str, int]:
    """MVTec LOCO: test/{good,logical_anomalies,structural_anomalies}/NNN.png, ground_truth/<defect>/NNN/000.png,
    001.png (several masks per image), train/good, validation/good."""
    folder = root / category
    image(folder / "train" / "good" / "000.png")
    image(folder / "validation" / "good" / "000.png")
    for i in range(2):
        image(folder / "test" / "good" / f"{i:03d}.png")
    for defect in ("logical_anomalies", "structural_anomalies"):
        image(folder / "test" / defect / "000.png")
        mask(folder / "ground_truth" / defect / "000" / "000.png", box=(0, 3, 0, 3))
        mask(folder / "ground_truth" / defect / "000" / "001.png", box=(8, 11, 10, 14))
    return {"test_normal": 2, "test_anomalous": 2}


def mvtec_ad2(root: Path, category: str = "sheet_metal") -> dict[str, int]:
    """MVTec AD 2: train/good, validation/good, test_public/{good,bad}, test_public/ground_truth/bad/<stem>_mask.png,
    test_private/ (no labels)."""
    folder = root / category
    image(folder / "train" / "good" / "000_regular.png")
    image(folder / "validation" / "good" / "000_regular.png")
    for i in range(2):
        image(folder / "test_public" / "good" / f"{i:03d}_regular.png")
        image(folder / "test_public" / "bad" / f"{i:03d}_regular.png")
        mask(folder / "test_public" / "ground_truth" / "bad" / f"{i:03d}_regular_mask.png")
    image(folder / "test_private" / "000_regular.png")
    return {"test_normal": 2, "test_anomalous": 2}


def real_iad(root: Path, category: str = "audiojack", resolution: int = 256) -> dict[str, int]:
    """Real-IAD: realiad_<res>/<category>/{OK,NG}/S..../*.jpg (+ NG masks .png) and realiad_jsons/realiad_jsons/<cat>.json."""
    folder = root / f"realiad_{resolution}" / category
    train, test = [], []
    for i in range(2):
        path = f"OK/S000{i}/{category}_000{i}_OK_C1_20231021.jpg"
        image(folder / path)
        train.append({"category": "OK", "anomaly_class": "OK", "image_path": path, "mask_path": None})
    for i in range(2):
        path = f"OK/S001{i}/{category}_001{i}_OK_C1_20231021.jpg"
        image(folder / path)
        test.append({"category": "OK", "anomaly_class": "OK", "image_path": path, "mask_path": None})
    for i in range(3):
        path = f"NG/QS/S002{i}/{category}_002{i}_NG_QS_C1_20231021.jpg"
        image(folder / path)
        mask(folder / path.replace(".jpg", ".png"))
        test.append({"category": "NG", "anomaly_class": "QS", "image_path": path,
                     "mask_path": path.replace(".jpg", ".png")})
    json_file = root / "realiad_jsons" / "realiad_jsons" / f"{category}.json"
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps({"meta": {"prefix": "", "normal_class": "OK"}, "train": train, "test": test}))
    return {"test_normal": 2, "test_anomalous": 3}
