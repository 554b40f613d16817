"""Cross-data-set datamodule for the zero-shot protocol (train on A's test split, test on B).

Zero-shot anomaly detectors with learnable parts (AnomalyCLIP's prompts, adapters) are trained
on an *auxiliary* data set's **test** split (all its categories, anomalous images with masks)
and evaluated on a *different* data set category by category (VisA -> MVTec AD and back).
anomalib 2.7 has no datamodule for this; :class:`CrossDataset` composes ordinary anomalib image
datamodules (``MVTecAD``, ``Visa``, ``Folder``, the demo set through ``MVTecAD``) instead of
re-implementing their indexing.

Guarantees:

* training data comes only from ``train`` sources' test splits and never contains an image file
  that is also in the evaluation set: same path, same file (device + inode: symlinks, hard links)
  or same bytes (a copy) all raise;
* validation and test both use the target's test split for ``test_categories``;
* a batch's ``gt_mask`` is a tensor for every image or ``None`` (source without masks); mixed
  sources are batched separately, see :class:`MaskGroupedBatchSampler`;
* with ``shots_per_category=k`` training keeps k images of each source category (few-shot
  auxiliary training, AA-CLIP's 2/16/64-shot tables), drawn per category from ``seed``,
  stratified by label, after the target images are excluded (see :func:`select_shots`).

Any anomalib image datamodule is a source or a target: MVTec AD, VisA, MPDD, BTech, Kolektor,
BMAD, MVTec LOCO, MVTec AD 2, Real-IAD, Folder, and :class:`~anomalib_zsad.data.MVTecLayout` for
the converted sets and users' own folders (what differs between them: ``_sources.py``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import warnings
import zlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anomalib.data import AnomalibDataModule, Visa
from lightning.pytorch.utilities.types import EVAL_DATALOADERS, TRAIN_DATALOADERS
from torch.utils.data import DataLoader, SequentialSampler
from torchvision.transforms.v2 import Transform

from anomalib_zsad.data._samples_dataset import MaskGroupedBatchSampler, PooledDataset
from anomalib_zsad.data._sources import category_test_samples, describe, resolve_categories
from anomalib_zsad.data.errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = ["CrossDataset", "find_shared_images", "select_shots"]


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
        validate: check files up front and raise :class:`DatasetError` naming the file: every image's
            and mask's header (zero-byte, non-image, decompression-bomb files), mask/image sizes,
            stray or missing masks. Cheap: Pillow opens each file without decoding its pixels
            (a fraction of a millisecond per file, figures in ``docs/data.md``); corrupt pixel data
            is caught when the image is read.
        seed: seed of the training batch order (``None``: random) and of the shots.
        shots_per_category: few-shot auxiliary training: keep only this many training images of each
            source category (``None``: all). Drawn with ``seed`` (0 when ``seed`` is ``None``),
            stratified by label (normal/anomalous in the category's proportions, at least one of
            each when both exist and k >= 2), independently per category, after the target images
            are excluded; see :func:`select_shots`.

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
        shots_per_category: int | None = None,
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
        if shots_per_category is not None and int(shots_per_category) < 1:
            msg = f"shots_per_category must be a positive number of images (or None for all), got {shots_per_category}"
            raise DatasetError(msg)
        self.shots_per_category = None if shots_per_category is None else int(shots_per_category)
        self.has_masks: bool | None = None  # known after setup: do all training batches carry masks?
        self._resolved_targets: tuple[str, list[str]] | None = None  # (repr of test_categories, names)

    # ------------------------------------------------------------------ naming (results folders)
    @property
    def name(self) -> str:
        """The *target* datamodule's own ``name`` (e.g. ``MVTecAD``, a ``Folder``'s name).

        anomalib's Engine writes a run to ``<default_root_dir>/<model>/<name>/<category>/`` and its
        visualiser places images by finding ``name``/``category`` in their paths; using the target's
        values makes a ``CrossDataset`` run land in the same tree, with the same image layout, as
        ``anomalib test --data <Target> --data.category <category>`` on the same data.
        """
        return self.target.name

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
        if self.shots_per_category is not None:
            train_samples = select_shots(train_samples, self.shots_per_category,
                                         0 if self.seed is None else int(self.seed))
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
        """Refuse any target image in training, by path, by file identity and by content.

        Same file: same device and inode (``os.stat``), which covers resolved paths, symlinks and
        hard links (``cp -al``). Same content: same size and, for those only, same BLAKE2 digest
        (a copy under another name or category). See :func:`find_shared_images`.
        """
        leaked = find_shared_images(train["image_path"], test["image_path"])
        if leaked:
            image, target, how = leaked[0]
            msg = (
                f"{len(leaked)} target (test) image(s) are also in the training sources, e.g. '{image}' "
                f"({how} '{target}'). Zero-shot evaluation must not train on target images: use another data set "
                "or exclude the target categories with `train_categories`."
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
            batch_sampler=MaskGroupedBatchSampler(SequentialSampler(self.train_data), self.train_batch_size,
                                                  has_mask=has_mask, seed=self.seed),
            num_workers=self.num_workers,
            collate_fn=self.external_collate_fn or self.train_data.collate_fn,
        )

    def val_dataloader(self) -> EVAL_DATALOADERS:
        """Target test split (same images as :meth:`test_dataloader`)."""
        return super().val_dataloader()


# ---------------------------------------------------------------------- few-shot auxiliary training
def _stratified_counts(k: int, normal: int, anomalous: int) -> tuple[int, int]:
    """How many normal and anomalous images make ``k`` shots of a category with these counts."""
    if k >= normal + anomalous:
        return normal, anomalous
    take_anomalous = round(k * anomalous / (normal + anomalous))
    if k >= 2 and normal and anomalous:  # both kinds present: at least one of each
        take_anomalous = min(max(take_anomalous, 1), k - 1)
    take_anomalous = min(take_anomalous, anomalous)
    take_normal = min(k - take_anomalous, normal)
    return take_normal, k - take_normal


def select_shots(samples: pd.DataFrame, k: int, seed: int) -> pd.DataFrame:
    """``k`` images of every ``(source, category)`` of a sample table, stratified by label.

    Within a category the numbers of normal and anomalous images follow the category's proportions
    (largest share rounded, at least one of each kind when both exist and ``k >= 2``). Each category
    is drawn with its own generator, seeded by ``(seed, crc32(source/category))`` over its images
    sorted by path: the draw does not depend on file listing order or on the other categories, and
    the same seed gives the same images. Categories with ``k`` images or fewer are kept whole.
    """
    kept: list[int] = []
    for (source, category), group in samples.groupby(["source", "category"], sort=True):
        rng = np.random.default_rng([seed, zlib.crc32(f"{source}/{category}".encode())])
        group = group.sort_values("image_path")
        normal = group.index[group["label_index"] == 0].to_numpy()
        anomalous = group.index[group["label_index"] == 1].to_numpy()
        take_normal, take_anomalous = _stratified_counts(k, len(normal), len(anomalous))
        kept += rng.permutation(normal)[:take_normal].tolist() + rng.permutation(anomalous)[:take_anomalous].tolist()
    selected = samples.loc[sorted(kept)].reset_index(drop=True)
    logger.info("Few-shot auxiliary training: %d of %d images (%d per category)", len(selected), len(samples), k)
    return selected


# ---------------------------------------------------------------------- overlap of training and target images
_HEAD_BYTES = 1 << 16


def _identity(path: Path) -> tuple[tuple[int, int] | None, int | None]:
    try:
        stat = path.stat()
    except OSError:  # missing (validate=False): compared by resolved path only
        return None, None
    return (stat.st_dev, stat.st_ino), stat.st_size


def _digest(path: Path, size: int, full: bool) -> bytes | None:
    """BLAKE2b of the first and last 64 KiB (``full=False``, a cheap pre-filter) or of the whole file."""
    digest = hashlib.blake2b(digest_size=20)
    try:
        with path.open("rb") as file:
            if full or size <= 2 * _HEAD_BYTES:
                for block in iter(lambda: file.read(1 << 20), b""):
                    digest.update(block)
            else:
                digest.update(file.read(_HEAD_BYTES))
                file.seek(-_HEAD_BYTES, os.SEEK_END)
                digest.update(file.read(_HEAD_BYTES))
    except OSError:
        return None
    return digest.digest()


def find_shared_images(train_paths: Sequence[str], test_paths: Sequence[str]) -> list[tuple[str, str, str]]:
    """Training images that are target images: ``[(train image, target image, how), ...]``.

    ``how`` is ``"the same file as"`` (same device and inode: same path, a symlink or a hard link) or
    ``"a byte-identical copy of"``. Every file is stat'ed once; only files whose size also occurs on
    the other side are read, first their first/last 64 KiB, then whole if those match, so the check
    stays cheap on real data sets (compressed images rarely share a size).
    """
    test_by_identity: dict[object, str] = {}
    test_by_size: dict[int, list[tuple[Path, str]]] = defaultdict(list)
    for name in test_paths:
        path = Path(name)
        identity, size = _identity(path)
        test_by_identity[identity if identity is not None else str(path.resolve())] = str(name)
        if size is not None:
            test_by_size[size].append((path, str(name)))

    leaked: list[tuple[str, str, str]] = []
    same_size: list[tuple[Path, str, int]] = []
    for name in train_paths:
        path = Path(name)
        identity, size = _identity(path)
        key = identity if identity is not None else str(path.resolve())
        if key in test_by_identity:
            leaked.append((str(name), test_by_identity[key], "the same file as"))
        elif size is not None and size in test_by_size:
            same_size.append((path, str(name), size))

    digests: dict[tuple[Path, bool], bytes | None] = {}

    def digest(path: Path, size: int, full: bool) -> bytes | None:
        if (path, full) not in digests:
            digests[(path, full)] = _digest(path, size, full)
        return digests[(path, full)]

    for path, name, size in same_size:
        for target_path, target_name in test_by_size[size]:
            head = digest(path, size, full=False)
            if head is None or head != digest(target_path, size, full=False):
                continue
            if size <= 2 * _HEAD_BYTES or digest(path, size, full=True) == digest(target_path, size, full=True):
                leaked.append((name, target_name, "a byte-identical copy of"))
                break
    return leaked
