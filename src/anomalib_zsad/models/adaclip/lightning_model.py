"""AdaCLIP as an anomalib model: ``anomalib train --model AdaCLIP``.

Prompts, prompt generators and projections learn on auxiliary data (another data set's test
split with masks, see ``anomalib_zsad.data.CrossDataset``); the CLIP stays frozen and is not
stored in checkpoints. Learning type: ``ONE_CLASS`` while untrained (so ``Engine.fit`` trains),
``ZERO_SHOT`` after training or after importing an official checkpoint (see the README).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from anomalib_zsad.clip import ClipModel
from anomalib_zsad.models.components import ZeroShotModuleMixin
from anomalib_zsad.models.components.class_names import class_names_for
from anomalib_zsad.models.components.contract import ArgumentCheck, renamed_argument

from .checkpoint import load_official_checkpoint, read_official_checkpoint
from .loss import AdaCLIPLoss
from .torch_model import AdaCLIPModel

logger = logging.getLogger(__name__)


class AdaCLIP(ZeroShotModuleMixin, AnomalibModule):
    """AdaCLIP: hybrid (static + dynamic) learnable prompts for zero-shot anomaly detection (ECCV 2024).

    Args:
        backbone: open_clip architecture of the frozen CLIP (paper: ``ViT-L-14-336``; ``zsad-tiny``
            is a small random one for tests).
        pretrained: CLIP weights: an open_clip tag (``openai``), a local checkpoint file, or None
            for random weights (tests only).
        activation: MLP activation of the CLIP: the official code runs OpenAI's weights with exact
            ``gelu`` (its model config lacks ``quick_gelu``); ``auto`` follows the weights.
        image_size: input side (or [height, width]) of the default pre-processor (paper 518); a
            multiple of the patch size.
        official_checkpoint: an official AdaCLIP file (``pretrained_all.pth`` ...) to start from;
            the model is then ready zero-shot without training.
        class_name: the object word of the prompts: ``"auto"`` reads each image's category from its
            path (MVTec/VisA layouts; ``"object"`` when none is found), any other string is used for
            every image. An export with ``"auto"`` uses ``"object"``.
        prompt_depth: blocks with learnt prompts (official 4; None = ``min(4, blocks)``).
        prompt_length: learnt prompt tokens per block (official 5).
        prompting_type: ``S`` static, ``D`` dynamic or ``SD`` both (official ``SD``).
        prompting_branch: ``V`` vision, ``L`` text or ``VL`` both (official ``VL``).
        feature_layers: vision blocks (1-based) for the maps; None = ``depth // 4 * (1..4)`` (6, 12,
            18, 24 of 24).
        use_hsf: hybrid semantic fusion of the image score (official on).
        k_clusters: k-means clusters of the fusion (official 20).
        hsf_alpha: weight of the fused map score in the image score (official 0.2).
        kmeans_backend: ``torch`` (seeded, deterministic; default) or ``sklearn`` (as officially).
        kmeans_seed: seed of the k-means initialisation (None: unseeded).
        kmeans_export_iterations: Lloyd iterations unrolled in an exported graph (30; the export equals
            the eager model whenever k-means converges within them, fewer make a smaller graph).
        sigma: standard deviation of the Gaussian smoothing of the map, in pixels (official 4; 0 = off).
        row_dice: the official per-row Dice of a batch of one (see the README).
        lr: AdamW learning rate (official 0.01).
        betas: AdamW betas (official (0.5, 0.999)).
        weight_decay: AdamW weight decay (official 0.01).
        round_prompts_to_fp16: round the prompt tokens to float16 as the official ``.half()`` does.
        seed: initial values of the learnt parts (and of a random CLIP).
        allow_clip_mismatch: run a checkpoint on another CLIP or image size than it was trained
            with (refused otherwise).
        weights: deprecated name of ``official_checkpoint``.
        pre_processor: anomalib pre-processor; True = CLIP's resize and normalisation at ``image_size``.
        post_processor: anomalib post-processor; True = thresholds from validation, maps unnormalised.
        evaluator: anomalib evaluator; True = the papers' six metrics.
        visualizer: anomalib visualizer; True = the default one.
    """

    pos_embed_mode = "bicubic"  # the official resize: plain bicubic, no antialias
    text_depends_on_image = True  # dynamic text prompts from each image's feature
    paper_max_epochs = 5
    # the text prompter's static_prompts.0 is created (official weights hold it) but block 0 is not
    # prompted: DDP must not wait for its gradient
    ddp_find_unused_parameters: ClassVar[bool] = True

    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        activation: str = "gelu",
        image_size: int | Sequence[int] = 518,
        official_checkpoint: str | os.PathLike | None = None,
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
        kmeans_export_iterations: int = 30,
        sigma: float = 4.0,
        row_dice: bool = True,
        lr: float = 0.01,
        betas: Sequence[float] = (0.5, 0.999),
        weight_decay: float = 0.01,
        round_prompts_to_fp16: bool = True,
        seed: int = 0,
        allow_clip_mismatch: bool = False,
        weights: str | os.PathLike | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        official_checkpoint = renamed_argument("AdaCLIP", "official_checkpoint", official_checkpoint, weights=weights)
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        self.init_contract(pre_processor, official_checkpoint, renamed=("weights",))
        self.loss = AdaCLIPLoss(row_dice=row_dice)

    @property
    def class_name(self) -> str:
        return self.settings["class_name"]

    def check_arguments(self, check: ArgumentCheck, settings: dict[str, Any], arch: Any) -> None:  # noqa: ANN401
        depth = arch.vision_layers if arch is not None else None
        check.positive("prompt_depth", settings["prompt_depth"], optional=True)
        if arch is not None and settings["prompt_depth"] is not None:
            check.require(settings["prompt_depth"] <= min(arch.vision_layers, arch.text_layers),
                          f"prompt_depth must be at most the CLIP depth, got {settings['prompt_depth']}")
        check.positive("prompt_length", settings["prompt_length"])
        check.choice("prompting_type", settings["prompting_type"], ("S", "D", "SD"))
        check.choice("prompting_branch", settings["prompting_branch"], ("V", "L", "VL"))
        check.layers("feature_layers", settings["feature_layers"], depth)
        check.positive("k_clusters", settings["k_clusters"])
        check.positive("kmeans_export_iterations", settings["kmeans_export_iterations"])
        check.in_range("hsf_alpha", settings["hsf_alpha"], 0.0, 1.0)
        check.choice("kmeans_backend", settings["kmeans_backend"], ("torch", "sklearn"))
        check.positive("sigma", settings["sigma"], zero=True)
        check.positive("lr", settings["lr"])
        check.positive("weight_decay", settings["weight_decay"], zero=True)
        check.require(isinstance(settings["class_name"], str) and settings["class_name"],
                      f"class_name must be 'auto' or an object word, got {settings['class_name']!r}")

    def build_model(self, clip: ClipModel) -> AdaCLIPModel:
        s = self.settings
        fixed_name = "object" if s["class_name"] == "auto" else s["class_name"]
        return AdaCLIPModel(clip, prompt_depth=s["prompt_depth"], prompt_length=s["prompt_length"],
                            prompting_type=s["prompting_type"], prompting_branch=s["prompting_branch"],
                            feature_layers=s["feature_layers"], use_hsf=s["use_hsf"], k_clusters=s["k_clusters"],
                            hsf_alpha=s["hsf_alpha"], kmeans_backend=s["kmeans_backend"],
                            kmeans_seed=s["kmeans_seed"], kmeans_export_iterations=s["kmeans_export_iterations"],
                            sigma=s["sigma"], class_name=fixed_name,
                            round_prompts_to_fp16=s["round_prompts_to_fp16"], seed=s["seed"])

    read_official_weights = staticmethod(read_official_checkpoint)
    load_official_weights = staticmethod(load_official_checkpoint)

    def load_official_checkpoint(self, path: str | os.PathLike) -> None:
        """Load official AdaCLIP weights; the model is then ready zero-shot."""
        load_official_checkpoint(self.model, path)
        self.learnt_parts_trained.fill_(True)

    def learnable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.model.named_parameters() if not name.startswith("clip.")]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        s = self.settings
        return torch.optim.AdamW(self.learnable_parameters(), lr=s["lr"], betas=tuple(s["betas"]),
                                 weight_decay=s["weight_decay"])

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
