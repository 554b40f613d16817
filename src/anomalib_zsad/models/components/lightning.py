"""Lightning behaviour shared by every CLIP-based ZSAD method that learns on auxiliary data.

Written as a mixin, not as a base class: anomalib's ``get_model``/``list_models`` only see
*direct* subclasses of ``AnomalibModule``, so each method is ``class X(ZeroShotModuleMixin,
AnomalibModule)``.

Learning type. anomalib's ``Engine.fit`` never trains a model that reports ``ZERO_SHOT`` or
``FEW_SHOT`` (it only validates it), and ``Engine.test``/``predict`` validate such a model first
(to set thresholds) unless a checkpoint is given; with a plain folder of images there is nothing
to validate on, and anomalib fails. These methods *do* train, on auxiliary data, then run
zero-shot on unseen categories. So a model reports:

* ``ONE_CLASS`` while its learnt parts are untrained: ``anomalib train``/``fit`` trains them;
* ``ZERO_SHOT`` once they are trained (or imported from an official checkpoint) but its
  thresholds are not yet known: ``train``/``test`` validate it on the target first;
* ``ONE_CLASS`` again once validation has set the thresholds: nothing is redone, and
  ``predict`` on a folder of images runs at once.

A Lightning checkpoint restores both the "trained" flag and the thresholds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from anomalib import LearningType
from anomalib.metrics import AUPR, AUPRO, AUROC, Evaluator, F1Max
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from .quantization import quantize_ov_model

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FROZEN_PREFIX = "model.clip."


def clip_pre_processor(image_size: int | Sequence[int] = 518) -> PreProcessor:
    """Resize (bicubic, as CLIP) and CLIP's normalisation; masks follow the image size.
    ``image_size`` is a side or (height, width), as a YAML list gives it."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return PreProcessor(transform=Compose([
        Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
        Normalize(mean=CLIP_MEAN, std=CLIP_STD),
    ]))


def paper_evaluator() -> Evaluator:
    """The figures the ZSAD papers report: image AUROC / AP / F1-max, pixel AUROC / AUPRO / F1-max."""
    return Evaluator(test_metrics=[
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        AUPR(fields=["pred_score", "gt_label"], prefix="image_"),
        F1Max(fields=["pred_score", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        F1Max(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
    ])


class ZeroShotModuleMixin:
    """Shared hooks; the class using it sets ``self.model`` (with a ``clip`` attribute) and calls
    :meth:`_init_zero_shot_state` in its ``__init__``."""

    def _init_zero_shot_state(self, trained: bool = False) -> None:
        # Persistent, so a Lightning checkpoint says whether its learnt parts were trained.
        self.register_buffer("learnt_parts_trained", torch.tensor(trained))
        self._warned_no_masks = False

    @property
    def learning_type(self) -> LearningType:
        trained = getattr(self, "learnt_parts_trained", None)
        if trained is None or not bool(trained):
            return LearningType.ONE_CLASS
        post = getattr(self, "post_processor", None)
        threshold = getattr(post, "image_threshold", None)
        thresholds_known = threshold is not None and not torch.isnan(torch.as_tensor(threshold)).any()
        return LearningType.ONE_CLASS if thresholds_known else LearningType.ZERO_SHOT

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        # Epochs and the like live in configs/model/<method>.yaml, where a user can change them
        # (anomalib lets trainer_arguments override the user's trainer settings).
        return {}

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Thresholds from validation, but scores and maps left as the model gives them: the
        papers report un-normalised scores, and min-max normalisation would clip test values
        outside the validation range."""
        return PostProcessor(enable_normalization=False)

    @staticmethod
    def configure_evaluator() -> Evaluator:
        return paper_evaluator()

    def on_train_batch_end(self, *args, **kwargs) -> None:
        """Trained from the first optimiser step on, so checkpoints written during training
        (at validation, before ``on_train_end``) say so."""
        del args, kwargs
        self.learnt_parts_trained.fill_(True)

    def masks_for_training(self, batch: Any) -> torch.Tensor | None:  # noqa: ANN401
        """Binary masks [B, H, W] of a training batch, or None (image labels only) with a warning."""
        mask = getattr(batch, "gt_mask", None)
        if mask is None:
            if not self._warned_no_masks:
                logger.warning("The training data has image labels but no masks: only the image-level loss is "
                               "trained. Give auxiliary data with masks for the segmentation losses.")
                self._warned_no_masks = True
            return None
        mask = mask.float()
        if mask.dim() == 4:
            mask = mask[:, 0]
        return (mask > 0.5).float()

    def inference_class_names(self, batch: Any) -> list[str] | None:  # noqa: ANN401, ARG002
        """Per-image class names for models whose prompts name the object; None: the model's own."""
        return None

    def validation_step(self, batch: Any, *args, **kwargs) -> Any:  # noqa: ANN401
        """Also the test and predict step: anomalib's defaults pass images only, these models may
        also need each image's class name (:meth:`inference_class_names`)."""
        del args, kwargs
        names = self.inference_class_names(batch)
        outputs = self.model(batch.image) if names is None else self.model(batch.image, names)
        return batch.update(**outputs._asdict())

    def test_step(self, batch: Any, *args, **kwargs) -> Any:  # noqa: ANN401
        return self.validation_step(batch, *args, **kwargs)

    def predict_step(self, batch: Any, *args, **kwargs) -> Any:  # noqa: ANN401
        return self.validation_step(batch, *args, **kwargs)

    def _freeze_for_export(self) -> None:
        """Text features become a constant buffer: no tokenizer and no text tower get exported."""
        freeze = getattr(self.model, "freeze_text_features", None)
        if freeze is not None:
            freeze()

    def to_torch(self, *args, **kwargs) -> Any:  # noqa: ANN401
        self._freeze_for_export()
        return super().to_torch(*args, **kwargs)

    def to_onnx(self, *args, **kwargs) -> Any:  # noqa: ANN401  (to_openvino goes through here)
        self._freeze_for_export()
        return super().to_onnx(*args, **kwargs)

    def _post_training_quantization_ov(self, model: Any, datamodule: Any = None) -> Any:  # noqa: ANN401
        """``--compression_type int8_ptq``: anomalib's calibration data (the datamodule's validation
        images), with the settings that suit a CLIP ViT (:mod:`.quantization`) instead of NNCF's
        generic preset. For the zero-shot protocol, export with a datamodule over the *auxiliary*
        data so that no target image is used, even unlabelled."""
        if datamodule is None:
            msg = "INT8_PTQ needs a datamodule for its calibration images (engine.export(..., datamodule=...))"
            raise ValueError(msg)
        datamodule.setup("fit")
        if model.input(0).partial_shape[0].is_static:
            datamodule.train_batch_size = model.input(0).shape[0]
        dataloader = datamodule.val_dataloader()
        if len(dataloader.dataset) < 300:
            logger.warning("%d calibration images; anomalib recommends at least 300", len(dataloader.dataset))
        return quantize_ov_model(model, dataloader)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen CLIP out (1.7 GB for ViT-L/14@336): it is rebuilt from the
        hyper-parameters (backbone and weights) when the checkpoint is loaded."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(FROZEN_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.setdefault("state_dict", {})
        for key, value in self.state_dict().items():
            if key.startswith(FROZEN_PREFIX):
                state.setdefault(key, value)
