"""AnomalyCLIP as an anomalib model: ``anomalib train --model AnomalyCLIP``.

Only the prompts learn (on auxiliary data: another data set's test split with masks, see
``anomalib_zsad.data.CrossDataset``); the CLIP stays frozen and is not stored in checkpoints.
"""

from __future__ import annotations

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

from .checkpoint import load_official_prompt_learner
from .loss import AnomalyCLIPLoss
from .torch_model import AnomalyCLIPModel


class AnomalyCLIP(ZeroShotModuleMixin, AnomalibModule):
    """AnomalyCLIP: object-agnostic prompt learning for zero-shot anomaly detection (ICLR 2024).

    Args:
        backbone: open_clip architecture (paper: ``ViT-L-14-336``; ``zsad-tiny`` for tests).
        pretrained: open_clip tag (``openai``), a CLIP checkpoint path, or None for random weights.
        image_size: input size of the default pre-processor (paper 518).
        prompt_checkpoint: an official ``epoch_15.pth`` to start from (then zero-shot at once).
        n_ctx, prompt_depth, deep_prompt_length: prompt shape (official 12, 9, 4).
        feature_layers: vision blocks for the maps; None = 6, 12, 18, 24 of 24 (the paper). The
            official scripts pass ``24`` only.
        dpam_start: first V-V block; None = depth // 4 (official DPAM_layer=20 on ViT-L).
        sigma: Gaussian smoothing of the map (4).
        lam: weight of the segmentation losses (4).
        lr, betas: Adam settings (official 1e-3, (0.5, 0.999)).
        round_deep_prompts_to_fp16, global_ln_post: official quirks, see the model README.
    """

    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        image_size: int | Sequence[int] = 518,
        prompt_checkpoint: str | os.PathLike | None = None,
        n_ctx: int = 12,
        prompt_depth: int = 9,
        deep_prompt_length: int = 4,
        feature_layers: Sequence[int] | None = None,
        dpam_start: int | None = None,
        sigma: float = 4.0,
        lam: float = 4.0,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.5, 0.999),
        round_deep_prompts_to_fp16: bool = True,
        global_ln_post: bool = False,
        seed: int = 0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        pre_processor = clip_pre_processor(image_size) if pre_processor is True else pre_processor
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        clip = load_clip(backbone, pretrained, pos_embed_mode="bilinear", seed=seed)
        self.model = AnomalyCLIPModel(clip, n_ctx=n_ctx, prompt_depth=prompt_depth,
                                      deep_prompt_length=deep_prompt_length, feature_layers=feature_layers,
                                      dpam_start=dpam_start, sigma=sigma,
                                      round_deep_prompts_to_fp16=round_deep_prompts_to_fp16,
                                      global_ln_post=global_ln_post, seed=seed)
        self.loss = AnomalyCLIPLoss(lam)
        self.lr = lr
        self.betas = tuple(betas)
        self._init_zero_shot_state(trained=False)
        if prompt_checkpoint is not None:
            self.load_official_checkpoint(prompt_checkpoint)

    def load_official_checkpoint(self, path: str | os.PathLike) -> None:
        """Load official prompt weights (``epoch_15.pth``); the model is then ready zero-shot."""
        load_official_prompt_learner(self.model.prompt_learner, path)
        self.learnt_parts_trained.fill_(True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.prompt_learner.parameters(), lr=self.lr, betas=self.betas)

    def training_step(self, batch: Any, *args, **kwargs) -> torch.Tensor:  # noqa: ANN401
        del args, kwargs
        logits, layer_probs = self.model.training_outputs(batch.image)
        terms = self.loss(logits, batch.gt_label, layer_probs, self.masks_for_training(batch))
        self.log("train_loss", terms["loss"], on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=batch.image.shape[0])
        return terms["loss"]
