"""AdaCLIP as an anomalib model: ``anomalib train --model AdaCLIP``.

Prompts, prompt generators and projections learn on auxiliary data (another data set's test
split with masks, see ``anomalib_zsad.data.CrossDataset``); the CLIP stays frozen and is not
stored in checkpoints. Learning type: ``ONE_CLASS`` while untrained (so ``Engine.fit`` trains),
``ZERO_SHOT`` after training or after importing an official checkpoint (see the README).
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

from .checkpoint import load_official_checkpoint
from anomalib_zsad.models.components.class_names import class_names_for
from .loss import AdaCLIPLoss
from .torch_model import AdaCLIPModel


class AdaCLIP(ZeroShotModuleMixin, AnomalibModule):
    """AdaCLIP: hybrid (static + dynamic) learnable prompts for zero-shot anomaly detection (ECCV 2024).

    Args:
        backbone: open_clip architecture (paper: ``ViT-L-14-336``; ``zsad-tiny`` for tests).
        pretrained: open_clip tag (``openai``), a CLIP checkpoint path, or None for random weights.
        image_size: input size of the default pre-processor (paper 518).
        weights: an official AdaCLIP file (``pretrained_all.pth`` ...) to start from (then zero-shot at once).
        class_name: the object word of the prompts: ``"auto"`` (default) reads each image's
            category from its path (MVTec/VisA layouts; ``"object"`` when none is found), any
            other string is used for every image.
        prompt_depth, prompt_length, prompting_type, prompting_branch: official 4, 5, ``SD``, ``VL``
            (depth None = ``min(4, blocks)`` so small CLIPs work).
        feature_layers: vision blocks for the maps; None = ``depth // 4 * (1..4)`` (6, 12, 18, 24).
        use_hsf, k_clusters, hsf_alpha, kmeans_backend, kmeans_seed: hybrid semantic fusion (official
            on, 20, 0.2; k-means: deterministic torch by default, ``sklearn`` as officially).
        sigma: Gaussian smoothing of the map (4).
        row_dice: the official per-row Dice of a batch of one (see the README).
        lr, betas, weight_decay: AdamW (official 0.01, (0.5, 0.999), 0.01).
        round_prompts_to_fp16: the official ``.half()`` of the prompt tokens.
        seed: initial values of the learnt parts (and of a random CLIP).
    """

    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        image_size: int | Sequence[int] = 518,
        weights: str | os.PathLike | None = None,
        class_name: str = "auto",
        prompt_depth: int | None = None,
        prompt_length: int = 5,
        prompting_type: str = "SD",
        prompting_branch: str = "VL",
        feature_layers: Sequence[int] | None = None,
        use_hsf: bool = True,
        k_clusters: int = 20,
        hsf_alpha: float = 0.2,
        kmeans_backend: str = "torch",
        kmeans_seed: int | None = 0,
        sigma: float = 4.0,
        row_dice: bool = True,
        lr: float = 0.01,
        betas: Sequence[float] = (0.5, 0.999),
        weight_decay: float = 0.01,
        round_prompts_to_fp16: bool = True,
        seed: int = 0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        pre_processor = clip_pre_processor(image_size) if pre_processor is True else pre_processor
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        # The official code runs CLIP with exact GELU and bicubic pos-embed resizing (no antialias).
        clip = load_clip(backbone, pretrained, activation="gelu", pos_embed_mode="bicubic", seed=seed)
        self.class_name = class_name
        fixed_name = "object" if class_name == "auto" else class_name
        self.model = AdaCLIPModel(clip, prompt_depth=prompt_depth, prompt_length=prompt_length,
                                  prompting_type=prompting_type, prompting_branch=prompting_branch,
                                  feature_layers=feature_layers, use_hsf=use_hsf, k_clusters=k_clusters,
                                  hsf_alpha=hsf_alpha, kmeans_backend=kmeans_backend, kmeans_seed=kmeans_seed,
                                  sigma=sigma, class_name=fixed_name, round_prompts_to_fp16=round_prompts_to_fp16,
                                  seed=seed)
        self.loss = AdaCLIPLoss(row_dice=row_dice)
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self._init_zero_shot_state(trained=False)
        if weights is not None:
            self.load_official_checkpoint(weights)

    def load_official_checkpoint(self, path: str | os.PathLike) -> None:
        """Load official AdaCLIP weights; the model is then ready zero-shot."""
        load_official_checkpoint(self.model, path)
        self.learnt_parts_trained.fill_(True)

    def learnable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.model.named_parameters() if not name.startswith("clip.")]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.learnable_parameters(), lr=self.lr, betas=self.betas,
                                 weight_decay=self.weight_decay)

    def _class_names(self, batch: Any) -> list[str] | None:  # noqa: ANN401
        return class_names_for(getattr(batch, "image_path", None), self.class_name, self.model.class_name)

    def training_step(self, batch: Any, *args, **kwargs) -> torch.Tensor:  # noqa: ANN401
        del args, kwargs
        probs, maps, _ = self.model.training_outputs(batch.image, self._class_names(batch))
        terms = self.loss(probs, batch.gt_label, maps, self.masks_for_training(batch))
        self.log("train_loss", terms["loss"], on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=batch.image.shape[0])
        return terms["loss"]

    def inference_class_names(self, batch: Any) -> list[str] | None:  # noqa: ANN401
        return self._class_names(batch)
