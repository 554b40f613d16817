"""AA-CLIP as an anomalib model: ``anomalib train --model AACLIP``.

Two training stages, by epoch: the first ``text_epochs`` train the text adapter (anchors learnt
against a frozen V-V "surgery" tower), the next ``image_epochs`` the image adapter (against the
fixed anchors). Manual optimisation with one Adam per stage, as the official ``train.py``. The
CLIP stays frozen and is not stored in checkpoints.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from anomalib_zsad.clip import ClipModel
from anomalib_zsad.models.components import ZeroShotModuleMixin
from anomalib_zsad.models.components.class_names import class_names_for
from anomalib_zsad.models.components.contract import ArgumentCheck
from anomalib_zsad.models.components.distributed import global_batch_mean

from .checkpoint import load_official_checkpoint, read_official_checkpoint
from .loss import AACLIPLoss
from .prompts import OFFICIAL_REAL_NAMES
from .torch_model import IMAGE_SCORES, AACLIPModel

logger = logging.getLogger(__name__)


class AACLIP(ZeroShotModuleMixin, AnomalibModule):
    """AA-CLIP: anomaly-aware CLIP with two-stage residual adapters (CVPR 2025).

    Args:
        backbone: open_clip architecture of the frozen CLIP (paper: ``ViT-L-14-336``; ``zsad-tiny``
            is a small random one for tests).
        pretrained: CLIP weights: an open_clip tag (``openai``), a local checkpoint file, or None
            for random weights (tests only).
        activation: MLP activation of the CLIP: the official code runs OpenAI's weights with exact
            ``gelu``; ``auto`` follows the weights.
        image_size: input side (or [height, width]) of the default pre-processor (paper 518); a
            multiple of the patch size.
        official_checkpoint: official ``text_adapter.pth`` / ``image_adapter_<epoch>.pth`` files, or
            their folder, to start from; the model is then ready zero-shot without training.
        class_name: the object word of the prompts: ``"auto"`` reads each image's category from its
            path (``"object"`` when none is found), any other string is used for every image.
        real_names: descriptions to put in the prompts instead of the names: a mapping, a data set
            name of the official ``REAL_NAMES`` we ship (``"VisA"``, ``"BTAD"``, ``"Brain"``), or
            None (the names; paper protocol).
        text_epochs: epochs of stage 1, the text adapter (official 5).
        image_epochs: epochs of stage 2, the image adapter (official 20).
        text_lr: Adam learning rate of stage 1 (official 1e-5).
        image_lr: Adam learning rate of stage 2 (official 5e-4).
        betas: Adam betas of both stages (official (0.5, 0.999)).
        lr_milestones: MultiStepLR milestones of stage 2, in steps (official [16000, 32000]).
        lr_gamma: MultiStepLR factor (official 0.5).
        orthogonal_weight: weight of the stage-1 anchor orthogonality loss (official 0.1).
        stage1_levels: ``"all"`` (paper) or ``"last"`` (official code: only the last level learns).
        surgery_vv_across_batch: the official batch-axis V-V of stage 1 (see README).
        text_adapt_weight: residual weight of the text adapters (0.1).
        image_adapt_weight: residual weight of the image adapters (0.1).
        text_adapt_until: text blocks followed by an adapter; None = 3 of 12, scaled to depth.
        image_adapt_until: vision blocks followed by an adapter; None = 6 of 24, scaled to depth.
        levels: 1-based vision blocks whose patch tokens make maps; None = the four quarters.
        relu: a LeakyReLU after the image projections (official ``--relu``, off).
        surgery_from: first vision block with V-V attention in stage 1; None = depth // 4.
        blur_kernel_size: patch-grid smoothing kernel (official industrial 7, medical 9; 1 = off).
        blur_sigma: patch-grid smoothing sigma (official industrial 1, medical 1.5).
        image_score: ``"text"`` (against the anchors, default) or ``"map_max"`` (official medical).
        seed: initialisation of the adapters (and of a random CLIP).
        allow_clip_mismatch: run a checkpoint on another CLIP or image size than it was trained
            with (refused otherwise).
        pre_processor: anomalib pre-processor; True = CLIP's resize and normalisation at ``image_size``.
        post_processor: anomalib post-processor; True = thresholds from validation, maps unnormalised.
        evaluator: anomalib evaluator; True = the papers' six metrics.
        visualizer: anomalib visualizer; True = the default one.
    """

    pos_embed_mode = "bicubic_antialias"

    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        activation: str = "gelu",
        image_size: int | Sequence[int] = 518,
        official_checkpoint: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        class_name: str = "auto",
        real_names: str | Mapping[str, str] | None = None,
        text_epochs: int = 5,
        image_epochs: int = 20,
        text_lr: float = 1e-5,
        image_lr: float = 5e-4,
        betas: Sequence[float] = (0.5, 0.999),
        lr_milestones: Sequence[int] = (16000, 32000),
        lr_gamma: float = 0.5,
        orthogonal_weight: float = 0.1,
        stage1_levels: str = "all",
        surgery_vv_across_batch: bool = False,
        text_adapt_weight: float = 0.1,
        image_adapt_weight: float = 0.1,
        text_adapt_until: int | None = None,
        image_adapt_until: int | None = None,
        levels: Sequence[int] | None = None,
        relu: bool = False,
        surgery_from: int | None = None,
        blur_kernel_size: int = 7,
        blur_sigma: float = 1.0,
        image_score: str = "text",
        seed: int = 0,
        allow_clip_mismatch: bool = False,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        self.automatic_optimization = False  # two optimisers, one per stage
        self.init_contract(pre_processor, official_checkpoint)
        self.loss = AACLIPLoss(orthogonal_weight, stage1_levels)

    @property
    def class_name(self) -> str:
        return self.settings["class_name"]

    @property
    def text_epochs(self) -> int:
        return self.settings["text_epochs"]

    @property
    def image_epochs(self) -> int:
        return self.settings["image_epochs"]

    def default_max_epochs(self) -> int:
        return self.text_epochs + self.image_epochs

    def check_arguments(self, check: ArgumentCheck, settings: dict[str, Any], arch: Any) -> None:  # noqa: ANN401
        depth = arch.vision_layers if arch is not None else None
        check.positive("text_epochs", settings["text_epochs"], zero=True)
        check.positive("image_epochs", settings["image_epochs"], zero=True)
        check.positive("text_lr", settings["text_lr"])
        check.positive("image_lr", settings["image_lr"])
        check.positive("lr_gamma", settings["lr_gamma"])
        check.positive("orthogonal_weight", settings["orthogonal_weight"], zero=True)
        check.choice("stage1_levels", settings["stage1_levels"], ("all", "last"))
        check.layers("levels", settings["levels"], depth)
        check.positive("text_adapt_until", settings["text_adapt_until"], optional=True)
        check.positive("image_adapt_until", settings["image_adapt_until"], optional=True)
        if settings["surgery_from"] is not None:
            check.layers("surgery_from", [settings["surgery_from"]], depth)
        check.require(isinstance(settings["blur_kernel_size"], int) and settings["blur_kernel_size"] % 2 == 1,
                      f"blur_kernel_size must be odd and positive, got {settings['blur_kernel_size']!r}")
        check.positive("blur_sigma", settings["blur_sigma"])
        check.choice("image_score", settings["image_score"], IMAGE_SCORES)
        names = settings["real_names"]
        check.require(not isinstance(names, str) or names in OFFICIAL_REAL_NAMES,
                      f"real_names must be a mapping or one of {sorted(OFFICIAL_REAL_NAMES)}, got {names!r}")

    def build_model(self, clip: ClipModel) -> AACLIPModel:
        s = self.settings
        real_names = OFFICIAL_REAL_NAMES[s["real_names"]] if isinstance(s["real_names"], str) else s["real_names"]
        return AACLIPModel(
            clip, text_adapt_weight=s["text_adapt_weight"], image_adapt_weight=s["image_adapt_weight"],
            text_adapt_until=s["text_adapt_until"], image_adapt_until=s["image_adapt_until"], levels=s["levels"],
            relu=s["relu"], surgery_from=s["surgery_from"], surgery_vv_across_batch=s["surgery_vv_across_batch"],
            blur_kernel_size=s["blur_kernel_size"], blur_sigma=s["blur_sigma"], image_score=s["image_score"],
            class_name="object" if s["class_name"] == "auto" else s["class_name"], real_names=real_names,
            seed=s["seed"])

    read_official_weights = staticmethod(read_official_checkpoint)

    @staticmethod
    def load_official_weights(model: AACLIPModel, paths: Any) -> None:  # noqa: ANN401
        load_official_checkpoint(model, *([paths] if isinstance(paths, (str, os.PathLike)) else paths))

    def load_official_checkpoint(self, *paths: str | os.PathLike) -> None:
        """Load official adapter files (or their folder); the model is then ready zero-shot."""
        load_official_checkpoint(self.model, *paths)
        self.learnt_parts_trained.fill_(True)

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[dict]]:
        s = self.settings
        text = torch.optim.Adam(self.model.text_adapter.parameters(), lr=s["text_lr"], betas=tuple(s["betas"]))
        image = torch.optim.Adam(self.model.image_adapter.parameters(), lr=s["image_lr"], betas=tuple(s["betas"]))
        scheduler = torch.optim.lr_scheduler.MultiStepLR(image, list(s["lr_milestones"]), s["lr_gamma"])
        return [text, image], [{"scheduler": scheduler, "interval": "step"}]

    @property
    def stage(self) -> str:
        """``"text"`` for the first ``text_epochs`` epochs, then ``"image"``."""
        return "text" if self.current_epoch < self.text_epochs else "image"

    def _class_names(self, batch: Any) -> list[str]:  # noqa: ANN401
        names = class_names_for(getattr(batch, "image_path", None), self.class_name, self.model.class_name)
        return names if names is not None else [self.model.class_name] * batch.image.shape[0]

    def training_step(self, batch: Any, *args, **kwargs) -> torch.Tensor:  # noqa: ANN401
        del args, kwargs
        text_opt, image_opt = self.optimizers()
        names, masks = self._class_names(batch), self.masks_for_training(batch)
        if self.stage == "text":
            out = self.model.stage1_outputs(batch.image, names)
            # the orthogonality term squares a batch mean: over every process's images under DDP
            terms = self.loss.stage1(out["level_logits"], out["text"], masks, batch_mean=global_batch_mean)
            optimiser = text_opt
        else:
            out = self.model.stage2_outputs(batch.image, names)
            terms = self.loss.stage2(out["level_logits"], out["cls_logits"], batch.gt_label, masks)
            optimiser = image_opt
        optimiser.zero_grad()
        self.manual_backward(terms["loss"])
        optimiser.step()
        if self.stage == "image":
            self.lr_schedulers().step()
        self.log(f"train_{self.stage}_loss", terms["loss"].detach(), on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=batch.image.shape[0])
        return terms["loss"].detach()

    def inference_class_names(self, batch: Any) -> list[str] | None:  # noqa: ANN401
        return class_names_for(getattr(batch, "image_path", None), self.class_name, self.model.class_name)

    def on_train_epoch_end(self) -> None:
        """Stop after the two stages (the trainer's ``max_epochs`` can only make it shorter)."""
        if self.current_epoch + 1 >= self.text_epochs + self.image_epochs:
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        if self.current_epoch < self.text_epochs and self.image_epochs > 0:
            logger.warning("AA-CLIP training stopped in the text stage (epoch %d of %d text epochs): the image "
                           "adapter is untrained.", self.current_epoch, self.text_epochs)
        super().on_train_end()
