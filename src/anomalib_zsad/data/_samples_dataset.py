"""A dataset over a pooled sample table from several data sets/categories, plus a sampler.

Also :class:`RGBReadingMixin`, which makes any anomalib image dataset read with the plugin's
:func:`~anomalib_zsad.data.image_io.read_image_rgb` (16-bit/gray/RGBA-safe, named errors) without
touching anomalib's own ``read_image``.

Why not anomalib's datasets: ``MVTecADDataset + VisaDataset`` is refused (``__add__`` needs one
class), and the base ``__getitem__`` cannot express "this source has no masks" per sample.
Here each row carries ``has_mask``; rows without masks yield ``gt_mask=None`` and
:class:`MaskGroupedBatchSampler` keeps them out of batches with masks, so a batch's
``gt_mask`` is either a tensor for every image or ``None`` (the model's signal to train the
image-level loss only).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import pandas as pd
import torch
from anomalib import TaskType
from anomalib.data import ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName
from torch.utils.data import BatchSampler, Sampler
from torchvision.tv_tensors import Mask

from anomalib_zsad.data.image_io import read_image_rgb, read_mask_binary


class RGBReadingMixin:
    """Put before an anomalib image dataset class: items are read with :func:`read_image_rgb`.

    Same item contract as ``AnomalibDataset.__getitem__`` (anomalib 2.7): a zero mask for normal
    images of a segmentation set, ``gt_mask``/``gt_label`` None for unknown labels. Masks are read
    as binary (non-zero = anomalous) with errors that name the file.
    """

    def __getitem__(self, index: int) -> ImageItem:
        """Load one sample with the plugin's readers."""
        row = self.samples.iloc[index]
        image = read_image_rgb(row.image_path, as_tensor=True)
        label = int(row.label_index)
        gt_mask = None
        if self.task == TaskType.SEGMENTATION:
            if label == LabelName.NORMAL:
                gt_mask = Mask(torch.zeros(image.shape[-2:], dtype=torch.uint8))
            elif label == LabelName.ABNORMAL:
                gt_mask = read_mask_binary(row.mask_path, as_tensor=True)
        if self.augmentations:
            if self.task == TaskType.CLASSIFICATION:
                image = self.augmentations(image)
            elif self.task == TaskType.SEGMENTATION:
                scratch = gt_mask if gt_mask is not None else Mask(torch.zeros(image.shape[-2:], dtype=torch.uint8))
                image, augmented = self.augmentations(image, scratch)
                gt_mask = augmented if gt_mask is not None else None
        return ImageItem(
            image=image,
            gt_mask=gt_mask,
            gt_label=None if label == LabelName.UNKNOWN else torch.tensor(label),
            image_path=row.image_path,
            mask_path=row.mask_path,
        )


class PooledDataset(AnomalibDataset):
    """Test-split samples pooled over sources/categories (columns: see ``_sources.SAMPLE_COLUMNS``).

    Images are read with :func:`read_image_rgb` (any mode / bit depth -> RGB, named errors).
    ``task`` is segmentation when any row has masks.
    """

    def __init__(self, samples: pd.DataFrame, name: str = "Pooled") -> None:
        super().__init__()
        self._name = name
        samples = samples.reset_index(drop=True).copy()
        samples["split"] = "test"
        samples["label"] = samples["label_index"].map({0: "normal", 1: "abnormal"})
        samples.attrs["task"] = "segmentation" if bool(samples["has_mask"].any()) else "classification"
        self.samples = samples

    @property
    def name(self) -> str:
        """Name given at construction (used in logs)."""
        return self._name

    @property
    def categories(self) -> list[str]:
        """Sorted distinct category names in this dataset."""
        return sorted(self.samples["category"].unique())

    def __getitem__(self, index: int) -> ImageItem:
        """Load one sample; ``gt_mask`` is None for rows of mask-less sources."""
        row = self.samples.iloc[index]
        image = read_image_rgb(row.image_path, as_tensor=True)
        label = int(row.label_index)
        gt_mask = None
        if row.has_mask:
            if label == 1:
                gt_mask = read_mask_binary(row.mask_path, as_tensor=True)
                for extra in getattr(row, "extra_mask_paths", None) or ():  # MVTec LOCO: one mask per defect
                    gt_mask = Mask(gt_mask | read_mask_binary(extra, as_tensor=True))
            else:
                gt_mask = Mask(torch.zeros(image.shape[-2:], dtype=torch.uint8))
        if self.augmentations is not None:
            if gt_mask is None:
                image = self.augmentations(image)
            else:
                image, gt_mask = self.augmentations(image, gt_mask)
        return ImageItem(
            image=image,
            gt_mask=gt_mask,
            gt_label=torch.tensor(label),
            image_path=str(row.image_path),
            mask_path=str(row.mask_path),
        )


class MaskGroupedBatchSampler(BatchSampler):
    """Shuffled batches that never mix samples with and without masks, in one process or under DDP.

    Each group is shuffled and cut into batches; the batch order is then shuffled, so both kinds
    are interleaved over an epoch. A new permutation is drawn every epoch (``seed`` + epoch
    counter when a seed is given, for reproducibility).

    Under distributed training Lightning rebuilds a loader's batch sampler with its
    ``DistributedSampler`` as ``sampler`` (it finds that argument by name). This sampler reads only
    the rank and the number of processes from it: every process draws the same global batch list
    (from ``seed``, else the distributed sampler's seed), pads it by repeating its first batches to
    a multiple of the number of processes, and takes every n-th batch. So each process runs the same
    number of steps (DDP needs that), no image is missed, and no batch mixes the two kinds. Grouping
    the distributed sampler's own shard instead would give the processes different numbers of
    batches, and the old signature made Lightning pass that sampler as ``has_mask``.
    """

    def __init__(self, sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool = False, *,
                 has_mask: Sequence[bool], seed: int | None = None) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.has_mask = list(has_mask)
        self.groups = [[i for i, m in enumerate(self.has_mask) if m], [i for i, m in enumerate(self.has_mask) if not m]]
        self.seed = seed
        self._epoch = 0

    def _replicas(self) -> tuple[int, int]:
        """(rank, number of processes) of a distributed sampler, else (0, 1)."""
        return int(getattr(self.sampler, "rank", 0)), int(getattr(self.sampler, "num_replicas", 1))

    def _generator(self, replicas: int) -> torch.Generator:
        generator = torch.Generator()
        seed = self.seed if self.seed is not None or replicas == 1 else int(getattr(self.sampler, "seed", 0))
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed + self._epoch)
        return generator

    def _batches(self, generator: torch.Generator) -> list[list[int]]:
        batches = []
        for group in self.groups:
            order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        return batches

    def _global_count(self) -> int:
        sizes = [len(g) for g in self.groups]
        if self.drop_last:
            return sum(s // self.batch_size for s in sizes)
        return sum(-(-s // self.batch_size) for s in sizes)

    def __iter__(self) -> Iterator[list[int]]:
        rank, replicas = self._replicas()
        generator = self._generator(replicas)
        self._epoch += 1
        batches = self._batches(generator)
        order = torch.randperm(len(batches), generator=generator).tolist()
        if replicas > 1 and order:
            padded = -(-len(order) // replicas) * replicas  # repeat the first batches up to a multiple
            order = (order * replicas)[:padded][rank::replicas]
        for i in order:
            yield batches[i]

    def __len__(self) -> int:
        _, replicas = self._replicas()
        return (self._global_count() + replicas - 1) // replicas
