"""Pictures of anomaly maps that are not in [0, 1].

The plugin's post-processor leaves normalisation off (the papers report raw scores and maps), so
the maps that reach anomalib's ``ImageVisualizer`` keep each model's own scale: AnomalyCLIP and
VAND sum per-layer probabilities (0 to the number of layers), AA-CLIP's maps go below 0,
Bayes-PFL's stay within a few hundredths of 0.5. anomalib draws a map as ``uint8(255 * map)``
(``to_pil_image``), so values above 1 wrap around (rainbow rings) and a narrow range is one flat
colour.

:class:`ZeroShotVisualizer` is anomalib's ``ImageVisualizer`` that first brings the shown maps to
[0, 1] with anomalib's own normalisation (``PostProcessor._normalize``, what anomalib's models show):
``clip((map - threshold) / (max - min) + 0.5, 0, 1)``, i.e. the model's pixel threshold in the
middle of the colour scale (green in JET), and the range of its maps over the validation set
spread over one unit. Only the drawing sees these values: the batch that the evaluator, the
callbacks after it and ``Engine.predict`` get is left as the model gave it, so metrics, scores and
maps do not change.

The statistics, per model:

* **range**: min and max of the anomaly maps of the last validation epoch (the data anomalib also
  takes the thresholds from). It is kept in the visualizer's callback state, so a Lightning
  checkpoint written after validation restores it with ``ckpt_path``. Without one (a model loaded
  by ``load_from_checkpoint``, an old checkpoint, ``visualize()`` before any validation) the range
  of the maps drawn so far in this test/predict run is used, the current batch included;
* **threshold**: the post-processor's pixel threshold learnt on validation masks; without one (no
  masks), the middle of the range (anomalib's fallback). anomalib's fallback to the *image*
  threshold is not used here: scores and maps of these models are on different scales.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from anomalib.post_processing import PostProcessor
from anomalib.visualization import ImageVisualizer

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer
    from PIL import Image

logger = logging.getLogger(__name__)


def display_map(anomaly_map: torch.Tensor, map_min: float, map_max: float, threshold: float = math.nan) -> torch.Tensor:
    """``anomaly_map`` in [0, 1] for drawing: anomalib's normalisation with the given statistics
    (``threshold`` at 0.5, ``map_max - map_min`` over one unit, clipped; NaN threshold: the middle)."""
    like = torch.as_tensor(anomaly_map, dtype=torch.float32)
    stats = [torch.tensor(float(v)) for v in (map_min, map_max, threshold)]
    return PostProcessor._normalize(like, *stats)  # noqa: SLF001  (anomalib's own formula, kept identical)


def map_range(anomaly_map: Any) -> tuple[float, float]:  # noqa: ANN401
    """(min, max) of the finite values of a map or batch of maps; (nan, nan) when there are none."""
    values = torch.as_tensor(np.asarray(anomaly_map) if not isinstance(anomaly_map, torch.Tensor) else anomaly_map)
    values = values.detach().float()
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return math.nan, math.nan
    return float(values.min()), float(values.max())


def _merge(old: tuple[float, float], new: tuple[float, float]) -> tuple[float, float]:
    low = new[0] if math.isnan(old[0]) else min(old[0], new[0]) if not math.isnan(new[0]) else old[0]
    high = new[1] if math.isnan(old[1]) else max(old[1], new[1]) if not math.isnan(new[1]) else old[1]
    return low, high


def _all_processes_range(trainer: Trainer, local: tuple[float, float]) -> tuple[float, float]:
    """The range over every process's maps (NaN where no process saw any)."""
    low = math.inf if math.isnan(local[0]) else local[0]
    high = -math.inf if math.isnan(local[1]) else local[1]
    device = getattr(trainer.strategy, "root_device", torch.device("cpu"))
    low = float(trainer.strategy.reduce(torch.tensor(low, dtype=torch.float64, device=device), reduce_op="min"))
    high = float(trainer.strategy.reduce(torch.tensor(high, dtype=torch.float64, device=device), reduce_op="max"))
    return (low, high) if math.isfinite(low) and math.isfinite(high) else (math.nan, math.nan)


def pixel_threshold_of(pl_module: Any) -> float:  # noqa: ANN401
    """The pixel threshold learnt on validation masks, or NaN (none learnt, or no post-processor)."""
    post = getattr(pl_module, "post_processor", None)
    value = getattr(post, "_pixel_threshold", None)  # the learnt one, without the image-threshold fallback
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


class ZeroShotVisualizer(ImageVisualizer):
    """anomalib's :class:`~anomalib.visualization.ImageVisualizer` (same arguments, same pictures and
    files), with the drawn maps brought to [0, 1] first (see the module doc). ``map_min``,
    ``map_max`` and ``threshold`` may be given to fix the scale; otherwise they come from
    validation and the model's post-processor."""

    def __init__(self, *args, map_min: float = math.nan, map_max: float = math.nan,
                 threshold: float = math.nan, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.map_min, self.map_max, self.threshold = float(map_min), float(map_max), float(threshold)
        self._given = {name for name, value in (("range", map_min), ("threshold", threshold)) if not math.isnan(value)}
        self._validation_range = (math.nan, math.nan)
        self._drawn_range = (math.nan, math.nan)
        self._warned = False

    # statistics -----------------------------------------------------------------------------
    @property
    def has_range(self) -> bool:
        return not (math.isnan(self.map_min) or math.isnan(self.map_max))

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._validation_range = (math.nan, math.nan)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,  # noqa: ANN401
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:  # noqa: ANN401
        del trainer, pl_module, batch, batch_idx, dataloader_idx
        if getattr(outputs, "anomaly_map", None) is not None:
            self._validation_range = _merge(self._validation_range, map_range(outputs.anomaly_map))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if getattr(trainer, "world_size", 1) > 1:  # DDP: each process saw its share of the validation set
            self._validation_range = _all_processes_range(trainer, self._validation_range)
        if not math.isnan(self._validation_range[0]) and "range" not in self._given:
            self.map_min, self.map_max = self._validation_range
        if "threshold" not in self._given:
            self.threshold = pixel_threshold_of(pl_module)  # the post-processor has just set it

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._drawn_range = (math.nan, math.nan)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._drawn_range = (math.nan, math.nan)

    def state_dict(self) -> dict[str, float]:
        """Kept by Lightning in checkpoints (``callbacks``), restored with ``ckpt_path``."""
        return {"map_min": self.map_min, "map_max": self.map_max, "threshold": self.threshold}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("map_min", "map_max", "threshold"):
            if key in state_dict:
                setattr(self, key, float(state_dict[key]))

    # drawing ----------------------------------------------------------------------------------
    def for_display(self, predictions: Any, threshold: float | None = None) -> Any:  # noqa: ANN401
        """A copy of ``predictions`` (item or batch, torch or numpy) whose ``anomaly_map`` is in
        [0, 1]; ``predictions`` itself is not changed."""
        anomaly_map = getattr(predictions, "anomaly_map", None)
        if anomaly_map is None:
            return predictions
        self._drawn_range = _merge(self._drawn_range, map_range(anomaly_map))
        if self.has_range:
            low, high = self.map_min, self.map_max
        else:
            low, high = self._drawn_range
            if not self._warned:
                logger.info("No validation range of the anomaly maps: pictures use the range of the maps drawn so far "
                            "(%.4g to %.4g and growing). Validate first, or give --ckpt_path, for one fixed scale.",
                            low, high)
                self._warned = True
        threshold = self.threshold if threshold is None else threshold
        shown = display_map(torch.as_tensor(np.asarray(anomaly_map)) if not isinstance(anomaly_map, torch.Tensor)
                            else anomaly_map.detach().cpu(), low, high, threshold)
        if not isinstance(anomaly_map, torch.Tensor):
            shown = shown.numpy().astype(np.asarray(anomaly_map).dtype, copy=False)
        return predictions.update(in_place=False, anomaly_map=shown)

    def visualize(self, predictions: Any) -> Image.Image | list[Image.Image | None] | None:  # noqa: ANN401
        return super().visualize(self.for_display(predictions))

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,  # noqa: ANN401
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        """anomalib's drawing and saving (``on_predict_batch_end`` comes here too), on a display copy."""
        learnt = math.nan if "threshold" in self._given else pixel_threshold_of(pl_module)
        shown = self.for_display(batch, threshold=learnt if not math.isnan(learnt) else None)
        super().on_test_batch_end(trainer, pl_module, outputs, shown, batch_idx, dataloader_idx)
