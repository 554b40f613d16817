"""Labels and masks from raw thresholds, and where those thresholds come from.

The papers report raw scores, so the plugin's models keep anomalib's normalisation off. anomalib
2.7's ``PostProcessor`` then still compares the raw scores with its *normalised* threshold (0.5,
from the sensitivity), so ``pred_label`` and ``pred_mask`` ignored what validation learnt (an
AnomalyCLIP map of 0.2-4 was "anomalous" everywhere), in ``Engine.test``/``predict`` and in the
exported graphs alike. Here the raw thresholds are used where normalisation is off.

The thresholds come from a *threshold source* (:mod:`.thresholds`): the labelled validation set
(anomalib's, the default), a held-out part of the auxiliary training data, ``k`` normal target
images, or fixed values. They live in anomalib's buffers (``_image_threshold``,
``_pixel_threshold``, ``image_min`` ...), so the checkpoint and every exported graph carry them;
the source's settings and a summary are in the checkpoint's ``anomalib_post_processor_config``.

Calibrated score: ``enable_normalization=True`` maps scores and maps to [0, 1] with anomalib's own
formula, ``clip((x - threshold) / (max - min) + 0.5, 0, 1)``, the statistics being the source's
(its threshold at 0.5); labels and masks are the same as without it. Off by default: the paper
metrics rank raw scores (the benchmark's ``use_raw_scores`` turns it off).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from anomalib.post_processing import PostProcessor

from .thresholds import ThresholdSource, ThresholdStatistics, source_from_config

logger = logging.getLogger(__name__)

_STAT_BUFFERS = {"image_threshold": "_image_threshold", "pixel_threshold": "_pixel_threshold",
                 "image_min": "image_min", "image_max": "image_max", "pixel_min": "pixel_min", "pixel_max": "pixel_max"}


class RawScorePostProcessor(PostProcessor):
    """anomalib's post-processor whose labels and masks compare raw scores with raw thresholds
    when normalisation is off (with normalisation on, anomalib's formula on the source's statistics).

    Args:
        threshold_source: where the thresholds come from (:mod:`anomalib_zsad.models.components.thresholds`):
            ``ValidationThresholds`` (None, the default: anomalib's, from the labelled validation set),
            ``AuxiliaryThresholds`` (held-out auxiliary data), ``NormalImageThresholds`` (k normal
            target images), ``FixedThresholds`` (given values); or a name: ``validation``,
            ``auxiliary``, ``normal_images`` (default settings). Given with a checkpoint that was
            made with another source, the one given wins and the checkpoint's thresholds are dropped.
        enable_normalization: calibrated scores in [0, 1] around the threshold (anomalib's
            normalisation with the source's statistics); off: raw scores, as the papers report.
        enable_thresholding, enable_threshold_matching, image_sensitivity, pixel_sensitivity: anomalib's.
    """

    def __init__(
        self,
        threshold_source: ThresholdSource | str | None = None,
        enable_normalization: bool = False,
        enable_thresholding: bool = True,
        enable_threshold_matching: bool = True,
        image_sensitivity: float = 0.5,
        pixel_sensitivity: float = 0.5,
        **kwargs,
    ) -> None:
        super().__init__(enable_normalization=enable_normalization, enable_thresholding=enable_thresholding,
                         enable_threshold_matching=enable_threshold_matching, image_sensitivity=image_sensitivity,
                         pixel_sensitivity=pixel_sensitivity, **kwargs)
        self._source_given = threshold_source is not None
        self.threshold_statistics: dict[str, Any] = {}
        self._keep_own_thresholds = False
        self.threshold_source = source_from_config(threshold_source)

    # ------------------------------------------------------------------ the source
    @property
    def threshold_source(self) -> ThresholdSource:
        return self._threshold_source

    @threshold_source.setter
    def threshold_source(self, value: ThresholdSource | str | dict | None) -> None:
        """A new source; its thresholds are computed when it next can (fixed ones at once)."""
        self._threshold_source = source_from_config(value)
        for name in _STAT_BUFFERS.values():
            getattr(self, name).fill_(math.nan)
        self.threshold_statistics = {}
        if self._threshold_source.name == "fixed":
            self.apply_statistics(self._threshold_source.compute(None, None))

    @property
    def thresholds_known(self) -> bool:
        return not bool(torch.isnan(self._image_threshold))

    @property
    def thresholds_need_validation(self) -> bool:
        """Whether a validation run is what gives this source its thresholds (anomalib's
        ``Engine`` validates zero-shot models before test/predict only then)."""
        if self.thresholds_known or not self.enable_thresholding:
            return False
        return not self._threshold_source.computes_at_inference

    def apply_statistics(self, stats: ThresholdStatistics) -> None:
        """Store a source's statistics in the buffers (NaN values leave a buffer NaN)."""
        for key, name in _STAT_BUFFERS.items():
            getattr(self, name).fill_(float(getattr(stats, key)))
        self.threshold_statistics = dict(stats.info)
        logger.info("Thresholds from %r: image %.6g, pixel %.6g", self._threshold_source,
                    stats.image_threshold, stats.pixel_threshold)

    def calibrate(self, module: Any, datamodule: Any = None) -> ThresholdStatistics | None:  # noqa: ANN401
        """Compute the source's thresholds for ``module`` now (outside a trainer too) and store them.
        The validation source is computed by anomalib's validation hooks instead (returns None)."""
        if self._threshold_source.from_validation:
            return None
        stats = self._threshold_source.compute(module, datamodule)
        if stats is not None:
            self.apply_statistics(stats)
        return stats

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:  # noqa: ANN401
        del pl_module
        self._threshold_source.prepare(trainer, stage)

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *args, **kwargs) -> None:  # noqa: ANN401
        if self._threshold_source.from_validation:
            super().on_validation_batch_end(trainer, pl_module, outputs, *args, **kwargs)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        if self._threshold_source.from_validation:
            super().on_validation_epoch_end(trainer, pl_module)
        elif not getattr(trainer, "sanity_checking", False) and self.enable_thresholding:
            self.calibrate(pl_module, getattr(trainer, "datamodule", None))

    def _calibrate_if_unknown(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        source = self._threshold_source
        if self.thresholds_known or not self.enable_thresholding or source.from_validation:
            return
        if source.computes_at_inference:
            self.calibrate(pl_module, getattr(trainer, "datamodule", None))
        else:
            logger.warning("Threshold source %r has no thresholds yet and computes them in validation only "
                           "(anomalib train/validate on the auxiliary data): labels and masks are not thresholded",
                           source)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        self._calibrate_if_unknown(trainer, pl_module)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        self._calibrate_if_unknown(trainer, pl_module)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_config(self) -> dict[str, Any]:
        config = super().checkpoint_config()
        config["threshold_source"] = self._threshold_source.config()
        config["threshold_statistics"] = _plain(self.threshold_statistics)
        return config

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        """The checkpoint's source and statistics, unless another source was given: then that one
        stays and the checkpoint's thresholds are not loaded (computed again from the given source)."""
        super().load_checkpoint_config(config)
        stored = source_from_config(config.get("threshold_source"))
        if self._source_given and stored != self._threshold_source:
            logger.info("Threshold source %r given, the checkpoint's (%r) and its thresholds are not used",
                        self._threshold_source, stored)
            self._keep_own_thresholds = True
            return
        own = {name: getattr(self, name).clone() for name in _STAT_BUFFERS.values()}
        self.threshold_source = stored
        for name, value in own.items():  # the state dict, loaded next, brings the checkpoint's values
            getattr(self, name).copy_(value)
        self.threshold_statistics = dict(config.get("threshold_statistics") or {})

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args, **kwargs) -> None:
        if self._keep_own_thresholds:
            for name in _STAT_BUFFERS.values():
                if prefix + name in state_dict:
                    state_dict[prefix + name] = getattr(self, name).clone()
            self._keep_own_thresholds = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ thresholds used on the outputs
    def _threshold_in_use(self, raw: torch.Tensor, normalized: torch.Tensor, low: torch.Tensor,
                          high: torch.Tensor) -> torch.Tensor:
        if not self.enable_normalization:
            return raw
        # anomalib's _normalize leaves values raw where the range is unknown (e.g. fixed thresholds)
        has_range = ~torch.isnan(low) & ~torch.isnan(high)
        return torch.where(has_range, normalized.to(raw), raw)

    @property
    def normalized_image_threshold(self) -> torch.Tensor:
        return self._threshold_in_use(self.image_threshold, super().normalized_image_threshold,
                                      self.image_min, self.image_max)

    @property
    def normalized_pixel_threshold(self) -> torch.Tensor:
        return self._threshold_in_use(self.pixel_threshold, super().normalized_pixel_threshold,
                                      self.pixel_min, self.pixel_max)


def _plain(value: Any) -> Any:  # noqa: ANN401
    """Plain data only (checkpoints are read with ``weights_only=True``)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
