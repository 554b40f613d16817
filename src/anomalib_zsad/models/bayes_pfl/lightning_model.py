"""Bayes-PFL as an anomalib model: ``anomalib train --model BayesPFL``.

The prompt bank, flows, RCA and mappings learn on auxiliary data (another data set's test split
with masks, see ``anomalib_zsad.data.CrossDataset``); the CLIP stays frozen and is not stored in
checkpoints. Training has the official two stages on a fixed schedule (the official code
switches, and stops, by early stopping on validation data from the *target* domain; not done
here): stage 1 (the full prompt flow loss) for ``stage1_epochs`` epochs, then stage 2 (the image
classifier ``fuse``/``class_mapping``/``image_mapping`` with the classification loss only).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from anomalib_zsad.clip import load_clip
from anomalib_zsad.models.components import ZeroShotModuleMixin, clip_pre_processor

from .checkpoint import load_official_checkpoint
from .optim import cosine_with_warmup, make_adam, stage1_param_groups, stage2_param_groups
from anomalib_zsad.models.components.class_names import class_name_from_path

from .torch_model import BayesPFLModel

logger = logging.getLogger(__name__)


class BayesPFL(ZeroShotModuleMixin, AnomalibModule):
    """Bayes-PFL: Bayesian prompt flow learning for zero-shot anomaly detection (CVPR 2025).

    Args:
        backbone: open_clip architecture (paper: ``ViT-L-14-336``; ``zsad-tiny`` for tests).
        pretrained: open_clip tag (``openai``), a CLIP checkpoint path, or None for random weights.
        activation: the CLIP's MLP activation; the official code uses exact ``gelu`` even with
            OpenAI's weights (trained with QuickGELU). ``auto`` follows the weights.
        image_size: input size of the default pre-processor (official 518).
        checkpoint: an official ``{"MyModel": ...}`` file to start from (then zero-shot at once).
        class_name: the object word of the prompts (``"X <class_name>"``). None: each image's
            category from its path (``<root>/<category>/test/...``), else ``"object"``.
        prompt_num, context_length, state_length, num_flows: prompt bank and flows (3, 5, 5, 10).
        num_samples: Monte-Carlo samples at inference (official 10); sample_chunk_size bounds memory.
        feature_layers: vision blocks; None = the tower's quarters (6, 12, 18, 24 of ViT-L).
        sigma, score_alpha, topk: map smoothing (8), image-score fusion (0.5) and its top-k (2000).
        stage1_epochs: epochs of stage 1 before the classifier-only stage 2 (see module docstring).
        lr_prompt, lr_temperature, lr_flow, lr_linear, betas, warmup_fraction: official optimiser.
        seed: CLIP random init (tests), parameter init and Monte-Carlo noise.
    """

    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        activation: str = "gelu",
        image_size: int | Sequence[int] = 518,
        checkpoint: str | os.PathLike | None = None,
        class_name: str | None = None,
        prompt_num: int = 3,
        context_length: int = 5,
        state_length: int = 5,
        num_flows: int = 10,
        num_samples: int = 10,
        sample_chunk_size: int = 5,
        feature_layers: Sequence[int] | None = None,
        sigma: float = 8.0,
        score_alpha: float = 0.5,
        topk: int = 2000,
        stage1_epochs: int = 20,
        lr_prompt: float = 1e-3,
        lr_temperature: float = 0.01,
        lr_flow: float = 1e-3,
        lr_linear: float = 1e-4,
        betas: Sequence[float] = (0.5, 0.999),
        warmup_fraction: float = 0.1,
        seed: int = 0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        pre_processor = clip_pre_processor(image_size) if pre_processor is True else pre_processor
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        clip = load_clip(backbone, pretrained, activation=activation, pos_embed_mode="bicubic_antialias", seed=seed)
        self.model = BayesPFLModel(clip, class_name=class_name or "object", prompt_num=prompt_num,
                                   context_length=context_length, state_length=state_length, num_flows=num_flows,
                                   num_samples=num_samples, sample_chunk_size=sample_chunk_size,
                                   feature_layers=feature_layers, sigma=sigma, score_alpha=score_alpha, topk=topk,
                                   seed=seed, init_seed=seed)
        self.class_name = class_name
        self.stage1_epochs = stage1_epochs
        self.lrs = {"lr_prompt": lr_prompt, "lr_temperature": lr_temperature, "lr_flow": lr_flow,
                    "lr_linear": lr_linear}
        self.betas = tuple(betas)
        self.warmup_fraction = warmup_fraction
        # Two optimisers (one per stage) and a per-batch schedule of stage 1 only.
        self.automatic_optimization = False
        self._init_zero_shot_state(trained=False)
        self._stage2_steps = 0
        if checkpoint is not None:
            self.load_official_checkpoint(checkpoint)

    def load_official_checkpoint(self, path: str | os.PathLike) -> None:
        """Load an official checkpoint (stage-2 inference, as ``test.py``); ready zero-shot."""
        load_official_checkpoint(self.model, path)
        self.learnt_parts_trained.fill_(True)

    # ------------------------------------------------------------------ data
    def class_names(self, batch: Any) -> list[str] | None:  # noqa: ANN401
        """Per-image class words: the fixed ``class_name``, or each image's category."""
        if self.class_name is not None:
            return None  # the model's default tokens
        paths = getattr(batch, "image_path", None)
        if not paths:
            return None
        names = [class_name_from_path(str(p), self.model.class_name) for p in paths]
        return names if any(n != self.model.class_name for n in names) else None

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> tuple[list, list]:
        stage1 = make_adam(stage1_param_groups(self.model, **self.lrs), self.betas)
        stage2 = make_adam(stage2_param_groups(self.model, self.lrs["lr_linear"]), self.betas)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        scheduler = cosine_with_warmup(stage1, total, self.warmup_fraction)
        return [stage1, stage2], [{"scheduler": scheduler, "interval": "step"}]

    def current_stage(self) -> int:
        return 1 if self.current_epoch < self.stage1_epochs else 2

    def training_step(self, batch: Any, *args, **kwargs) -> torch.Tensor:  # noqa: ANN401
        del args, kwargs
        stage = self.current_stage()
        out = self.model.training_outputs(batch.image, batch.gt_label, self.masks_for_training(batch),
                                          self.class_names(batch), stage=stage)
        optimizers = self.optimizers()
        optimizer = optimizers[stage - 1] if isinstance(optimizers, list) else optimizers
        self.model.zero_grad(set_to_none=True)  # also the stage-1 parameters in stage 2 (not stepped)
        self.manual_backward(out["loss"])
        optimizer.step()
        if stage == 1:
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        else:
            self._stage2_steps += 1
            self.model.inference_stage = 2  # checkpoints written from now on run the trained classifier
        size = batch.image.shape[0]
        self.log("train_loss", out["loss"].detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
        self.log("train_loss_class", out["loss_class"].detach(), on_step=False, on_epoch=True, batch_size=size)
        return out["loss"].detach()

    def on_train_start(self) -> None:
        self._stage2_steps = 0
        # Until stage 2 has trained fuse/image_mapping, score images with the stage-1 classifier
        # (also in checkpoints written during stage 1).
        self.model.inference_stage = 1
        # Distinct training draws per process (DDP), repeatable per seed.
        self.model.train_generator.manual_seed(self.model.seed + 1 + 1000 * self.global_rank)

    def on_train_end(self) -> None:
        """The official test runs the stage-2 classifier; if stage 2 never ran (fewer epochs than
        ``stage1_epochs``), its untrained mapping would spoil the image scores: use stage 1."""
        if not self._stage2_steps:
            logger.warning("Bayes-PFL: training ended before stage 2 (stage1_epochs=%d): image scores use the "
                           "stage-1 classifier (the global CLIP embedding).", self.stage1_epochs)
            self.model.inference_stage = 1

    # ------------------------------------------------------------------ evaluation
    def inference_class_names(self, batch: Any) -> list[str] | None:  # noqa: ANN401
        return self.class_names(batch)
