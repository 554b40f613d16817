"""CoOp as an anomalib model: ``anomalib train --model CoOp --data anomalib_zsad.data.CrossDataset ...``.

Only the context vectors learn (on auxiliary data, as AnomalyCLIP); the CLIP stays frozen and is
not stored in checkpoints. Learning type as every plugin model that trains (``components/lightning.py``):
``ONE_CLASS`` while untrained, so ``anomalib train`` trains it; ``ZERO_SHOT`` once trained until
validation has set the thresholds.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from anomalib_zsad.clip import ClipModel
from anomalib_zsad.models.anomalyclip.loss import AnomalyCLIPLoss
from anomalib_zsad.models.clip_baseline.lightning_model import prompt_class_names
from anomalib_zsad.models.components import ZeroShotModuleMixin
from anomalib_zsad.models.components.class_names import evaluated_category
from anomalib_zsad.models.components.contract import ArgumentCheck

from .torch_model import CoOpModel

logger = logging.getLogger(__name__)


def warmup_cosine(epoch: int, max_epochs: int, warmup_epochs: int, warmup_factor: float) -> float:
    """CoOp's schedule as a factor of the base learning rate: ``warmup_factor`` for the first
    ``warmup_epochs``, then cosine annealing over ``max_epochs`` (Dassl's constant warm-up before
    ``CosineAnnealingLR(T_max=max_epochs)``, stepped per epoch)."""
    if epoch < warmup_epochs:
        return warmup_factor
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / max(1, max_epochs)))


class CoOp(ZeroShotModuleMixin, AnomalibModule):
    """CoOp: learnt context vectors in object-aware prompts, AnomalyCLIP's baseline (ICLR 2024, Appendix A.2).

    Args:
        backbone: open_clip architecture of the frozen CLIP (AnomalyCLIP paper: ``ViT-L-14-336``;
            ``zsad-tiny`` is a small random one for tests).
        pretrained: CLIP weights: an open_clip tag (``openai``), a local checkpoint file, or None
            for random weights (tests only).
        activation: MLP activation of the CLIP: ``auto`` follows the weights (QuickGELU for
            OpenAI's), ``gelu`` or ``quick_gelu``.
        image_size: input side (or [height, width]) of the default pre-processor (paper 518); a
            multiple of the patch size.
        official_checkpoint: a ``{"prompt_learner": state_dict}`` file with ``ctx_pos``/``ctx_neg``
            [1, 1, n_ctx, width] (AnomalyCLIP's format, which this learner shares); there are no
            released CoOp weights for anomaly detection.
        class_name: the object word [cls] of the prompts: ``"auto"`` reads each image's category
            from its path (MVTec AD / VisA layout, ``_`` read as a space), in training and at test,
            else (at test) the evaluated datamodule's category, else ``"object"``; any other string
            is used for every image (and in an export).
        n_ctx: learnt context tokens M (CoOp's paper 16).
        shared_context: one context [V1..VM] for both prompts, as the paper writes them; False = one
            context per state (normal, anomalous).
        feature_layers: vision blocks (1-based) whose patch tokens make the map; None = the quarter
            blocks (6, 12, 18, 24 of 24), as AnomalyCLIP.
        dpam_start: first vision block with AnomalyCLIP's V-V attention (DPAM); None = plain CLIP
            attention (the paper's baseline).
        temperature: softmax temperature of scores and maps (AnomalyCLIP's 0.07).
        sigma: standard deviation of the Gaussian smoothing of the map, in pixels (4; 0 = off).
        lam: weight of AnomalyCLIP's segmentation losses (focal + Dice per layer); 0 = CoOp's image
            cross-entropy alone, the paper's baseline.
        lr: SGD learning rate (CoOp's 0.002).
        momentum: SGD momentum (CoOp's 0.9).
        weight_decay: SGD weight decay (CoOp's 5e-4).
        warmup_epochs: epochs at the constant ``warmup_lr`` before the cosine schedule (CoOp's 1).
        warmup_lr: learning rate of the warm-up epochs (CoOp's 1e-5).
        seed: initial values of the contexts (and of a random CLIP).
        allow_clip_mismatch: run a checkpoint on another CLIP or image size than it was trained
            with (refused otherwise).
        pre_processor: anomalib pre-processor; True = CLIP's resize and normalisation at ``image_size``.
        post_processor: anomalib post-processor; True = thresholds from validation, maps unnormalised.
        evaluator: anomalib evaluator; True = the papers' six metrics.
        visualizer: anomalib visualizer; True = the default one.
    """

    pos_embed_mode = "bilinear"  # run in AnomalyCLIP's code base, which resizes bilinearly
    paper_max_epochs = 15  # AnomalyCLIP's protocol ("the epoch is 15 for all experiments")

    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        activation: str = "auto",
        image_size: int | Sequence[int] = 518,
        official_checkpoint: str | os.PathLike | None = None,
        class_name: str = "auto",
        n_ctx: int = 16,
        shared_context: bool = True,
        feature_layers: Sequence[int] | None = None,
        dpam_start: int | None = None,
        temperature: float = 0.07,
        sigma: float = 4.0,
        lam: float = 0.0,
        lr: float = 0.002,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        seed: int = 0,
        allow_clip_mismatch: bool = False,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        self.init_contract(pre_processor, official_checkpoint)
        self.loss = AnomalyCLIPLoss(lam)

    @property
    def class_name(self) -> str:
        return self.settings["class_name"]

    def check_arguments(self, check: ArgumentCheck, settings: dict[str, Any], arch: Any) -> None:  # noqa: ANN401
        depth = arch.vision_layers if arch is not None else None
        check.require(isinstance(settings["class_name"], str) and settings["class_name"],
                      f"class_name must be 'auto' or an object word, got {settings['class_name']!r}")
        check.positive("n_ctx", settings["n_ctx"])
        check.layers("feature_layers", settings["feature_layers"], depth)
        if settings["dpam_start"] is not None:
            check.layers("dpam_start", [settings["dpam_start"]], depth)
        check.positive("temperature", settings["temperature"])
        check.positive("sigma", settings["sigma"], zero=True)
        check.positive("lam", settings["lam"], zero=True)
        check.positive("lr", settings["lr"])
        check.positive("momentum", settings["momentum"], zero=True)
        check.positive("weight_decay", settings["weight_decay"], zero=True)
        check.positive("warmup_epochs", settings["warmup_epochs"], zero=True)
        check.positive("warmup_lr", settings["warmup_lr"])

    def build_model(self, clip: ClipModel) -> CoOpModel:
        s = self.settings
        return CoOpModel(clip, n_ctx=s["n_ctx"], shared_context=s["shared_context"],
                         class_name=self._fixed_class_name(), feature_layers=s["feature_layers"],
                         dpam_start=s["dpam_start"], temperature=s["temperature"], sigma=s["sigma"], seed=s["seed"])

    def _fixed_class_name(self) -> str:
        return "object" if self.class_name == "auto" else self.class_name

    @staticmethod
    def read_official_weights(path: Any) -> Any:  # noqa: ANN401
        from anomalib_zsad.models.anomalyclip.checkpoint import read_prompt_learner_file

        return read_prompt_learner_file(path, "CoOp", ("ctx_pos", "ctx_neg"), "a prompt-learner file")

    @staticmethod
    def load_official_weights(model: nn.Module, path: Any) -> None:  # noqa: ANN401
        from anomalib_zsad.models.anomalyclip.checkpoint import load_prompt_learner_tensors

        tensors = CoOp.read_official_weights(path)
        load_prompt_learner_tensors(model.prompt_learner, tensors, path, "CoOp", ("ctx_pos", "ctx_neg"),
                                    "n_ctx, CLIP text width")

    def _freeze_for_export(self) -> None:
        if self.class_name == "auto":
            logger.warning("CoOp exports with the object word 'object' in its prompts (class_name='auto' reads it "
                           "from image paths, which an exported model does not see). Give --model.class_name "
                           "<object> to export for one product.")
        super()._freeze_for_export()

    def configure_optimizers(self) -> dict[str, Any]:
        s = self.settings
        optimizer = torch.optim.SGD(self.model.learnable_parameters(), lr=s["lr"], momentum=s["momentum"],
                                    weight_decay=s["weight_decay"])
        trainer = getattr(self, "_trainer", None)
        given = trainer.max_epochs if trainer is not None else None  # -1 or None: limited by steps or time
        max_epochs = given if given is not None and given > 0 else self.paper_max_epochs
        warmup_factor = s["warmup_lr"] / s["lr"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: warmup_cosine(epoch, max_epochs, s["warmup_epochs"], warmup_factor))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def _class_names(self, batch: Any, default: str | None = None) -> list[str] | None:  # noqa: ANN401
        return prompt_class_names(getattr(batch, "image_path", None), self.class_name,
                                  default or self._fixed_class_name())

    def training_step(self, batch: Any, *args, **kwargs) -> torch.Tensor:  # noqa: ANN401
        del args, kwargs
        masks = self.masks_for_training(batch) if self.settings["lam"] > 0 else None
        logits, layer_probs = self.model.training_outputs(batch.image, self._class_names(batch),
                                                          with_maps=masks is not None)
        terms = self.loss(logits, batch.gt_label, layer_probs, masks)
        self.log("train_loss", terms["loss"], on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=batch.image.shape[0])
        return terms["loss"]

    def inference_class_names(self, batch: Any) -> list[str] | None:  # noqa: ANN401
        return self._class_names(batch, evaluated_category(self))
