"""anomalib's threshold-free metrics, reporting nothing where they are undefined instead of a number.

An AUROC, AP, F1-max or AUPRO needs both classes among its targets. The medical sets of the
zero-shot papers often have one: ISIC, the polyp sets and TN3K hold anomalous images only (image
metrics are undefined: the papers report pixel metrics), HeadCT, BrainMRI, Br35H and COVID-19 have
no masks (pixel metrics are undefined: image metrics only). anomalib's metrics then return a
meaningless number (torchmetrics' AUROC is 0 with a warning) or fail. These subclasses count the
targets' classes as they update and ``compute`` returns ``None`` when one class is missing, with
one warning that names the metric and the reason: the evaluator then logs no value (Lightning
skips a ``None`` metric), ``Engine.test`` returns no entry and the benchmark table shows ``n/a``.
Metrics whose batch field is missing altogether (``gt_mask is None``: data without masks) are
skipped as before (``strict=False``).

The class names are anomalib's, so the logged names (``image_AUROC``, ...) do not change.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from anomalib import metrics

logger = logging.getLogger(__name__)

__all__ = ["AUPR", "AUPRO", "AUROC", "F1Max"]


class _BothClassesGuard:
    """Mixin before an :class:`anomalib.metrics.AnomalibMetric`: ``None`` unless both classes were seen."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(*args, **kwargs)
        self.add_state("target_counts", default=torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, batch: Any, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        """Count the negatives and positives of the target field, then update as anomalib does."""
        target = getattr(batch, self.fields[-1], None)
        if target is not None:
            target = torch.as_tensor(target)
            positives = int((target > 0).sum())
            counts = torch.tensor([target.numel() - positives, positives], device=self.target_counts.device)
            self.target_counts = self.target_counts + counts
        super().update(batch, *args, **kwargs)

    def compute(self) -> torch.Tensor | None:
        """The metric, or ``None`` (with a warning) when the targets held one class only."""
        counts = self.target_counts
        if int(counts.sum()) > 0 and int(counts.min()) == 0:
            if not getattr(self, "_warned_one_class", False):  # Lightning computes a logged metric twice
                kind = "images" if self.name.startswith("image_") else "pixels"
                missing = "normal" if int(counts[0]) == 0 else "anomalous"
                logger.warning("%s not computed: the test set has no %s %s (%d of one class only); it is "
                               "undefined there and reported as n/a.", self.name, missing, kind, int(counts.sum()))
                self._warned_one_class = True
            return None
        return super().compute()

    def reset(self) -> None:
        """Reset as anomalib does (F1Max resets only its curve) and the class counts."""
        super().reset()
        self.target_counts = torch.zeros_like(self.target_counts)
        self._warned_one_class = False


class AUROC(_BothClassesGuard, metrics.AUROC):
    """:class:`anomalib.metrics.AUROC`, ``None`` when its targets hold one class only."""


class AUPR(_BothClassesGuard, metrics.AUPR):
    """:class:`anomalib.metrics.AUPR`, ``None`` when its targets hold one class only."""


class F1Max(_BothClassesGuard, metrics.F1Max):
    """:class:`anomalib.metrics.F1Max`, ``None`` when its targets hold one class only."""


class AUPRO(_BothClassesGuard, metrics.AUPRO):
    """:class:`anomalib.metrics.AUPRO`, ``None`` when its masks hold one class only."""
