"""``ZSADDemo``: anomalib's MVTecAD datamodule over the offline demo set, generated on demand.

Why: the README job and the integration tests should need no manual step. ``prepare_data()``
(called by Lightning, by :class:`~anomalib_zsad.data.CrossDataset`, or by you) writes the set with
:func:`~anomalib_zsad.data.demo.make_demo_dataset` if it is not there yet (idempotent, atomic) —
anomalib's MVTecAD would instead try to download MVTec AD. Its datasets read images with the
plugin's :func:`~anomalib_zsad.data.image_io.read_image_rgb` (16-bit/gray/RGBA-safe), not anomalib's.
"""

from __future__ import annotations

from pathlib import Path

from anomalib.data import MVTecAD
from anomalib.data.datasets import MVTecADDataset
from anomalib.data.utils import Split, TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Transform

from anomalib_zsad.data._samples_dataset import RGBReadingMixin
from anomalib_zsad.data.demo import DEFAULT_CATEGORIES, is_demo_dataset, make_demo_dataset


class RGBMVTecADDataset(RGBReadingMixin, MVTecADDataset):
    """anomalib's MVTec AD dataset (same indexing) reading images with the plugin's RGB reader."""

__all__ = ["ZSADDemo"]


class ZSADDemo(MVTecAD):
    """MVTecAD-layout demo set (see :mod:`anomalib_zsad.data.demo`), generated if missing.

    Args:
        root: folder of the demo set (default ``datasets/zsad_demo``).
        category: one of ``brick, grass, gravel, tissue, coffee`` (with the default ``categories``).
        seed, image_size, categories: generation parameters, used only when ``root`` holds no
            complete demo set yet (an existing one is used as is).
        Other arguments: as :class:`anomalib.data.MVTecAD`.
    """

    def __init__(
        self,
        root: Path | str = "datasets/zsad_demo",
        category: str = "brick",
        seed: int = 0,
        image_size: int = 128,
        categories: list[str] | None = None,
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
        self.generation = {
            "seed": seed,
            "image_size": image_size,
            "categories": tuple(categories) if categories else DEFAULT_CATEGORIES,
        }

    def _setup(self, _stage: str | None = None) -> None:
        """As :meth:`MVTecAD._setup`, with datasets that read through :func:`read_image_rgb`."""
        self.train_data = RGBMVTecADDataset(split=Split.TRAIN, root=self.root, category=self.category)
        self.test_data = RGBMVTecADDataset(split=Split.TEST, root=self.root, category=self.category)

    def prepare_data(self) -> None:
        """Generate the demo set unless ``root`` already holds a complete one (never downloads).

        An existing complete demo set is used as is, whatever parameters made it (e.g. a smaller
        one written by the tests), so pointing several datamodules at one root never conflicts.
        """
        if not is_demo_dataset(self.root):
            self.root = make_demo_dataset(self.root, **self.generation)
