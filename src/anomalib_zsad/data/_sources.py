"""Turn an anomalib image datamodule into per-category *test-split* sample tables.

Why: anomalib's datamodules are one-category objects whose ``setup()`` also re-splits the
test set (e.g. ``Folder`` moves half of it to validation). The zero-shot protocol needs the
*whole* test split of many categories, so this module clones the datamodule per category and
calls its raw ``_setup()`` (the abstract hook that only indexes files), never ``setup()``.
It never triggers a download: categories must exist on disk (see :func:`available_categories`).

What differs between anomalib's datamodules is kept here, in small tables, so that every one of
them is a source or a target of :class:`~anomalib_zsad.data.CrossDataset` without code:

* where the categories live and how one is recognised (:func:`available_categories`):
  ``<root>/<category>/test/`` for most, ``test_public/`` for MVTec AD 2, ``realiad_<res>/<category>``
  with its JSON for Real-IAD; ``Folder`` and ``Kolektor`` are one category each;
* which sets are in MVTec layout (their files are checked before anomalib indexes them, and a
  category without ``ground_truth/`` is read for image labels only) and the name of their normal
  folder (``good``; ``ok`` for BTech);
* MVTec LOCO's several masks per image (their union is the image's mask), indexed by
  :mod:`anomalib_zsad.data.loco` (anomalib's own indexing fails under pandas 3).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from anomalib.data import (
    BMAD,
    MPDD,
    AnomalibDataModule,
    BTech,
    Folder,
    Kolektor,
    MVTecAD,
    MVTecAD2,
    MVTecLOCO,
    RealIAD,
    Visa,
)
from anomalib.data.datamodules.image.visa import VISA_CATEGORIES
from anomalib.data.datasets.image.realiad import CATEGORIES as REALIAD_CATEGORIES

from anomalib_zsad.data.demo_datamodule import ZSADDemo
from anomalib_zsad.data.errors import DatasetError
from anomalib_zsad.data.loco import make_loco_samples
from anomalib_zsad.data.validation import find_categories, list_images, validate_mvtec_category, validate_samples

logger = logging.getLogger(__name__)

SAMPLE_COLUMNS = ["image_path", "mask_path", "extra_mask_paths", "label_index", "source", "category", "has_mask"]

#: Datamodules whose files follow MVTec AD's layout (``<category>/test/<normal|defect>/``,
#: ``<category>/ground_truth/<defect>/``): checked file by file before anomalib indexes them.
MVTEC_LAYOUT: tuple[type, ...] = (MVTecAD, Visa, MPDD, BTech)
#: Name of the normal-image folder where it is not ``good``.
NORMAL_FOLDER: dict[type, str] = {BTech: "ok"}
#: Datamodules that are one category (named after the datamodule's ``name``) rather than a set of them.
SINGLE_CATEGORY: tuple[type, ...] = (Folder, Kolektor)
#: Folder that marks a category, where it is not ``test``.
CATEGORY_MARKER: dict[type, str] = {MVTecAD2: "test_public"}


def describe(datamodule: AnomalibDataModule) -> str:
    """Short human-readable name of a datamodule for messages, e.g. ``MVTecAD('datasets/MVTecAD')``."""
    root = getattr(datamodule, "root", None)
    return f"{type(datamodule).__name__}({str(root)!r})" if root is not None else type(datamodule).__name__


def is_single_category(datamodule: AnomalibDataModule) -> bool:
    """True for datamodules that are one category (``Folder``, ``Kolektor``, or without a ``root``)."""
    return isinstance(datamodule, SINGLE_CATEGORY) or not hasattr(datamodule, "root")


def single_category_name(datamodule: AnomalibDataModule) -> str:
    """The category name of a one-category datamodule: its ``name`` (a ``Folder``'s ``name`` argument)."""
    return str(datamodule.name)


def normal_folder(datamodule: AnomalibDataModule) -> str:
    """Name of the folder of normal test images in an MVTec-layout data set (``good``, BTech: ``ok``)."""
    for cls, name in NORMAL_FOLDER.items():
        if isinstance(datamodule, cls):
            return name
    return getattr(datamodule, "normal_folder", "good")


def is_mvtec_layout(datamodule: AnomalibDataModule) -> bool:
    """True when the datamodule reads an MVTec-layout tree (checked file by file before indexing)."""
    return isinstance(datamodule, MVTEC_LAYOUT)


def category_parent(datamodule: AnomalibDataModule) -> Path | None:
    """Folder that holds the category folders (``visa_pytorch`` for VisA), if the class has one."""
    if isinstance(datamodule, Visa):
        return Path(datamodule.split_root)
    if isinstance(datamodule, RealIAD):
        return Path(datamodule.root) / f"realiad_{datamodule.resolution}"
    if is_single_category(datamodule) or getattr(datamodule, "root", None) is None:
        return None
    return Path(datamodule.root)


def available_categories(datamodule: AnomalibDataModule) -> list[str]:
    """Categories present on disk (``Folder``/``Kolektor``: one, named after the datamodule).

    A :class:`~anomalib_zsad.data.demo_datamodule.ZSADDemo` set is generated first if missing.
    """
    if isinstance(datamodule, ZSADDemo):
        datamodule.prepare_data()
    if is_single_category(datamodule):
        return [single_category_name(datamodule)] if _single_category_exists(datamodule) else []
    if isinstance(datamodule, Visa):
        # anomalib's VisA split creates (empty) folders for all 12 categories, so a split category
        # only counts if it holds files; a raw one if its folder exists.
        root, split_root = Path(datamodule.root), Path(datamodule.split_root)
        return [c for c in VISA_CATEGORIES if (root / c).is_dir() or _has_files(split_root / c / "test")]
    if isinstance(datamodule, RealIAD):
        root, parent = Path(datamodule.root), category_parent(datamodule)
        json_path = str(datamodule.json_path)
        return [c for c in REALIAD_CATEGORIES
                if (parent / c).is_dir() and (root / json_path.format(category=c)).is_file()]
    marker = next((m for cls, m in CATEGORY_MARKER.items() if isinstance(datamodule, cls)), "test")
    return find_categories(datamodule.root, marker=marker)


def _single_category_exists(datamodule: AnomalibDataModule) -> bool:
    """A ``Kolektor`` root must exist (it would otherwise be downloaded); a ``Folder`` reports its own errors."""
    return not isinstance(datamodule, Kolektor) or Path(datamodule.root).is_dir()


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))


def resolve_categories(
    datamodule: AnomalibDataModule,
    requested: str | Sequence[str] | None,
    default_own: bool,
) -> list[str]:
    """Expand ``None``/``"all"``/a name/a list into existing category names, or raise."""
    found = available_categories(datamodule)
    single = is_single_category(datamodule)
    if requested is None:
        own = getattr(datamodule, "category", "") or ""
        requested = [own] if default_own and own and not single else "all"
    if isinstance(requested, str):
        requested = found if requested == "all" else [requested]
    if single and found:
        requested = found  # a Folder/Kolektor is one "category"; its name is informative only
    if not found:
        msg = (
            f"No categories found for {describe(datamodule)}: expected <root>/<category>/test/... "
            "(MVTec AD layout; VisA: <root>/<category>/Data or <root>/visa_pytorch/<category>; MVTec AD 2: "
            "<root>/<category>/test_public; Real-IAD: <root>/realiad_<resolution>/<category> with its JSON). "
            "Download the data set there first (see docs/data.md for every data set), convert it with "
            "`python -m anomalib_zsad.data.convert`, or create the offline demo set with "
            "`python -m anomalib_zsad.data.demo --root <root>`."
        )
        raise DatasetError(msg)
    missing = [c for c in requested if c not in found]
    if missing or not requested:
        msg = f"Categories {missing or requested} not found in {describe(datamodule)}; available: {found}."
        raise DatasetError(msg)
    return list(dict.fromkeys(requested))


def _category_view(datamodule: AnomalibDataModule, category: str) -> AnomalibDataModule:
    view = copy.copy(datamodule)  # shallow: only `category` and the datasets set by _setup differ
    if not is_single_category(datamodule):
        view.category = category
    return view


def _mask_list(value: object) -> list[str]:
    """A sample's mask path(s) as a list: ``""``/``None``/NaN -> ``[]``, MVTec LOCO's list kept."""
    if isinstance(value, list | tuple):
        return [str(v) for v in value if str(v) not in {"", "nan", "None"}]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    text = str(value)
    return [] if text in {"", "nan", "None"} else [text]


def category_test_samples(
    datamodule: AnomalibDataModule,
    category: str,
    validate: bool = True,
) -> pd.DataFrame:
    """The full test split of one category as a table with :data:`SAMPLE_COLUMNS`.

    ``has_mask`` is False for every row of a category whose anomalous images have no masks
    (then ``mask_path`` is ``""``); a category with masks for only some images is an error.
    ``extra_mask_paths`` holds an image's further masks (MVTec LOCO: one per defect), read as
    one mask with ``mask_path`` (their union). Images without a label (MVTec AD 2's private test
    sets) are refused: zero-shot training and evaluation both need labels.
    """
    view = _category_view(datamodule, category)
    parent = category_parent(view)
    if isinstance(view, Visa):
        view.prepare_data()  # applies VisA's 1-class split once (files already on disk)
    source = describe(datamodule)
    files_checked = False
    if is_mvtec_layout(view) and parent is not None and (parent / category).is_dir():
        normal = normal_folder(view)
        if validate:
            # every test image's header, mask sizes, stray masks (which would crash anomalib's indexing)
            validate_mvtec_category(parent / category, normal=normal)
            files_checked = True
        if not (parent / category / "ground_truth").is_dir():
            return _maskless_mvtec_samples(parent / category, str(datamodule.name), normal)
    if isinstance(view, BMAD) and parent is not None and _bmad_image_level(parent / category):
        if validate:
            validate_mvtec_category(parent / category)
        return _maskless_mvtec_samples(parent / category, str(datamodule.name))
    try:
        if isinstance(view, MVTecLOCO):  # anomalib's own LOCO indexing fails under pandas 3 (see loco.py)
            samples = make_loco_samples(Path(view.root) / category, split="test")
        else:
            view._setup()  # noqa: SLF001 - the raw indexing hook; setup() would re-split the test set
            samples = view.test_data.samples
    except DatasetError:
        raise
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, OSError, TypeError) as error:
        msg = f"{describe(datamodule)} could not index category '{category}': {error}"
        raise DatasetError(msg) from error
    if len(samples) == 0:
        msg = f"{describe(datamodule)} category '{category}' has an empty test split; add test images."
        raise DatasetError(msg)
    labels = samples["label_index"].astype(int)
    if not labels.isin([0, 1]).all():
        unlabelled = samples.loc[~labels.isin([0, 1]), "image_path"].iloc[0]
        msg = (
            f"{source} category '{category}': {int((~labels.isin([0, 1])).sum())} test image(s) have no label "
            f"(e.g. '{unlabelled}'; MVTec AD 2's private test sets have none). Use a split with labels "
            "(MVTec AD 2: test_type='public')."
        )
        raise DatasetError(msg)
    raw = samples["mask_path"] if "mask_path" in samples else pd.Series([""] * len(samples), index=samples.index)
    masks = [_mask_list(value) if label == 1 else [] for value, label in zip(raw, labels, strict=True)]
    mask_paths = pd.Series([m[0] if m else "" for m in masks], index=samples.index)
    extra = [tuple(m[1:]) for m in masks]
    if validate:
        has_mask = validate_samples(samples["image_path"], masks, labels, f"{source}/{category}",
                                    check_files=not files_checked)
    else:
        has_mask = bool((mask_paths[labels == 1] != "").all())
    if not (labels == 1).any():  # only normal images: follow the datamodule's own task
        has_mask = samples.attrs.get("task") == "segmentation"
    return pd.DataFrame({
        "image_path": samples["image_path"].astype(str).to_numpy(),
        "mask_path": mask_paths.to_numpy() if has_mask else "",
        "extra_mask_paths": extra if has_mask else [()] * len(samples),
        "label_index": labels.to_numpy(),
        "source": str(datamodule.name),  # the class name; a Folder or MVTecLayout set: its own name
        "category": category,
        "has_mask": has_mask,
    })


def _bmad_image_level(category_root: Path) -> bool:
    """A BMAD category without masks (Chest, Histopathology, OCT2017): ``test/<good|Ungood>/*.png`` directly.

    anomalib 2.7 indexes such a folder wrongly (the category name becomes the split and the category
    appears twice in each path), so its test split comes out empty; it is read here as an MVTec-layout
    category without ``ground_truth/`` (image labels only).
    """
    test = category_root / "test"
    return test.is_dir() and not any(test.glob("*/img")) and any(list_images(d) for d in test.iterdir() if d.is_dir())


def _maskless_mvtec_samples(category_root: Path, source: str, normal: str = "good") -> pd.DataFrame:
    """Index an MVTec-layout category that has no ``ground_truth`` folder (image labels only).

    anomalib's MVTecAD/VisA indexing fails on such a folder (it assigns masks by position), so
    the table is built here: ``test/<normal>`` is normal, every other ``test/<defect>`` anomalous.
    """
    rows = [
        (str(path), 0 if defect.name == normal else 1)
        for defect in sorted(p for p in (category_root / "test").iterdir() if p.is_dir())
        for path in list_images(defect)
    ]
    logger.warning("%s has no ground_truth folder: its images carry labels only (gt_mask is None).", category_root)
    return pd.DataFrame({
        "image_path": [r[0] for r in rows],
        "mask_path": "",
        "extra_mask_paths": [()] * len(rows),
        "label_index": [r[1] for r in rows],
        "source": source,
        "category": category_root.name,
        "has_mask": False,
    })
