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

from anomalib_zsad.clip import load_clip
from anomalib_zsad.models.components import ZeroShotModuleMixin, clip_pre_processor

from .checkpoint import load_official_checkpoint
from anomalib_zsad.models.components.class_names import class_names_for
from .loss import AACLIPLoss
from .prompts import OFFICIAL_REAL_NAMES
from .torch_model import AACLIPModel

logger = logging.getLogger(__name__)


class AACLIP(ZeroShotModuleMixin, AnomalibModule):
    """AA-CLIP: anomaly-aware CLIP with two-stage residual adapters (CVPR 2025).

    Args:
        backbone: open_clip architecture (paper: ``ViT-L-14-336``; ``zsad-tiny`` for tests).
        pretrained: open_clip tag (``openai``), a CLIP checkpoint path, or None for random weights.
        activation: MLP activation; the official code runs OpenAI's weights with exact ``gelu``.
        image_size: input size of the default pre-processor (paper 518).
        official_checkpoint: official ``text_adapter.pth`` / ``image_adapter_<epoch>.pth`` files,
            or their folder, to start from (then zero-shot at once).
        class_name: object name in the prompts: ``"auto"`` reads each image's category from its
            path (``"object"`` when none is found), any other string is used for every image.
        real_names: descriptions to put in the prompts instead of the names: a mapping, a data
            set name of the official ``REAL_NAMES`` we ship (``"VisA"``, ``"BTAD"``, ``"Brain"``),
            or None (the names; paper protocol).
        text_epochs, image_epochs: length of the two stages (official 5, 20).
        text_lr, image_lr, betas: the two Adams (official 1e-5, 5e-4, (0.5, 0.999)).
        lr_milestones, lr_gamma: MultiStepLR of the image stage, in steps (official [16000, 32000], 0.5).
        orthogonal_weight: stage-1 anchor orthogonality weight (official ``text_norm_weight`` 0.1).
        stage1_levels: ``"all"`` (paper) or ``"last"`` (official code: only the last level learns).
        surgery_vv_across_batch: the official batch-axis V-V of stage 1 (see README).
        text_adapt_weight, image_adapt_weight, text_adapt_until, image_adapt_until, levels,
        relu, surgery_from, blur_kernel_size, blur_sigma, image_score: see :class:`AACLIPModel`.
    """

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
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        pre_processor = clip_pre_processor(image_size) if pre_processor is True else pre_processor
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        if isinstance(real_names, str):
            real_names = OFFICIAL_REAL_NAMES[real_names]
        clip = load_clip(backbone, pretrained, activation=activation, pos_embed_mode="bicubic_antialias", seed=seed)
        self.class_name = class_name
        self.model = AACLIPModel(
            clip, text_adapt_weight=text_adapt_weight, image_adapt_weight=image_adapt_weight,
            text_adapt_until=text_adapt_until, image_adapt_until=image_adapt_until, levels=levels, relu=relu,
            surgery_from=surgery_from, surgery_vv_across_batch=surgery_vv_across_batch,
            blur_kernel_size=blur_kernel_size, blur_sigma=blur_sigma, image_score=image_score,
            class_name="object" if class_name == "auto" else class_name, real_names=real_names, seed=seed)
        self.loss = AACLIPLoss(orthogonal_weight, stage1_levels)
        self.text_epochs, self.image_epochs = text_epochs, image_epochs
        self.text_lr, self.image_lr, self.betas = text_lr, image_lr, tuple(betas)
        self.lr_milestones, self.lr_gamma = list(lr_milestones), lr_gamma
        self.automatic_optimization = False  # two optimisers, one per stage
        self._init_zero_shot_state(trained=False)
        if official_checkpoint is not None:
            paths = [official_checkpoint] if isinstance(official_checkpoint, (str, os.PathLike)) else official_checkpoint
            self.load_official_checkpoint(*paths)

    def load_official_checkpoint(self, *paths: str | os.PathLike) -> None:
        """Load official adapter files (or their folder); the model is then ready zero-shot."""
        load_official_checkpoint(self.model, *paths)
        self.learnt_parts_trained.fill_(True)

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[dict]]:
        text = torch.optim.Adam(self.model.text_adapter.parameters(), lr=self.text_lr, betas=self.betas)
        image = torch.optim.Adam(self.model.image_adapter.parameters(), lr=self.image_lr, betas=self.betas)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(image, self.lr_milestones, self.lr_gamma)
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
            terms = self.loss.stage1(out["level_logits"], out["text"], masks)
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

    def to_onnx(self, *args, **kwargs) -> Any:  # noqa: ANN401
        """Export with the anchors of ``model.class_name`` stored as a constant (no text tower,
        no tokenizer in the graph). Set the class first, e.g. ``model.model.set_class_name("pcb1")``;
        ``to_openvino`` goes through here."""
        self.model.freeze_text_features()
        return super().to_onnx(*args, **kwargs)

    def to_torch(self, *args, **kwargs) -> Any:  # noqa: ANN401
        """As :meth:`to_onnx`: the saved model carries its anchors."""
        self.model.freeze_text_features()
        return super().to_torch(*args, **kwargs)

    def on_train_epoch_end(self) -> None:
        """Stop after the two stages (the trainer's ``max_epochs`` can only make it shorter)."""
        if self.current_epoch + 1 >= self.text_epochs + self.image_epochs:
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        if self.current_epoch < self.text_epochs and self.image_epochs > 0:
            logger.warning("AA-CLIP training stopped in the text stage (epoch %d of %d text epochs): the image "
                           "adapter is untrained.", self.current_epoch, self.text_epochs)
        super().on_train_end()
