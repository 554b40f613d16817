"""``MVTecLayout``: any data set in MVTec AD's folder layout, with or without masks.

Why: the converters (:mod:`anomalib_zsad.data.convert`) and users' own folders produce the MVTec
AD layout, but anomalib's ``MVTecAD`` cannot read every such tree:

* a category without ``ground_truth/`` (image labels only: HeadCT, BrainMRI, Br35H, COVID-19, a
  user's folder of good and bad images) fails in its indexing, which hands masks to anomalous
  images *by position* and so needs one mask per image;
* a test split without normal images (ISIC, the polyp sets, TN3K: anomalous images only) and no
  training images makes ``setup()`` try to borrow normal images from an empty training split;
* normal images may live in a folder not named ``good`` (BTech's ``ok``).

This datamodule indexes the tree itself, pairs masks with images *by name* (``<stem>_mask.*`` or
``<stem>.*`` in ``ground_truth/<defect>/``), checks every file up front (see
:func:`~anomalib_zsad.data.validation.validate_mvtec_category`) and uses the test folder as it
is. Batches of a category without masks carry ``gt_mask=None``, so the evaluator reports image
metrics only. Images are read with :func:`~anomalib_zsad.data.image_io.read_image_rgb`. Nothing is
ever downloaded.

Layout::

    <root>/<category>/test/<normal_folder>/*.png         normal test images
    <root>/<category>/test/<defect>/*.png                anomalous test images (any folder name)
    <root>/<category>/ground_truth/<defect>/*_mask.png   optional: one mask per anomalous image
    <root>/<category>/train/<normal_folder>/*.png        optional: normal training images
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from anomalib.data import MVTecAD
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import Split, TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Transform

from anomalib_zsad.data._samples_dataset import RGBReadingMixin
from anomalib_zsad.data.errors import DatasetError
from anomalib_zsad.data.validation import MASK_SUFFIX, list_images, validate_mvtec_category

__all__ = ["MVTecLayout", "MVTecLayoutDataset", "make_mvtec_layout_samples"]


def _mask_stem(mask: Path) -> str:
    return mask.stem[: -len(MASK_SUFFIX)] if mask.stem.endswith(MASK_SUFFIX) else mask.stem


def make_mvtec_layout_samples(category_root: str | Path, split: str | Split | None = None,
                              normal_folder: str = "good") -> pd.DataFrame:
    """Index one MVTec-layout category: ``path, split, label, image_path, mask_path, label_index``.

    Masks are paired with images by name, never by position. ``attrs["task"]`` is
    ``"segmentation"`` when the category has masks, else ``"classification"``.
    """
    root = Path(category_root)
    gt_dir = root / "ground_truth"
    masks = {(m.parent.name, _mask_stem(m)): m for m in list_images(gt_dir, recursive=True)} if gt_dir.is_dir() else {}
    rows = []
    for split_name in ("train", "test"):
        folder = root / split_name
        if not folder.is_dir():
            continue
        for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            if split_name == "train" and label_dir.name != normal_folder:
                continue
            anomalous = label_dir.name != normal_folder
            for image in list_images(label_dir):
                mask = masks.get((label_dir.name, image.stem)) if anomalous else None
                rows.append((str(root), split_name, label_dir.name, str(image), str(mask) if mask else "",
                             int(anomalous)))
    samples = pd.DataFrame(rows, columns=["path", "split", "label", "image_path", "mask_path", "label_index"])
    samples.attrs["task"] = "segmentation" if masks else "classification"
    if split is not None:
        value = split.value if isinstance(split, Split) else str(split)
        samples = samples[samples.split == value].reset_index(drop=True)
        samples.attrs["task"] = "segmentation" if masks else "classification"
    return samples


class MVTecLayoutDataset(RGBReadingMixin, AnomalibDataset):
    """One split of one MVTec-layout category (see :func:`make_mvtec_layout_samples`)."""

    def __init__(self, root: str | Path, category: str, split: str | Split | None = None,
                 normal_folder: str = "good", augmentations: Transform | None = None) -> None:
        super().__init__(augmentations=augmentations)
        self.root_category = Path(root) / category
        self.category = category
        self.split = split
        self.samples = make_mvtec_layout_samples(self.root_category, split=split, normal_folder=normal_folder)


class MVTecLayout(MVTecAD):
    """A data set in MVTec AD layout whose masks are optional (see the module doc).

    Args:
        root: folder holding the category folders (e.g. the output of
            ``python -m anomalib_zsad.data.convert headct <download> datasets/HeadCT``).
        category: one category folder below ``root``.
        normal_folder: name of the folders of normal images (``good``; BTech: ``ok``).
        validate: check every image and mask up front (headers, sizes, pairing) in ``setup``.
        name: the data set's name (default: the name of ``root``'s folder, e.g. ``HeadCT``): where
            anomalib writes a run (``results/<model>/<name>/<category>``) and how a benchmark grid's
            ``train_data`` mapping finds the set.
        Other arguments: as :class:`anomalib.data.MVTecAD`; the test split is used as it is on disk.
    """

    def __init__(
        self,
        root: Path | str = "datasets/MVTecLayout",
        category: str = "good_and_bad",
        normal_folder: str = "good",
        validate: bool = True,
        name: str | None = None,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        test_split_mode: TestSplitMode | str = TestSplitMode.FROM_DIR,
        test_split_ratio: float = 0.2,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            root=root,
            category=category,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=test_split_mode,
            test_split_ratio=test_split_ratio,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        self.normal_folder = normal_folder
        self.validate = validate
        self._name = name

    @property
    def name(self) -> str:
        """The data set's name: the ``name`` argument, else the name of the ``root`` folder."""
        return self._name or Path(self.root).resolve().name

    def prepare_data(self) -> None:
        """Check that the category is on disk (nothing is downloaded)."""
        category_root = Path(self.root) / self.category
        if not (category_root / "test").is_dir():
            msg = (
                f"'{category_root}' has no 'test' folder. MVTecLayout reads <root>/<category>/test/<good|defect>/ "
                "(masks optional in <root>/<category>/ground_truth/<defect>/). Convert a downloaded data set with "
                "`python -m anomalib_zsad.data.convert <name> <download> <root>` (see docs/data.md)."
            )
            raise DatasetError(msg)

    def _setup(self, _stage: str | None = None) -> None:
        self.prepare_data()
        if self.validate:
            validate_mvtec_category(Path(self.root) / self.category, normal=self.normal_folder)
        kwargs = {"root": self.root, "category": self.category, "normal_folder": self.normal_folder}
        self.train_data = MVTecLayoutDataset(split=Split.TRAIN, **kwargs)
        self.test_data = MVTecLayoutDataset(split=Split.TEST, **kwargs)

    def _create_test_split(self) -> None:
        """The test folder is used as it is (no normal images borrowed from training, none moved out)."""
