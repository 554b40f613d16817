"""Turn an anomalib image datamodule into per-category *test-split* sample tables.

Why: anomalib's datamodules are one-category objects whose ``setup()`` also re-splits the
test set (e.g. ``Folder`` moves half of it to validation). The zero-shot protocol needs the
*whole* test split of many categories, so this module clones the datamodule per category and
calls its raw ``_setup()`` (the abstract hook that only indexes files), never ``setup()``.
It never triggers a download: categories must exist on disk (see :func:`available_categories`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from anomalib.data import AnomalibDataModule, Folder, Visa
from anomalib.data.datamodules.image.visa import VISA_CATEGORIES

from anomalib_zsad.data.demo_datamodule import ZSADDemo
from anomalib_zsad.data.errors import DatasetError
from anomalib_zsad.data.validation import find_categories, list_images, validate_mvtec_category, validate_samples

logger = logging.getLogger(__name__)

SAMPLE_COLUMNS = ["image_path", "mask_path", "label_index", "source", "category", "has_mask"]


def describe(datamodule: AnomalibDataModule) -> str:
    """Short human-readable name of a datamodule for messages, e.g. ``MVTecAD('datasets/MVTecAD')``."""
    root = getattr(datamodule, "root", None)
    return f"{type(datamodule).__name__}({str(root)!r})" if root is not None else type(datamodule).__name__


def category_parent(datamodule: AnomalibDataModule) -> Path | None:
    """Folder that holds the category folders (``visa_pytorch`` for VisA), if the class has one."""
    if isinstance(datamodule, Visa):
        return Path(datamodule.split_root)
    if isinstance(datamodule, Folder) or getattr(datamodule, "root", None) is None:
        return None
    return Path(datamodule.root)


def available_categories(datamodule: AnomalibDataModule) -> list[str]:
    """Categories present on disk (``Folder``: its single ``name``).

    A :class:`~anomalib_zsad.data.demo_datamodule.ZSADDemo` set is generated first if missing.
    """
    if isinstance(datamodule, ZSADDemo):
        datamodule.prepare_data()
    if isinstance(datamodule, Folder) or not hasattr(datamodule, "root"):
        return [datamodule.name]
    if isinstance(datamodule, Visa):
        # anomalib's VisA split creates (empty) folders for all 12 categories, so a split category
        # only counts if it holds files; a raw one if its folder exists.
        root, split_root = Path(datamodule.root), Path(datamodule.split_root)
        return [c for c in VISA_CATEGORIES if (root / c).is_dir() or _has_files(split_root / c / "test")]
    return find_categories(datamodule.root)


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))


def resolve_categories(
    datamodule: AnomalibDataModule,
    requested: str | Sequence[str] | None,
    default_own: bool,
) -> list[str]:
    """Expand ``None``/``"all"``/a name/a list into existing category names, or raise."""
    found = available_categories(datamodule)
    if requested is None:
        own = getattr(datamodule, "category", "") or ""
        requested = [own] if default_own and own and not isinstance(datamodule, Folder) else "all"
    if isinstance(requested, str):
        requested = found if requested == "all" else [requested]
    if isinstance(datamodule, Folder):
        requested = [datamodule.name]  # a Folder is one "category"; its name is informative only
    if not found:
        msg = (
            f"No categories found for {describe(datamodule)}: expected <root>/<category>/test/... "
            "(MVTec AD layout; VisA: <root>/<category>/Data or <root>/visa_pytorch/<category>). Download "
            "the data set there first, or create the offline demo set with "
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
    if not isinstance(datamodule, Folder):
        view.category = category
    return view


def category_test_samples(
    datamodule: AnomalibDataModule,
    category: str,
    validate: bool = True,
) -> pd.DataFrame:
    """The full test split of one category as a table with :data:`SAMPLE_COLUMNS`.

    ``has_mask`` is False for every row of a category whose anomalous images have no masks
    (then ``mask_path`` is ``""``); a category with masks for only some images is an error.
    """
    view = _category_view(datamodule, category)
    parent = category_parent(view)
    if isinstance(view, Visa):
        view.prepare_data()  # applies VisA's 1-class split once (files already on disk)
    source = describe(datamodule)
    files_checked = False
    if parent is not None and (parent / category).is_dir():
        if validate:
            # every test image's header, mask sizes, stray masks (which would crash anomalib's indexing)
            validate_mvtec_category(parent / category)
            files_checked = True
        if not (parent / category / "ground_truth").is_dir():
            return _maskless_mvtec_samples(parent / category, type(datamodule).__name__)
    try:
        view._setup()  # noqa: SLF001 - the raw indexing hook; setup() would re-split the test set
    except DatasetError:
        raise
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        msg = f"{describe(datamodule)} could not index category '{category}': {error}"
        raise DatasetError(msg) from error
    samples = view.test_data.samples
    if len(samples) == 0:
        msg = f"{describe(datamodule)} category '{category}' has an empty test split; add test images."
        raise DatasetError(msg)
    mask_paths = samples["mask_path"] if "mask_path" in samples else pd.Series([""] * len(samples))
    mask_paths = mask_paths.fillna("").astype(str).replace({"None": "", "nan": ""})
    labels = samples["label_index"].astype(int)
    if validate:
        has_mask = validate_samples(samples["image_path"], mask_paths, labels, f"{source}/{category}",
                                    check_files=not files_checked)
    else:
        has_mask = bool((mask_paths[labels == 1] != "").all())
    if not (labels == 1).any():  # only normal images: follow the datamodule's own task
        has_mask = samples.attrs.get("task") == "segmentation"
    return pd.DataFrame({
        "image_path": samples["image_path"].astype(str).to_numpy(),
        "mask_path": mask_paths.to_numpy() if has_mask else "",
        "label_index": labels.to_numpy(),
        "source": type(datamodule).__name__,
        "category": category,
        "has_mask": has_mask,
    })


def _maskless_mvtec_samples(category_root: Path, source: str) -> pd.DataFrame:
    """Index an MVTec-layout category that has no ``ground_truth`` folder (image labels only).

    anomalib's MVTecAD/VisA indexing fails on such a folder (it assigns masks by position), so
    the table is built here: ``test/good`` is normal, every other ``test/<defect>`` anomalous.
    """
    rows = [
        (str(path), 0 if defect.name == "good" else 1)
        for defect in sorted(p for p in (category_root / "test").iterdir() if p.is_dir())
        for path in list_images(defect)
    ]
    logger.warning("%s has no ground_truth folder: its images carry labels only (gt_mask is None).", category_root)
    return pd.DataFrame({
        "image_path": [r[0] for r in rows],
        "mask_path": "",
        "label_index": [r[1] for r in rows],
        "source": source,
        "category": category_root.name,
        "has_mask": False,
    })
