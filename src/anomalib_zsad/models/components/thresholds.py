"""Where the thresholds that turn scores into labels and masks come from.

Zero-shot users have no labelled target data, so anomalib's threshold (F1-optimal on the
labelled validation set; in :class:`~anomalib_zsad.data.CrossDataset` the validation set *is*
the target's test split) is an oracle, not something a user can have. The post-processor
(:class:`~anomalib_zsad.models.components.post_processing.RawScorePostProcessor`) takes one of
these sources, the same for every plugin model:

* :class:`ValidationThresholds` (default): anomalib's, F1-optimal on the labelled validation set;
* :class:`AuxiliaryThresholds`: F1-optimal (image and pixel) on a held-out part of the
  *auxiliary* data the model is trained on; the part is taken out of the training data when
  training starts (never trained on);
* :class:`NormalImageThresholds`: a quantile of the scores, and of the map values, of ``k``
  normal images of the target (its train split, or a folder), which are never evaluated on;
* :class:`FixedThresholds`: given values.

Each source gives the thresholds and the range of the scores and maps it saw (the statistics of
anomalib's normalisation, used for the optional calibrated score). The post-processor keeps them
in its buffers (so they are in the checkpoint and the exported graphs) and the source's settings
and a summary in the checkpoint's ``anomalib_post_processor_config``.

``python -m anomalib_zsad.models.components.thresholds model.ckpt`` prints what a checkpoint holds.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from anomalib.data import ImageBatch, ImageItem
from torchvision.tv_tensors import Mask

from .references import target_train_split

logger = logging.getLogger(__name__)

#: Where a datamodule keeps the part of its training data held out for thresholds.
HOLDOUT_ATTRIBUTE = "zsad_threshold_holdout"


@dataclass
class ThresholdStatistics:
    """Thresholds and normalisation statistics found by a source, and a summary for people."""

    image_threshold: float = math.nan
    pixel_threshold: float = math.nan
    image_min: float = math.nan
    image_max: float = math.nan
    pixel_min: float = math.nan
    pixel_max: float = math.nan
    info: dict[str, Any] = field(default_factory=dict)


class ThresholdSource:
    """Base class: ``compute`` gives :class:`ThresholdStatistics` for a model (None: nothing to do)."""

    name: ClassVar[str] = "base"
    #: Found by anomalib's own validation hooks (labelled validation data needed).
    from_validation: ClassVar[bool] = False
    #: Computed at the start of test/predict where the checkpoint has none.
    computes_at_inference: ClassVar[bool] = False

    def config(self) -> dict[str, Any]:
        """Plain data that rebuilds the source (:func:`source_from_config`)."""
        return {"source": self.name, **self._params()}

    def _params(self) -> dict[str, Any]:
        return {}

    def prepare(self, trainer: Any, stage: str) -> None:  # noqa: ANN401
        """Called at the post-processor's ``setup`` (after the datamodule's)."""

    def compute(self, module: Any, datamodule: Any) -> ThresholdStatistics | None:  # noqa: ANN401
        del module, datamodule
        return None

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ThresholdSource) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(repr(self))


class ValidationThresholds(ThresholdSource):
    """anomalib's: F1-optimal image and pixel thresholds on the labelled validation set, min/max
    of its scores and maps (with a ``CrossDataset`` that is the target's test split: an oracle)."""

    name = "validation"
    from_validation = True


class FixedThresholds(ThresholdSource):
    """Given thresholds, on the model's raw scale (``image`` for ``pred_score``, ``pixel`` for
    ``anomaly_map``). They have no score range: the calibrated score leaves scores raw."""

    name = "fixed"

    def __init__(self, image: float, pixel: float) -> None:
        values = {"image": image, "pixel": pixel}
        bad = {k: v for k, v in values.items()
               if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)}
        if bad:
            msg = f"FixedThresholds needs finite numbers, got {bad}"
            raise ValueError(msg)
        self.image, self.pixel = float(image), float(pixel)

    def _params(self) -> dict[str, Any]:
        return {"image": self.image, "pixel": self.pixel}

    def compute(self, module: Any, datamodule: Any) -> ThresholdStatistics:  # noqa: ANN401
        del module, datamodule
        return ThresholdStatistics(self.image, self.pixel, info={"source": self.name})


def _check_fraction(name: str, value: float, low_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        (0 < value < 1) if low_open else (0 <= value <= 1))
    if not ok:
        msg = f"{name} must be in {'(0, 1)' if low_open else '[0, 1]'}, got {value!r}"
        raise ValueError(msg)


class AuxiliaryThresholds(ThresholdSource):
    """F1-optimal image and pixel thresholds on a held-out part of the auxiliary (training) data.

    When ``anomalib train``/``fit`` (or ``validate``) starts, ``holdout`` of the datamodule's
    training data, drawn per (category, label) with ``seed``, is taken out of ``train_data``: the
    model never trains on it. At each validation epoch end (so every checkpoint holds them) the
    model is run on it and the F1-optimal thresholds are found, the pixel one on at most
    ``max_pixels_per_image`` random pixels of each map (None: all); the threshold is placed between
    two scores so that anomalib's ``score > threshold`` reaches the F1-max (anomalib's own adaptive
    threshold misses it by the one image at the threshold). The training data must
    contain anomalous images (a ``CrossDataset``); the target is never used.
    """

    name = "auxiliary"

    def __init__(self, holdout: float = 0.2, seed: int = 0, max_pixels_per_image: int | None = 65536) -> None:
        _check_fraction("holdout", holdout)
        if max_pixels_per_image is not None and (not isinstance(max_pixels_per_image, int) or max_pixels_per_image < 1):
            msg = f"max_pixels_per_image must be a positive int or None, got {max_pixels_per_image!r}"
            raise ValueError(msg)
        self.holdout, self.seed, self.max_pixels_per_image = float(holdout), int(seed), max_pixels_per_image

    def _params(self) -> dict[str, Any]:
        return {"holdout": self.holdout, "seed": self.seed, "max_pixels_per_image": self.max_pixels_per_image}

    def prepare(self, trainer: Any, stage: str) -> None:  # noqa: ANN401
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
        if stage in {"fit", "validate"} and getattr(trainer, "datamodule", None) is not None:
            holdout_split(trainer.datamodule, self.holdout, self.seed, trained=stage == "fit")

    def compute(self, module: Any, datamodule: Any) -> ThresholdStatistics:  # noqa: ANN401
        held = getattr(datamodule, HOLDOUT_ATTRIBUTE, None)
        if held is None:
            if datamodule is None or getattr(datamodule, "train_data", None) is None:
                msg = ("threshold source 'auxiliary' needs the auxiliary training data: run anomalib train/fit or "
                       "validate with the CrossDataset the model is trained on")
                raise ValueError(msg)
            holdout_split(datamodule, self.holdout, self.seed, trained=False)
            held = getattr(datamodule, HOLDOUT_ATTRIBUTE)
        dataset = held["dataset"]
        generator = torch.Generator().manual_seed(self.seed)
        scores, labels, map_values, mask_values = [], [], [], []
        size = _eval_batch_size(datamodule)
        for batch in (b for part in _mask_groups(dataset) for b in run_model(module, part, size)):
            score, label = batch.pred_score.reshape(-1).float().cpu(), batch.gt_label.reshape(-1).int().cpu()
            scores.append(score)
            labels.append(label)
            if batch.gt_mask is None or batch.anomaly_map is None:
                continue
            amap = batch.anomaly_map.float().cpu().reshape(len(score), -1)
            mask = (batch.gt_mask.reshape(len(score), -1).cpu() > 0).int()
            if self.max_pixels_per_image is not None and amap.shape[1] > self.max_pixels_per_image:
                index = torch.randperm(amap.shape[1], generator=generator)[: self.max_pixels_per_image]
                amap, mask = amap[:, index], mask[:, index]
            map_values.append(amap.flatten())
            mask_values.append(mask.flatten())
        scores_all, labels_all = torch.cat(scores), torch.cat(labels)
        if not bool((labels_all == 1).any()) or not bool((labels_all == 0).any()):
            msg = (f"the auxiliary hold-out ({len(labels_all)} images) needs normal and anomalous images: "
                   "use auxiliary data with anomalies (CrossDataset) or a larger holdout")
            raise ValueError(msg)
        stats = ThresholdStatistics(image_threshold=f1_optimal_threshold(scores_all, labels_all),
                                    image_min=float(scores_all.min()), image_max=float(scores_all.max()))
        info = {"source": self.name, "images": len(labels_all), "anomalous": int(labels_all.sum()),
                "held_out_during_training": bool(held["trained"]),
                "image_f1": f1_at(scores_all, labels_all, stats.image_threshold)}
        if map_values:
            maps_all, masks_all = torch.cat(map_values), torch.cat(mask_values)
            if bool(masks_all.any()):
                stats.pixel_threshold = f1_optimal_threshold(maps_all, masks_all)
                info["pixel_f1"] = f1_at(maps_all, masks_all, stats.pixel_threshold)
            stats.pixel_min, stats.pixel_max = float(maps_all.min()), float(maps_all.max())
        stats.info = info
        return stats


class NormalImageThresholds(ThresholdSource):
    """Thresholds from ``k`` normal images of the target, no labels needed.

    The image threshold is the ``image_quantile`` quantile of their scores, the pixel threshold the
    ``pixel_quantile`` quantile of all their map values (linear interpolation, numpy's default);
    with ``k`` images the image score of a new normal image exceeds their maximum with probability
    about 1 / (k + 1). The images are ``k`` drawn with ``seed`` from ``folder`` (a folder of normal
    images) or, without one, from the target's train split (normal images only, disjoint from the
    test split that is evaluated): for a ``CrossDataset`` the target datamodule's train split of the
    test category, otherwise the datamodule's own train split. Recomputed at each validation epoch
    end (the model changes while it trains), and at the start of test/predict where the thresholds
    are unknown (an official checkpoint: ``anomalib predict`` then needs no validation).
    """

    name = "normal_images"
    computes_at_inference = True

    def __init__(self, k: int = 8, image_quantile: float = 0.99, pixel_quantile: float = 0.999,
                 folder: str | None = None, seed: int = 0) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            msg = f"k must be a positive int, got {k!r}"
            raise ValueError(msg)
        _check_fraction("image_quantile", image_quantile, low_open=False)
        _check_fraction("pixel_quantile", pixel_quantile, low_open=False)
        self.k, self.image_quantile, self.pixel_quantile = k, float(image_quantile), float(pixel_quantile)
        self.folder = None if folder is None else str(folder)
        self.seed = int(seed)

    def _params(self) -> dict[str, Any]:
        return {"k": self.k, "image_quantile": self.image_quantile, "pixel_quantile": self.pixel_quantile,
                "folder": self.folder, "seed": self.seed}

    def images(self, datamodule: Any) -> Any:  # noqa: ANN401
        """The ``k`` normal images (a dataset), drawn with ``seed``."""
        if self.folder is not None:
            from anomalib.data import PredictDataset

            dataset = PredictDataset(Path(self.folder).expanduser())
        elif datamodule is not None:
            dataset = target_train_split(datamodule)
        else:
            msg = ("threshold source 'normal_images' needs normal target images: give its folder "
                   "(--model.post_processor.threshold_source.folder path/to/good) or data with a train split")
            raise ValueError(msg)
        return draw_normal_images(dataset, self.k, self.seed)

    def compute(self, module: Any, datamodule: Any) -> ThresholdStatistics:  # noqa: ANN401
        dataset = self.images(datamodule)
        scores, maps, paths = [], [], []
        for batch in run_model(module, dataset, _eval_batch_size(datamodule)):
            scores.append(batch.pred_score.reshape(-1).float().cpu())
            if batch.anomaly_map is not None:
                maps.append(batch.anomaly_map.float().cpu().flatten())
            paths.extend(batch.image_path or [])
        scores_all = torch.cat(scores).numpy()
        stats = ThresholdStatistics(image_threshold=float(np.quantile(scores_all, self.image_quantile)),
                                    image_min=float(scores_all.min()), image_max=float(scores_all.max()))
        if maps:
            values = torch.cat(maps).numpy()
            stats.pixel_threshold = float(np.quantile(values, self.pixel_quantile))
            stats.pixel_min, stats.pixel_max = float(values.min()), float(values.max())
        stats.info = {"source": self.name, "images": len(scores_all),
                      "image_paths": [str(Path(p).name) for p in paths][:64]}
        return stats


SOURCES: dict[str, type[ThresholdSource]] = {cls.name: cls for cls in (
    ValidationThresholds, AuxiliaryThresholds, NormalImageThresholds, FixedThresholds)}


def source_from_config(value: ThresholdSource | str | dict | None) -> ThresholdSource:
    """A source from an instance, a name (``"validation"``, ``"auxiliary"``, ``"normal_images"``:
    default settings) or a :meth:`ThresholdSource.config` dict; None is the validation source."""
    if value is None:
        return ValidationThresholds()
    if isinstance(value, ThresholdSource):
        return value
    if isinstance(value, str):
        value = {"source": value}
    if isinstance(value, dict):
        params = dict(value)
        name = params.pop("source", None)
        if name not in SOURCES:
            msg = f"threshold source must be one of {sorted(SOURCES)}, got {name!r}"
            raise ValueError(msg)
        try:
            return SOURCES[name](**params)
        except TypeError as error:
            msg = f"threshold source {name!r}: {error}"
            raise ValueError(msg) from error
    msg = f"threshold_source must be a ThresholdSource, a name or a dict, got {type(value).__name__}"
    raise TypeError(msg)


# ---------------------------------------------------------------------- data: hold-out and reference images
def holdout_split(datamodule: Any, fraction: float, seed: int, trained: bool) -> Any:  # noqa: ANN401
    """Take ``fraction`` of ``datamodule.train_data`` out of it, per (category, label) group with
    ``seed``, and keep it on the datamodule (attribute :data:`HOLDOUT_ATTRIBUTE`). Done once per
    training data set: a second call on the same datamodule returns the same part."""
    train = getattr(datamodule, "train_data", None)
    held = getattr(datamodule, HOLDOUT_ATTRIBUTE, None)
    if held is not None and held["train"] is train and held["fraction"] == fraction and held["seed"] == seed:
        return held["dataset"]
    if train is None or not hasattr(train, "samples"):
        msg = "threshold source 'auxiliary' needs a datamodule with a train_data set (the auxiliary data)"
        raise ValueError(msg)
    samples = train.samples
    keys = [column for column in ("source", "category", "label_index") if column in samples.columns]
    generator = np.random.default_rng(seed)
    held_out: list[int] = []
    groups = samples.groupby(keys, sort=True).indices if keys else {"all": np.arange(len(samples))}
    for _, indices in sorted(groups.items(), key=lambda item: str(item[0])):
        count = round(fraction * len(indices))
        if count == 0 and len(indices) > 1 and generator.random() < fraction * len(indices):
            count = 1
        held_out.extend(sorted(generator.permutation(indices)[:count].tolist()))
    if not held_out or len(held_out) == len(samples):
        msg = f"holdout {fraction} of {len(samples)} training images leaves no hold-out or no training data"
        raise ValueError(msg)
    kept = sorted(set(range(len(samples))) - set(held_out))
    dataset = train.subsample(sorted(held_out))
    datamodule.train_data = train.subsample(kept)
    setattr(datamodule, HOLDOUT_ATTRIBUTE, {"train": datamodule.train_data, "dataset": dataset,
                                            "fraction": fraction, "seed": seed, "trained": trained})
    logger.info("Thresholds: %d of %d auxiliary training images held out (never trained on)",
                len(held_out), len(samples))
    return dataset


def draw_normal_images(dataset: Any, k: int, seed: int) -> Any:  # noqa: ANN401
    """``k`` images drawn with ``seed`` (normal ones only where the dataset has labels), as a
    list of indices wrapped in a small dataset view."""
    samples = getattr(dataset, "samples", None)
    candidates = list(range(len(dataset)))
    if samples is not None and "label_index" in samples.columns:
        candidates = [i for i in candidates if int(samples["label_index"].iloc[i]) == 0]
    if not candidates:
        msg = "no normal images found for the thresholds"
        raise ValueError(msg)
    if len(candidates) < k:
        logger.warning("normal_images: k=%d but only %d normal images: using them all", k, len(candidates))
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:k].tolist()
    return _Subset(dataset, sorted(candidates[i] for i in order))


class _Subset:
    def __init__(self, dataset: Any, indices: list[int]) -> None:  # noqa: ANN401
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:  # noqa: ANN401
        return self.dataset[self.indices[index]]


def _mask_groups(dataset: Any) -> list[Any]:  # noqa: ANN401
    """A pooled set with and without masks (``has_mask``) as two sets: a batch is all one kind."""
    samples = getattr(dataset, "samples", None)
    if samples is None or "has_mask" not in samples.columns or samples["has_mask"].nunique() < 2:
        return [dataset]
    flags = samples["has_mask"].to_numpy()
    return [dataset.subsample(np.flatnonzero(flags == flag).tolist()) for flag in (True, False)]


def _eval_batch_size(datamodule: Any) -> int:  # noqa: ANN401
    return int(getattr(datamodule, "eval_batch_size", 8) or 8)


# ---------------------------------------------------------------------- running the model
def run_model(module: Any, dataset: Any, batch_size: int = 8) -> Any:  # noqa: ANN401
    """Batches of ``dataset`` pre-processed as in test (the module's pre-processor transform, item
    by item: images of any size) and scored by the module's validation step, outside inference
    mode and without gradients; the module is in eval mode meanwhile (each submodule's mode is
    restored afterwards)."""
    transform = getattr(getattr(module, "pre_processor", None), "transform", None)
    modes = [(child, child.training) for child in module.modules()]  # restored exactly (frozen parts stay eval)
    trainer = getattr(module, "_trainer", None)
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    context = plugin.forward_context() if plugin is not None else contextlib.nullcontext()
    module.eval()
    try:
        with torch.inference_mode(False), torch.no_grad():
            ready = getattr(module, "ready_for_inference", None)
            if callable(ready):
                ready()
            for start in range(0, len(dataset), batch_size):
                items = [_prepared(dataset[i], transform) for i in range(start, min(start + batch_size, len(dataset)))]
                batch = ImageBatch.collate(items)
                batch.image = batch.image.to(module.device)
                with context:
                    yield module.validation_step(batch)
    finally:
        for child, training in modes:
            child.training = training


def _prepared(item: Any, transform: Any) -> ImageItem:  # noqa: ANN401
    image, mask = item.image, getattr(item, "gt_mask", None)
    if transform is not None:
        if mask is not None:
            image, mask = transform(image, Mask(mask))
        else:
            image = transform(image)
    return ImageItem(image=image.as_subclass(torch.Tensor), gt_mask=None if mask is None else Mask(mask),
                     gt_label=getattr(item, "gt_label", None), image_path=getattr(item, "image_path", None))


def f1_optimal_threshold(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The threshold ``t`` whose labels ``scores > t`` (anomalib's rule) have the highest F1.

    anomalib's ``F1AdaptiveThreshold`` returns the score ``s`` at which ``scores >= s`` is best, and
    its post-processor then labels ``scores > s``, which drops the image at ``s``; here the
    threshold is half-way between that score and the next lower one, so ``>`` gives the best F1.
    """
    from torchmetrics.functional.classification import binary_precision_recall_curve

    scores, labels = scores.flatten().float(), labels.flatten().int()
    precision, recall, thresholds = binary_precision_recall_curve(scores, labels)
    f1 = torch.nan_to_num(2 * precision * recall / (precision + recall + 1e-10))[: len(thresholds)]
    best = float(thresholds[int(torch.argmax(f1))])
    lower = scores[scores < best]
    return (best + float(lower.max())) / 2 if lower.numel() else best - max(abs(best) * 1e-6, 1e-12)


def f1_at(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> float:
    """F1 of ``scores > threshold`` against binary ``labels``."""
    predicted, truth = scores > threshold, labels.bool()
    tp = int((predicted & truth).sum())
    fp, fn = int((predicted & ~truth).sum()), int((~predicted & truth).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


# ---------------------------------------------------------------------- what a checkpoint holds
def describe_checkpoint(path: str | Path) -> str:
    """The threshold source, thresholds and statistics of a Lightning checkpoint, as text."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    config = checkpoint.get("anomalib_post_processor_config") or {}
    state = checkpoint.get("state_dict", {})
    lines = [f"threshold source: {config.get('threshold_source', {'source': 'validation'})}"]
    for name in ("_image_threshold", "_pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max"):
        value = state.get(f"post_processor.{name}")
        lines.append(f"{name.lstrip('_')}: {float(value) if value is not None else 'absent'}")
    lines.append(f"calibrated scores (enable_normalization): {config.get('enable_normalization')}")
    lines.append(f"statistics: {config.get('threshold_statistics', {})}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    for argument in sys.argv[1:]:
        print(f"{argument}\n{describe_checkpoint(argument)}")
