"""VAND / APRIL-GAN as an anomalib model: ``anomalib train --model Vand``.

Only the linear layers learn (on auxiliary data with masks, e.g. another data set's test split
through ``anomalib_zsad.data.CrossDataset``); the CLIP stays frozen and is not stored in
checkpoints. ``k_shot > 0`` adds the few-shot memory of ``k_shot`` normal images of the target.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data.predict import PredictDataset
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from anomalib_zsad.clip import ClipModel
from anomalib_zsad.models.components import ZeroShotModuleMixin
from anomalib_zsad.models.components.class_names import evaluated_category
from anomalib_zsad.models.components.contract import ArgumentCheck, renamed_argument
from anomalib_zsad.models.components.references import target_train_split

from .checkpoint import load_official_checkpoint, read_official_checkpoint
from .loss import VandLoss, build_optimizer
from .torch_model import VandModel

logger = logging.getLogger(__name__)


def class_name_from_path(path: str | os.PathLike, default: str) -> str:
    """The category folder of an MVTec/VisA-layout image (``<category>/<train|test>/<kind>/<file>``).

    The official code puts each image's own class into the prompts; anomalib batches carry no
    class, but their paths do in these layouts. Any other layout gives ``default``.
    """
    parents = Path(path).parents
    if len(parents) > 3 and parents[1].name in {"train", "test"}:
        return parents[2].name.replace("_", " ")
    return default


class Vand(ZeroShotModuleMixin, AnomalibModule):
    """VAND / APRIL-GAN: zero-/few-shot anomaly segmentation (CVPR 2023 VAND challenge winner).

    Args:
        backbone: open_clip architecture of the frozen CLIP (official ``ViT-L-14-336``; ``zsad-tiny``
            is a small random one for tests).
        pretrained: CLIP weights: an open_clip tag (``openai``), a local checkpoint file, or None
            for random weights (tests only).
        activation: MLP activation of the CLIP: the official code runs OpenAI's weights with exact
            ``gelu`` (its model config lacks ``quick_gelu``); ``auto`` follows the weights.
        image_size: input side (or [height, width]) of the default pre-processor (official 518); a
            multiple of the patch size.
        official_checkpoint: an official ``{"trainable_linearlayer": ...}`` file
            (``visa_pretrained.pth`` to test on MVTec AD, ``mvtec_pretrained.pth`` for VisA); the
            model is then ready at once.
        class_name: the object word of the prompts: ``"auto"`` takes the datamodule's category, or
            each image's category folder (MVTec/VisA layout) on pooled sets and in training, else
            ``"object"``; any other string is used for every image.
        class_names_from_paths: with ``"auto"``, read per-image names from the image paths in
            training and on pooled evaluation sets, as the official code does.
        feature_layers: vision blocks (1-based) with a learnt linear map; None = 6, 12, 18, 24 of 24.
        few_shot_layers: blocks of the few-shot memory; None = ``feature_layers``.
        k_shot: normal reference images of the target for the few-shot memory (official 4; 0 =
            zero-shot). Taken from ``few_shot_source`` or else the target's train split.
        few_shot_source: folder of normal reference images.
        few_shot_seed: seed of the draw of the reference images from the train split.
        logit_scale: scale of the patch-text similarities (the official fixed 100).
        lr: Adam learning rate (official 1e-3).
        betas: Adam betas (official (0.5, 0.999)).
        official_single_image_dice: the official per-row dice of one-image batches (see loss.py).
        seed: initial values of the linear layers (PyTorch's initialisation, seeded) and of a
            random CLIP.
        allow_clip_mismatch: run a checkpoint on another CLIP or image size than it was trained
            with (refused otherwise).
        checkpoint: deprecated name of ``official_checkpoint``.
        pre_processor: anomalib pre-processor; True = CLIP's resize and normalisation at ``image_size``.
        post_processor: anomalib post-processor; True = thresholds from validation, maps unnormalised.
        evaluator: anomalib evaluator; True = the papers' six metrics.
        visualizer: anomalib visualizer; True = the default one.
    """

    pos_embed_mode = "bicubic_antialias"  # the vendored open_clip's resize
    paper_max_epochs = 15

    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        activation: str = "gelu",
        image_size: int | Sequence[int] = 518,
        official_checkpoint: str | os.PathLike | None = None,
        class_name: str | None = "auto",
        class_names_from_paths: bool = True,
        feature_layers: Sequence[int] | None = None,
        few_shot_layers: Sequence[int] | None = None,
        k_shot: int = 0,
        few_shot_source: str | os.PathLike | None = None,
        few_shot_seed: int = 42,
        logit_scale: float = 100.0,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.5, 0.999),
        official_single_image_dice: bool = False,
        seed: int = 0,
        allow_clip_mismatch: bool = False,
        checkpoint: str | os.PathLike | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        official_checkpoint = renamed_argument("Vand", "official_checkpoint", official_checkpoint,
                                               checkpoint=checkpoint)
        class_name = class_name or "auto"  # None was the old spelling of "auto"
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        self._per_image_classes = False
        self._is_setup = False
        self.init_contract(pre_processor, official_checkpoint, renamed=("checkpoint",))
        self.loss = VandLoss(official_single_image_dice)

    @property
    def class_name(self) -> str | None:
        """The fixed object word, or None for ``"auto"``."""
        name = self.settings["class_name"]
        return None if name == "auto" else name

    @property
    def k_shot(self) -> int:
        return int(self.settings["k_shot"])

    def check_arguments(self, check: ArgumentCheck, settings: dict[str, Any], arch: Any) -> None:  # noqa: ANN401
        depth = arch.vision_layers if arch is not None else None
        check.layers("feature_layers", settings["feature_layers"], depth)
        check.layers("few_shot_layers", settings["few_shot_layers"], depth)
        check.positive("k_shot", settings["k_shot"], zero=True)
        check.positive("logit_scale", settings["logit_scale"])
        check.positive("lr", settings["lr"])
        source = settings["few_shot_source"]
        check.require(source is None or Path(source).expanduser().is_dir(),
                      f"few_shot_source must be a folder of normal images, got {source!r}")

    def build_model(self, clip: ClipModel) -> VandModel:
        s = self.settings
        # The linear layers start as PyTorch initialises them (as officially), from ``seed``: two
        # models built with the same settings are the same model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s["seed"])
            return VandModel(clip, feature_layers=s["feature_layers"], few_shot_layers=s["few_shot_layers"],
                             logit_scale=s["logit_scale"], class_name=self.class_name or "object")

    read_official_weights = staticmethod(read_official_checkpoint)
    load_official_weights = staticmethod(load_official_checkpoint)

    def after_build(self) -> None:
        self._is_setup = False  # class name, text features and memory belong to the model just built

    def load_official_checkpoint(self, path: str | os.PathLike) -> None:
        """Load official linear layers (``visa_pretrained.pth``); the model is then ready zero-shot."""
        load_official_checkpoint(self.model, path)
        self.learnt_parts_trained.fill_(True)

    @property
    def learning_type(self) -> LearningType:
        """ONE_CLASS while untrained (``anomalib train`` trains the linear layers on auxiliary
        data); then ZERO_SHOT, or FEW_SHOT with a ``k_shot`` memory (anomalib only validates)."""
        learning_type = super().learning_type
        if learning_type == LearningType.ZERO_SHOT and self.k_shot > 0:
            return LearningType.FEW_SHOT
        return learning_type

    # --- set-up: class name, text features, few-shot memory ---------------------------------------

    def ready_for_inference(self) -> None:
        """Class name and text features for inference, and the few-shot memory (once per build)."""
        super().ready_for_inference()
        if self._is_setup:
            return
        name = self._inference_class_name()
        self.model.set_class_name(name)
        self.model.freeze_text_features()
        if self.k_shot > 0:
            self.model.setup_few_shot(self._reference_images())
        self._is_setup = True

    def _datamodule(self) -> Any:  # noqa: ANN401
        trainer = getattr(self, "_trainer", None)
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def _inference_class_name(self) -> str:
        if self.class_name:
            return self.class_name
        single = evaluated_category(self)
        if single is not None:
            return single
        category = getattr(self._datamodule(), "category", None)
        # Pooled categories (``a+b``) or none: per-image names from the paths where possible.
        pooled = isinstance(category, str) and "+" in category
        self._per_image_classes = self.settings["class_names_from_paths"] and pooled
        return "object"

    def _reference_images(self) -> torch.Tensor:
        """``k_shot`` normal images of the target, pre-processed like the test images."""
        source = self.settings["few_shot_source"]
        if source is not None:
            dataset = PredictDataset(Path(source).expanduser())
        else:
            datamodule = self._datamodule()
            if datamodule is None:
                msg = "k_shot > 0 needs reference images: pass few_shot_source or run through an Engine with data"
                raise ValueError(msg)
            dataset = target_train_split(datamodule)
        count = len(dataset)
        if count == 0:
            msg = "no reference images found for the few-shot memory"
            raise ValueError(msg)
        generator = torch.Generator().manual_seed(self.settings["few_shot_seed"])
        indices = torch.randperm(count, generator=generator)[: self.k_shot].tolist()
        if count < self.k_shot:
            logger.warning("k_shot=%d but only %d reference images: using them all", self.k_shot, count)
        images = [dataset[index].image for index in indices]
        transform = getattr(self.pre_processor, "transform", None) if self.pre_processor else None
        images = [transform(image) if transform is not None else image for image in images]
        return torch.stack([image.as_subclass(torch.Tensor) for image in images])

    # --- training --------------------------------------------------------------------------------

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.model.trainable_linearlayer.parameters(), lr=self.settings["lr"],
                               betas=tuple(self.settings["betas"]))

    def batch_class_names(self, batch: Any) -> list[str]:  # noqa: ANN401
        default = self.class_name or self.model.class_name
        paths = getattr(batch, "image_path", None)
        if self.class_name or not self.settings["class_names_from_paths"] or paths is None:
            return [default] * batch.image.shape[0]
        return [class_name_from_path(path, default) for path in paths]

    def training_step(self, batch: Any, *args, **kwargs) -> torch.Tensor | None:  # noqa: ANN401
        del args, kwargs
        mask = self.masks_for_training(batch)
        if mask is None:  # VAND has no image-level loss: nothing to learn from this batch
            return None
        text = self.model.batch_text_features(self.batch_class_names(batch))
        probabilities = self.model.layer_probabilities(batch.image, text)
        loss, focal, dice = self.loss(probabilities, mask)
        size = batch.image.shape[0]
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
        self.log("train_focal", focal.sum(), on_step=False, on_epoch=True, batch_size=size)
        self.log("train_dice", dice.sum(), on_step=False, on_epoch=True, batch_size=size)
        return loss

    # --- evaluation ------------------------------------------------------------------------------

    def inference_class_names(self, batch: Any) -> list[str] | None:  # noqa: ANN401
        return self.batch_class_names(batch) if self._per_image_classes else None
