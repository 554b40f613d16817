"""Labels and masks from the thresholds learnt on validation, on un-normalised scores.

The papers report raw scores, so the plugin's models keep anomalib's normalisation off. anomalib
2.7's ``PostProcessor`` then still compares the raw scores with its *normalised* threshold (0.5,
from the sensitivity), so ``pred_label`` and ``pred_mask`` ignored what validation learnt (an
AnomalyCLIP map of 0.2-4 was "anomalous" everywhere), in ``Engine.test``/``predict`` and in the
exported graphs alike. Here the raw thresholds are used where normalisation is off.
"""

from __future__ import annotations

import torch
from anomalib.post_processing import PostProcessor


class RawScorePostProcessor(PostProcessor):
    """anomalib's post-processor whose labels and masks compare raw scores with raw thresholds
    when normalisation is off (with normalisation on it is anomalib's, unchanged)."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("enable_normalization", False)
        super().__init__(**kwargs)

    @property
    def normalized_image_threshold(self) -> torch.Tensor:
        return super().normalized_image_threshold if self.enable_normalization else self.image_threshold

    @property
    def normalized_pixel_threshold(self) -> torch.Tensor:
        return super().normalized_pixel_threshold if self.enable_normalization else self.pixel_threshold
