"""Cross-data-set datamodule for the zero-shot protocol (train on A's test split, test on B).

Zero-shot anomaly detectors with learnable parts (AnomalyCLIP's prompts, adapters) are trained
on an *auxiliary* data set's **test** split (all its categories, anomalous images with masks)
and evaluated on a *different* data set category by category (VisA -> MVTec AD and back).
anomalib 2.7 has no datamodule for this; :class:`CrossDataset` composes ordinary anomalib image
datamodules (``MVTecAD``, ``Visa``, ``Folder``, the demo set through ``MVTecAD``) instead of
re-implementing their indexing.

Guarantees:

* training data comes only from ``train`` sources' test splits and never contains an image file
  that is also in the evaluation set (checked by resolved path; overlap raises);
* validation and test both use the target's test split for ``test_categories``;
* a batch's ``gt_mask`` is a tensor for every image or ``None`` (source without masks); mixed
  sources are batched separately, see :class:`MaskGroupedBatchSampler`.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from anomalib.data import AnomalibDataModule, Visa
from lightning.pytorch.utilities.types import EVAL_DATALOADERS, TRAIN_DATALOADERS
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Transform

from anomalib_zsad.data._samples_dataset import MaskGroupedBatchSampler, PooledDataset
from anomalib_zsad.data._sources import category_parent, category_test_samples, describe, resolve_categories
from anomalib_zsad.data.errors import DatasetError
from anomalib_zsad.data.image_io import install_rgb_image_reader

logger = logging.getLogger(__name__)

__all__ = ["CrossDataset"]


class CrossDataset(AnomalibDataModule):
    """Train on auxiliary data sets' test splits; validate/test on a target data set.

    Args:
        train: auxiliary source datamodule(s), e.g. ``Visa(root=...)`` or
            ``[MVTecAD(root=...), Folder(...)]``. Their own ``category``/batch sizes are ignored.
        test: target datamodule, e.g. ``MVTecAD(root="datasets/MVTecAD", category="bottle")``.
        train_categories: categories taken from *each* source: ``None`` or ``"all"`` (default:
            every category found on disk), one name, or a list of names (each must exist in every
            source). A ``Folder`` source is a single category and is always used whole.
        test_categories: target categories for validation and test: ``None`` (default: the target
            datamodule's own ``category``), one name (the per-category protocol), a list (pooled),
            or ``"all"`` (pooled).
        train_batch_size: training batch size (papers: 8).
        eval_batch_size: validation/test batch size.
        num_workers: DataLoader workers.
        train_augmentations, val_augmentations, test_augmentations, augmentations: as in
            :class:`anomalib.data.AnomalibDataModule` (the model's resize is appended by anomalib).
        validate: check files up front (mask/image sizes, stray or missing masks, unreadable
            headers) and raise :class:`DatasetError` naming the file. Cheap (headers only).
        seed: seed of the training batch order (``None``: random).

    Batches carry ``image``, ``gt_label`` and ``gt_mask`` (0/1, image size). For a source without
    masks ``gt_mask`` is ``None`` for the whole batch: train the image-level loss only.
    """

    def __init__(
        self,
        train: AnomalibDataModule | list[AnomalibDataModule],
        test: AnomalibDataModule,
        train_categories: str | list[str] | None = None,
        test_categories: str | list[str] | None = None,
        train_batch_size: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        validate: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            seed=seed,
        )
        sources = list(train) if isinstance(train, Sequence) else [train]
        if not sources or not all(isinstance(s, AnomalibDataModule) for s in [*sources, test]):
            msg = "CrossDataset needs anomalib datamodules: `train` (one or a list) and `test`."
            raise DatasetError(msg)
        self.sources = sources
        self.target = test
        self.train_categories = train_categories
        self.test_categories = test_categories
        self.validate = validate
        self.has_masks: bool | None = None  # known after setup: do all training batches carry masks?
        self._resolved_targets: tuple[str, list[str]] | None = None  # (repr of test_categories, names)
        # 16-bit/gray/RGBA-safe reading for anomalib code that re-reads images (visualiser, predict).
        install_rgb_image_reader()

    # ------------------------------------------------------------------ naming (results folders)
    @property
    def name(self) -> str:
        """Name of the *target* data set folder (e.g. ``MVTecAD``), as anomalib's own datamodules.

        anomalib uses ``name/category`` for the results folder and to strip image paths in the
        visualiser, so it matches the on-disk folder when there is one.
        """
        parent = category_parent(self.target)
        return parent.name if parent is not None else self.target.name

    @property
    def category(self) -> str:
        """The single test category, or the categories joined by ``+`` when pooled."""
        return "+".join(self.target_categories())

    @category.setter
    def category(self, category: str) -> None:  # anomalib's base __init__ assigns it
        self._category = category

    def target_categories(self) -> list[str]:
        """Target categories that validation/test will use.

        Resolved on disk and cached per value of ``test_categories`` (anomalib's visualiser asks for
        ``category`` once per image).
        """
        key = repr((self.test_categories, getattr(self.target, "category", None)))
        if self._resolved_targets is None or self._resolved_targets[0] != key:
            self._resolved_targets = (key, resolve_categories(self.target, self.test_categories, default_own=True))
        return list(self._resolved_targets[1])

    def source_categories(self) -> dict[str, list[str]]:
        """Training categories per source (``describe(source) -> names``)."""
        return {describe(s): resolve_categories(s, self.train_categories, default_own=False) for s in self.sources}

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        """Let VisA apply its one-class split (files must be on disk; nothing is downloaded)."""
        plan = [(s, resolve_categories(s, self.train_categories, default_own=False)) for s in self.sources]
        for datamodule, categories in [*plan, (self.target, self.target_categories())]:
            if isinstance(datamodule, Visa):
                for category in categories:
                    view = copy.copy(datamodule)
                    view.category = category
                    view.prepare_data()

    def _setup(self, _stage: str | None = None) -> None:
        test_samples = self._collect([(self.target, self.target_categories())])
        train_samples = self._collect([
            (source, resolve_categories(source, self.train_categories, default_own=False)) for source in self.sources
        ])
        self._check_disjoint(train_samples, test_samples)
        self.has_masks = bool(train_samples["has_mask"].all())
        if not self.has_masks:
            maskless = sorted(set(train_samples.loc[~train_samples["has_mask"], "source"] + "/" +
                                  train_samples.loc[~train_samples["has_mask"], "category"]))
            warnings.warn(
                f"Training sources without masks: {maskless}. Their batches have gt_mask=None; "
                "models train only the image-level loss on them.",
                stacklevel=2,
            )
        self.train_data = PooledDataset(train_samples, name="train")
        self.test_data = PooledDataset(test_samples, name="test")
        logger.info(
            "CrossDataset: %d training images from %s; %d test images from %s %s",
            len(train_samples), self.source_categories(), len(test_samples), describe(self.target),
            self.target_categories(),
        )

    def _collect(self, plan: list[tuple[AnomalibDataModule, list[str]]]) -> pd.DataFrame:
        frames = [category_test_samples(dm, c, validate=self.validate) for dm, categories in plan for c in categories]
        return pd.concat(frames, ignore_index=True)

    @staticmethod
    def _check_disjoint(train: pd.DataFrame, test: pd.DataFrame) -> None:
        """Refuse any target image in training (resolved paths, so symlinks/relative roots count)."""
        resolved_test = {str(Path(p).resolve()) for p in test["image_path"]}
        leaked = [p for p in train["image_path"] if str(Path(p).resolve()) in resolved_test]
        if leaked:
            msg = (
                f"{len(leaked)} target (test) image(s) are also in the training sources, e.g. '{leaked[0]}'. "
                "Zero-shot evaluation must not train on target images: use another data set or exclude the "
                "target categories with `train_categories`."
            )
            raise DatasetError(msg)

    def _create_test_split(self) -> None:
        """The target's test split is used as is (anomalib would re-split normal/anomalous)."""

    def _create_val_split(self) -> None:
        """Validation is the target's test split, as in the zero-shot protocol."""
        self.val_data = self.test_data

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> TRAIN_DATALOADERS:
        """Shuffled batches; mask-less and masked samples are never mixed in one batch."""
        has_mask = self.train_data.samples["has_mask"].tolist()
        if all(has_mask) or not any(has_mask):
            return super().train_dataloader()
        return DataLoader(
            dataset=self.train_data,
            batch_sampler=MaskGroupedBatchSampler(has_mask, self.train_batch_size, seed=self.seed),
            num_workers=self.num_workers,
            collate_fn=self.external_collate_fn or self.train_data.collate_fn,
        )

    def val_dataloader(self) -> EVAL_DATALOADERS:
        """Target test split (same images as :meth:`test_dataloader`)."""
        return super().val_dataloader()
