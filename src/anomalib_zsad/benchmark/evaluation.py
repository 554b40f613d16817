"""What a benchmark job measures, and the small engine changes that make it measure it right.

* :func:`paper_evaluator` - the six metrics the zero-shot papers (WinCLIP, AnomalyCLIP, ...) report,
  in place of each model's default evaluator (which has thresholded F1 and no AP/AUPRO).
* :func:`use_raw_scores` - turns off the post-processor's min-max normalisation. anomalib's default
  ``PostProcessor`` maps scores to ``(x - threshold) / (max - min) + 0.5`` and *clips to [0, 1]*,
  with statistics taken on the validation split. Clipping ties every score beyond the validation
  range, which changes AUROC/AP/F1-max/AUPRO; the papers rank raw scores per category.
* :class:`InferenceTimer` - per-image latency of pre-processing + forward, excluding data loading,
  post-processing and metric updates (callbacks fire in trainer order, so this one brackets the
  pre-processor's ``on_test_batch_start`` and the model's ``test_step``, and stops before the
  post-processor and evaluator run). The first test batch is a warm-up and is not timed when
  there are more batches (on CPU it measured 10x the steady state: lazy kernels, allocator).
* :class:`BenchmarkEngine` - ``Engine.test`` runs a whole validation pass before testing every
  zero-/few-shot model, only to collect normalisation statistics and thresholds. With raw scores
  and threshold-free metrics that pass is wasted work (on MVTec AD the validation split *is* the
  test split, so it doubles the cost), hence it is switched off here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from anomalib.engine import Engine
from anomalib.models import AnomalibModule
from lightning.pytorch import Callback, LightningModule, Trainer

from anomalib_zsad.models.components.lightning import paper_evaluator

logger = logging.getLogger(__name__)

def use_raw_scores(model: AnomalibModule) -> None:
    """Evaluate un-normalised scores and skip visualisation (slow, and not a benchmark output)."""
    post = model.post_processor
    if post is not None and hasattr(post, "enable_normalization"):
        post.enable_normalization = False
    elif post is not None:
        logger.warning("%s: post-processor %s has no 'enable_normalization'; scores may be normalised",
                       model.name, type(post).__name__)
    model.evaluator = paper_evaluator()
    model.visualizer = None


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class InferenceTimer(Callback):
    """Seconds spent in pre-processing + forward per test image, and model set-up time.

    ``images`` counts the timed images (all but the first batch when there are several).

    ``setup_seconds`` covers the model's ``setup`` hook in the test stage (text and reference
    embeddings of zero-/few-shot models): Lightning calls callbacks' ``setup`` before the
    module's, and ``on_test_start`` after it.
    """

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self.batches_seen = 0
        self.setup_seconds = 0.0
        self._start: float | None = None
        self._setup_start: float | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Start the set-up clock."""
        if stage == "test":
            self._setup_start = time.perf_counter()

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stop the set-up clock."""
        if self._setup_start is not None:
            self.setup_seconds += time.perf_counter() - self._setup_start
            self._setup_start = None

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, *args: Any) -> None:  # noqa: ANN401
        """Start the batch clock (before the pre-processor's transform)."""
        _sync()
        self._start = time.perf_counter()

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,  # noqa: ANN401
                          *args: Any) -> None:  # noqa: ANN401
        """Stop the batch clock (before post-processing and metrics)."""
        _sync()
        if self._start is None:
            return
        elapsed, self._start = time.perf_counter() - self._start, None
        self.batches_seen += 1
        if self.batches_seen == 1 and sum(trainer.num_test_batches) > 1:
            return  # warm-up batch
        self.seconds += elapsed
        self.images += int(batch.image.shape[0])

    @property
    def ms_per_image(self) -> float:
        """Mean latency per image in milliseconds (NaN when nothing was timed)."""
        return 1000.0 * self.seconds / self.images if self.images else float("nan")


class BenchmarkEngine(Engine):
    """:class:`~anomalib.engine.Engine` without the calibration pass before testing (see module doc)."""

    @staticmethod
    def _should_run_validation(model: AnomalibModule, ckpt_path: str | Path | None) -> bool:  # noqa: ARG004
        return False

    def fit_ignoring_learning_type(self, model: AnomalibModule, datamodule: Any) -> None:  # noqa: ANN401
        """Train with Lightning even if ``model.learning_type`` is zero-/few-shot.

        ``Engine.fit`` replaces training by a validation pass for zero-/few-shot models, which
        is right for WinCLIP but wrong for models that are zero-shot *on the target* yet learn
        from auxiliary data (AnomalyCLIP trains its prompts on VisA before testing on MVTec AD).
        """
        self._setup_workspace(model=model, datamodule=datamodule, versioned_dir=True)
        self._setup_trainer(model)
        self.trainer.fit(model, datamodule=datamodule)
