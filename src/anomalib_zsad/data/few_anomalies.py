"""The few-anomaly (supervised) protocol as data: a target's normal training images plus ``k``
anomalous images with their masks drawn from its test split, which are then left out of evaluation.

BGAD (CVPR 2023) and the supervised methods it is compared with (DevNet, DRA, FCDD, ...) train
with ten anomalous images per MVTec AD category. :class:`FewAnomalies` wraps any anomalib image
datamodule of one category (``MVTecAD``, ``Visa``, ``BTech``, ``MPDD``, ``Folder``, the demo set) and
follows the authors' data code (``datasets/mvtec.py`` of xcyao00/BGAD):

* the draw: ``k // n_types`` images of each defect type (the folder an anomalous image lies in),
  then ``k % n_types`` more at random from the rest; seeded by ``seed``; images without a mask
  file are not drawn (their defects cannot be supervised at pixel level);
* the training split: the normal training images, each drawn anomaly ``reuse`` times (the code's
  "repeated utilisation", 5) and ``copy_paste`` times more as a copy-paste anomaly (the code's
  "RandAugmented CutPaste", 5): the anomalous image and its mask augmented together by three
  augmentations picked at random, and the masked region pasted onto a random normal training
  image (as the code's ``in_fg_region=False`` path; see ``copy_paste_item``);
* evaluation: validation and test splits without the drawn images (the code's ``--not_in_test``);
* the record: :attr:`FewAnomalies.drawn` (and :meth:`FewAnomalies.record`, written as JSON to
  ``record_path`` when given) says which images were used.

``k=0`` gives the normal training split alone and the full test split (BGAD w/o). With
``in_training=False`` the drawn images are only left out of evaluation: the way to evaluate an
unsupervised model (PatchCore, ...) on exactly the test images a supervised one is evaluated on.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import AnomalibDataModule, ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import read_image, read_mask
from torchvision import tv_tensors
from torchvision.transforms import v2

logger = logging.getLogger(__name__)

__all__ = ["FewAnomalies", "FewAnomalyTrainSet", "draw_anomalies"]


def _has_mask(path: Any) -> bool:  # noqa: ANN401
    return isinstance(path, str) and bool(path) and Path(path).is_file()


def draw_anomalies(samples: pd.DataFrame, k: int, seed: int = 0, per_defect_type: bool = True) -> pd.DataFrame:
    """``k`` anomalous rows of ``samples`` with a mask file, drawn as the authors' code does
    (``k // n_types`` per defect type, then ``k % n_types`` at random from the rest), seeded.
    Fewer candidates than ``k``: all of them, with a warning."""
    candidates = samples[(samples["label_index"] == 1) & samples["mask_path"].map(_has_mask)]
    candidates = candidates.drop_duplicates("image_path").sort_values("image_path", kind="stable")
    if k <= 0 or candidates.empty:
        if k > 0:
            logger.warning("FewAnomalies: no anomalous image with a mask to draw: training without anomalies")
        return candidates.iloc[:0]
    if len(candidates) <= k:
        if len(candidates) < k:
            logger.warning("FewAnomalies: k=%d but only %d anomalous images with masks: drawing them all",
                           k, len(candidates))
        return candidates
    rng = random.Random(seed)  # noqa: S311  (a reproducible draw, not security)
    types = candidates["image_path"].map(lambda p: Path(p).parent.name)
    if not per_defect_type:
        chosen = rng.sample(list(candidates.index), k)
        return candidates.loc[chosen].sort_values("image_path", kind="stable")
    names = sorted(types.unique())
    per_type = k // len(names)
    chosen, rest = [], []
    for name in names:
        rows = list(candidates.index[types == name])
        rng.shuffle(rows)
        chosen += rows[:per_type]
        rest += rows[per_type:]
    rng.shuffle(rest)
    chosen += rest[: k - len(chosen)]  # the code's k % n_types extra ones (and any a small type lacks)
    return candidates.loc[chosen].sort_values("image_path", kind="stable")


# ---------------------------------------------------------------------- copy-paste anomalies
class _Rotate90(v2.Transform):
    def __call__(self, *inputs: Any) -> Any:  # noqa: ANN401
        turns = int(torch.randint(4, ()))
        return tuple(type(x)(torch.rot90(x, turns, dims=(-2, -1))) for x in inputs)


class _Transpose(v2.Transform):
    def __call__(self, *inputs: Any) -> Any:  # noqa: ANN401
        return tuple(type(x)(x.transpose(-2, -1)) for x in inputs)


class _Flip(v2.Transform):
    """albumentations' ``Flip``: vertical, horizontal or both, at random."""

    def __call__(self, *inputs: Any) -> Any:  # noqa: ANN401
        dims = [(-2,), (-1,), (-2, -1)][int(torch.randint(3, ()))]
        return tuple(type(x)(torch.flip(x, dims=dims)) for x in inputs)


class _Elastic(v2.Transform):
    """torchvision's elastic transform with displacement and smoothness relative to the image size
    (a fixed sigma would be larger than a small image)."""

    def __init__(self, alpha: float, sigma: float) -> None:
        super().__init__()
        self.alpha, self.sigma = alpha, sigma

    def __call__(self, *inputs: Any) -> Any:  # noqa: ANN401
        side = min(inputs[0].shape[-2:])
        return v2.ElasticTransform(alpha=self.alpha * side, sigma=max(self.sigma * side, 0.1))(*inputs)


class _GaussNoise(v2.Transform):
    def __call__(self, image: Any, mask: Any) -> Any:  # noqa: ANN401
        noisy = (image + torch.randn_like(image) * (float(torch.empty(()).uniform_(10, 50)) ** 0.5 / 255)).clamp(0, 1)
        return tv_tensors.Image(noisy), mask


def copy_paste_augmenters() -> list[v2.Transform]:
    """The ten augmentations of the code's copy-paste (albumentations), in torchvision terms:
    rotate90, flip, transpose, optical distortion, noise (p 0.2), blur (p 0.2), shift-scale-rotate
    (p 0.2), distortion (p 0.2), contrast/sharpness (p 0.3), hue-saturation-value (p 0.3).
    Optical/grid/piecewise distortions become torchvision's elastic transform."""
    return [
        _Rotate90(),
        _Flip(),
        _Transpose(),
        _Elastic(alpha=0.12, sigma=0.05),
        v2.RandomApply([_GaussNoise()], p=0.2),
        v2.RandomApply([v2.GaussianBlur(3)], p=0.2),
        v2.RandomApply([v2.RandomAffine(degrees=45, translate=(0.0625, 0.0625), scale=(0.8, 1.2))], p=0.2),
        v2.RandomApply([_Elastic(alpha=0.08, sigma=0.04)], p=0.2),
        v2.RandomApply([v2.RandomChoice([v2.RandomAdjustSharpness(2.0, p=1.0),
                                         v2.ColorJitter(brightness=0.2, contrast=0.2)])], p=0.3),
        v2.RandomApply([v2.ColorJitter(brightness=0.08, saturation=0.12, hue=0.055)], p=0.3),
    ]


def _fit(image: torch.Tensor, mask: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    if tuple(image.shape[-2:]) == tuple(size):
        return image, mask
    image = F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), size=tuple(size), mode="nearest")[0, 0]
    return image, mask


def copy_paste_item(anomaly: torch.Tensor, mask: torch.Tensor, normal: torch.Tensor,
                    augmenters: Sequence[v2.Transform]) -> tuple[torch.Tensor, torch.Tensor]:
    """An anomalous image and its mask, augmented together by three of ``augmenters`` chosen at
    random, their masked pixels pasted onto ``normal``: (image, mask) at the normal image's size."""
    image, region = _fit(anomaly, mask, normal.shape[-2:])
    image, region = tv_tensors.Image(image), tv_tensors.Mask((region > 0).to(torch.uint8))
    for index in torch.randperm(len(augmenters))[:3].tolist():
        image, region = augmenters[index](image, region)
    image, region = _fit(image.as_subclass(torch.Tensor), region.as_subclass(torch.Tensor), normal.shape[-2:])
    pasted = region.bool()
    return torch.where(pasted, image, normal), pasted.to(torch.uint8)


class FewAnomalyTrainSet(AnomalibDataset):
    """Normal training images + reused anomalies + copy-paste anomalies (rows with ``synthetic``).

    Rows that are not synthetic are read by ``base`` (the wrapped datamodule's own training dataset:
    its reader, its masks); synthetic rows paste an augmented anomaly onto a random normal image
    at every access (new augmentations each time, as the code).
    """

    def __init__(self, base: AnomalibDataset, samples: pd.DataFrame) -> None:
        self.base = base
        super().__init__(augmentations=base.augmentations)
        self.samples = samples
        self.base._samples = self._samples  # noqa: SLF001  (the very same sorted table: row i is row i for both)
        self._normal_rows = [i for i, row in enumerate(self._samples.itertuples()) if row.label_index == 0]
        self._augmenters = copy_paste_augmenters()

    @property
    def augmentations(self) -> Any:  # noqa: ANN401
        return self.base.augmentations

    @augmentations.setter
    def augmentations(self, value: Any) -> None:  # noqa: ANN401
        self.base.augmentations = value

    @property
    def name(self) -> str:
        return f"FewAnomalies({self.base.name})"

    def __getitem__(self, index: int) -> ImageItem:
        row = self.samples.iloc[index]
        if not bool(row.synthetic):
            return self.base[index]
        anomaly = read_image(row.image_path, as_tensor=True)
        mask = read_mask(row.mask_path, as_tensor=True)
        if not self._normal_rows:
            msg = "copy-paste anomalies need normal training images to paste onto"
            raise RuntimeError(msg)
        normal_path = self.samples.iloc[self._normal_rows[int(torch.randint(len(self._normal_rows), ()))]].image_path
        normal = read_image(normal_path, as_tensor=True)
        image, gt_mask = copy_paste_item(anomaly.as_subclass(torch.Tensor), (mask > 0).as_subclass(torch.Tensor),
                                         normal.as_subclass(torch.Tensor), self._augmenters)
        image, gt_mask = tv_tensors.Image(image), tv_tensors.Mask(gt_mask)
        if self.augmentations:
            image, gt_mask = self.augmentations(image, gt_mask)
        return ImageItem(image=image, gt_mask=gt_mask, gt_label=torch.tensor(1), image_path=row.image_path,
                         mask_path=row.mask_path)


class FewAnomalies(AnomalibDataModule):
    """One category's normal training images plus ``k`` of its anomalous test images (with masks);
    validation and test without them.

    Args:
        datamodule: an anomalib image datamodule of one category, e.g. ``MVTecAD(root=..., category="bottle")``,
            ``Folder(...)``, ``ZSADDemo(...)``.
        k: anomalous images drawn from the test split (BGAD: 10 per category); 0: none.
        seed: seed of the draw (and of the training batch order).
        per_defect_type: spread the draw over the defect types as the authors' code (else at random).
        reuse: times each drawn image appears in the training split (the code's 5).
        copy_paste: copy-paste anomalies made from each drawn image per epoch (the code's 5; 0: none).
        in_training: False: the drawn images are only removed from evaluation (an unsupervised model
            evaluated on the supervised protocol's test images).
        record_path: a JSON file to write the record of the draw to (see :meth:`record`).
        train_batch_size: training batch size; None: the wrapped datamodule's (BGAD's code: 32).
        eval_batch_size: validation/test batch size; None: the wrapped datamodule's.
        num_workers: DataLoader workers; None: the wrapped datamodule's.
    """

    def __init__(
        self,
        datamodule: AnomalibDataModule,
        k: int = 10,
        seed: int = 0,
        per_defect_type: bool = True,
        reuse: int = 5,
        copy_paste: int = 5,
        in_training: bool = True,
        record_path: str | Path | None = None,
        train_batch_size: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
    ) -> None:
        if not isinstance(datamodule, AnomalibDataModule):
            msg = f"FewAnomalies wraps an anomalib datamodule, got {type(datamodule).__name__}"
            raise TypeError(msg)
        problems = [f"{name} must be >= 0, got {value!r}" for name, value in
                    (("k", k), ("reuse", reuse), ("copy_paste", copy_paste)) if not isinstance(value, int) or value < 0]
        if problems:
            raise ValueError("FewAnomalies: " + "; ".join(problems))
        super().__init__(
            train_batch_size=train_batch_size or datamodule.train_batch_size,
            eval_batch_size=eval_batch_size or datamodule.eval_batch_size,
            num_workers=datamodule.num_workers if num_workers is None else num_workers,
            train_augmentations=datamodule.train_augmentations,
            val_augmentations=datamodule.val_augmentations,
            test_augmentations=datamodule.test_augmentations,
            seed=seed,
        )
        self.inner = datamodule
        self.k = k
        self.per_defect_type = per_defect_type
        self.reuse = reuse
        self.copy_paste = copy_paste
        self.in_training = in_training
        self.record_path = Path(record_path) if record_path is not None else None
        self.drawn: pd.DataFrame | None = None

    @property
    def name(self) -> str:
        """The wrapped datamodule's name: runs land in the same results tree."""
        return self.inner.name

    @property
    def category(self) -> str:
        return self.inner.category

    @category.setter
    def category(self, category: str) -> None:  # anomalib's base __init__ assigns it
        self._category = category

    def prepare_data(self) -> None:
        self.inner.prepare_data()

    def _setup(self, _stage: str | None = None) -> None:
        self.inner.setup(_stage)
        evaluation = [self.inner.test_data] + ([self.inner.val_data] if hasattr(self.inner, "val_data") else [])
        pool = pd.concat([d.samples for d in evaluation], ignore_index=True)
        self.drawn = draw_anomalies(pool, self.k, seed=self.seed or 0, per_defect_type=self.per_defect_type)
        drawn = set(self.drawn["image_path"])
        self.test_data = _without(self.inner.test_data, drawn)
        if hasattr(self.inner, "val_data"):
            self.val_data = _without(self.inner.val_data, drawn)
        train = self.inner.train_data
        if self.in_training and drawn:
            self.train_data = FewAnomalyTrainSet(copy.deepcopy(train), self._training_samples(train.samples))
        else:
            self.train_data = train
        logger.info("FewAnomalies: %s/%s: %d anomalous images %s (%s); %d left for evaluation", self.name,
                    self.category, len(drawn), "trained on" if self.in_training else "left out",
                    sorted(Path(p).name for p in drawn), len(self.test_data))
        if self.record_path is not None:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            self.record_path.write_text(json.dumps(self.record(), indent=2))

    def _training_samples(self, normal: pd.DataFrame) -> pd.DataFrame:
        anomalies = self.drawn.assign(split="train")
        columns = list(normal.columns)
        parts = [normal.assign(synthetic=False)]
        parts += [anomalies[columns].assign(synthetic=False)] * self.reuse
        parts += [anomalies[columns].assign(synthetic=True)] * self.copy_paste
        samples = pd.concat(parts, ignore_index=True)
        samples.attrs["task"] = "segmentation"
        return samples

    def _create_test_split(self) -> None:
        """The wrapped datamodule made its splits; the drawn images are already removed."""

    def _create_val_split(self) -> None:
        """As :meth:`_create_test_split`."""

    def record(self) -> dict[str, Any]:
        """Which anomalous images were drawn (and so trained on, and left out of evaluation)."""
        drawn = self.drawn if self.drawn is not None else pd.DataFrame(columns=["image_path", "mask_path"])
        return {
            "datamodule": type(self.inner).__name__,
            "root": str(getattr(self.inner, "root", "")),
            "category": self.category,
            "k": self.k,
            "seed": self.seed,
            "per_defect_type": self.per_defect_type,
            "in_training": self.in_training,
            "reuse": self.reuse,
            "copy_paste": self.copy_paste,
            "drawn": [{"image_path": str(r.image_path), "mask_path": str(r.mask_path),
                       "defect_type": Path(str(r.image_path)).parent.name} for r in drawn.itertuples()],
        }


def _without(dataset: AnomalibDataset, paths: set[str]) -> AnomalibDataset:
    if not paths:
        return dataset
    kept = dataset.samples[~dataset.samples["image_path"].isin(paths)]
    task = dataset.samples.attrs.get("task")
    result = copy.copy(dataset)
    result.samples = kept.reset_index(drop=True)
    if task is not None:
        result.samples.attrs["task"] = task
    return result
