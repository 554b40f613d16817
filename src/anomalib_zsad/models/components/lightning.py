"""Lightning behaviour shared by every plugin model, and its CLIP part.

:class:`PluginModuleMixin` is what every model shares (argument checks through
:class:`~.contract.ModelContract`, the lazy build, the learning-type policy, the paper's epochs,
the untrained warning, one validation/test/predict step, checkpoints without the frozen backbone,
exports with any input size, the papers' evaluator). :class:`ZeroShotModuleMixin` adds the CLIP
part: CLIP's pre-processing and the INT8 settings for CLIP ViTs. A CLIP method is
``class X(ZeroShotModuleMixin, AnomalibModule)``; a method on another backbone (BGAD) is
``class X(PluginModuleMixin, AnomalibModule)`` and declares its own ``configure_pre_processor``.

Written as mixins, not as base classes: anomalib's ``get_model``/``list_models`` only see
*direct* subclasses of ``AnomalibModule``.

Learning type. anomalib's ``Engine.fit`` never trains a model that reports ``ZERO_SHOT`` or
``FEW_SHOT`` (it only validates it), and ``Engine.test``/``predict`` validate such a model first
(to set thresholds) unless a checkpoint is given; with a plain folder of images there is nothing
to validate on, and anomalib fails. The CLIP methods *do* train, on auxiliary data, then run
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
from typing import Any, ClassVar

import torch
from anomalib import LearningType
from anomalib.metrics import Evaluator
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from anomalib_zsad.clip import CLIP_MEAN, CLIP_STD

from .contract import IDENTITY_KEY, ClipModelContract, ModelContract
from .metrics import AUPR, AUPRO, AUROC, F1Max  # anomalib's, n/a where one class is missing
from .post_processing import RawScorePostProcessor
from .quantization import quantize_ov_model

logger = logging.getLogger(__name__)

#: Result column -> (metric class, batch fields). Column names are the metric names anomalib logs.
PAPER_METRIC_FIELDS: dict[str, tuple[type, list[str]]] = {
    "image_AUROC": (AUROC, ["pred_score", "gt_label"]),
    "image_AUPR": (AUPR, ["pred_score", "gt_label"]),
    "image_F1Max": (F1Max, ["pred_score", "gt_label"]),
    "pixel_AUROC": (AUROC, ["anomaly_map", "gt_mask"]),
    "pixel_AUPRO": (AUPRO, ["anomaly_map", "gt_mask"]),
    "pixel_F1Max": (F1Max, ["anomaly_map", "gt_mask"]),
    "pixel_AUPR": (AUPR, ["anomaly_map", "gt_mask"]),  # pixel AP, as Bayes-PFL reports (step-wise, sklearn's)
}
PAPER_METRICS = tuple(PAPER_METRIC_FIELDS)
FROZEN_PREFIX = "model.clip."  # the CLIP methods' frozen backbone (ClipModelContract.frozen_prefixes)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LIGHTNING_FALLBACK_EPOCHS = 1000  # what Lightning trains when no limit is given
ONNX_OPSET = 18  # the opset torch.onnx's dynamo exporter builds


def clip_pre_processor(image_size: int | Sequence[int] = 518) -> PreProcessor:
    """Resize (bicubic, as CLIP) and CLIP's normalisation; masks follow the image size.
    ``image_size`` is a side or (height, width), as a YAML list gives it."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return PreProcessor(transform=Compose([
        Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
        Normalize(mean=CLIP_MEAN, std=CLIP_STD),
    ]))


def imagenet_pre_processor(image_size: int | Sequence[int] = 256,
                           interpolation: InterpolationMode = InterpolationMode.BILINEAR) -> PreProcessor:
    """Resize and ImageNet normalisation (anomalib's default pre-processing, at ``image_size``), for
    models on ImageNet backbones; masks follow the image size."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return PreProcessor(transform=Compose([
        Resize(size, interpolation=interpolation, antialias=True),
        Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ]))


def paper_evaluator() -> Evaluator:
    """The figures the ZSAD papers report: image AUROC / AP / F1-max, pixel AUROC / AUPRO / F1-max
    and pixel AP (Bayes-PFL's tables; anomalib's ``AUPR`` is the step-wise average precision of
    scikit-learn's ``average_precision_score``).

    Pixel metrics skipped, not failed, for models or data without maps or masks; a metric whose
    targets hold one class only, e.g. image metrics on a set of anomalous images, reports nothing:
    see ``components/metrics.py``."""
    return Evaluator(test_metrics=[
        metric_cls(fields=fields, prefix=column.split("_", 1)[0] + "_", strict=column.startswith("image_"))
        for column, (metric_cls, fields) in PAPER_METRIC_FIELDS.items()])


class PluginModuleMixin(ModelContract):
    """Shared hooks of every plugin model. A model's ``__init__`` calls
    ``super().__init__(pre_processor=..., ...)`` and then :meth:`init_contract`; it declares the
    rest as :class:`ModelContract` describes, and its ``configure_pre_processor``."""

    #: what the untrained warning says the scores are
    untrained_scores: ClassVar[str] = "random prompts"
    #: whether some training steps leave learnt parameters without gradients (a stage that trains
    #: one part, a parameter the official code creates but never uses): DDP must then look for
    #: them (``find_unused_parameters``) or it fails at the next step. None: where the model
    #: optimises manually (stages, several optimisers, one flow per step).
    ddp_find_unused_parameters: ClassVar[bool | None] = None

    def init_contract(self, pre_processor: nn.Module | bool, official_checkpoint: Any = None,  # noqa: ANN401
                      renamed: Sequence[str] = ()) -> None:
        """Check every argument (one error for all), size the default pre-processor, and read the
        official weights file if one is given; the backbone itself is built at first use."""
        for name in renamed:  # deprecated aliases: their value now lives under the new name
            self.hparams.pop(name, None)
        # Persistent, so a Lightning checkpoint says whether its learnt parts were trained.
        self.register_buffer("learnt_parts_trained", torch.tensor(False))
        self._warned_no_masks = False
        self._warned_untrained = False
        self._default_pre_processor = pre_processor is True
        self.validate_arguments()
        self.apply_settings(rebuild=False)
        self.init_official_weights(official_checkpoint)

    @classmethod
    def configure_pre_processor(cls, image_size: int | Sequence[int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` and ImageNet normalisation (a model on another backbone says
        its own), also where anomalib's benchmark asks for a pre-processor of a given size."""
        return imagenet_pre_processor(image_size or 256)

    @property
    def learning_type(self) -> LearningType:
        trained = getattr(self, "learnt_parts_trained", None)
        if trained is None or not bool(trained):
            return LearningType.ONE_CLASS
        post = getattr(self, "post_processor", None)
        threshold = getattr(post, "image_threshold", None)
        thresholds_known = threshold is not None and not torch.isnan(torch.as_tensor(threshold)).any()
        # A threshold source that needs no validation (normal images, fixed values: components/thresholds.py)
        # computes its thresholds itself: test/predict need no validation run (a folder of images has none).
        if getattr(post, "thresholds_need_validation", True) is False:
            thresholds_known = True
        return LearningType.ONE_CLASS if thresholds_known else LearningType.ZERO_SHOT

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        # Not the paper's epochs: anomalib lets trainer_arguments override the user's trainer
        # settings. They are set in setup() where the user gave none (see use_paper_epochs).
        return {}

    def default_max_epochs(self) -> int | None:
        """The paper's training length (None: the model does not train)."""
        return self.paper_max_epochs

    def use_paper_epochs(self) -> None:
        """Without ``max_epochs``/``max_steps``/``max_time`` Lightning trains 1000 epochs; run the
        paper's number instead (``--trainer.max_epochs`` still decides where it is given)."""
        trainer, epochs = self.trainer, self.default_max_epochs()
        unset = trainer.fit_loop.max_epochs in (None, LIGHTNING_FALLBACK_EPOCHS) and trainer.max_steps == -1
        timed = any(isinstance(callback, Timer) for callback in trainer.callbacks)  # max_time given
        if epochs and unset and not timed:
            logger.info("%s: max_epochs not given, training the paper's %d epochs", type(self).__name__, epochs)
            trainer.fit_loop.max_epochs = epochs

    def setup(self, stage: str) -> None:
        """Training builds the model here, before the strategy moves it and wraps it for DDP; test
        and predict wait for a checkpoint that may say which backbone to build (on_load_checkpoint)."""
        super().setup(stage)
        if stage == "fit":
            self.use_paper_epochs()
            _ = self.model
            self.prepare_for_ddp()

    def prepare_for_ddp(self) -> None:
        """Where some training steps leave learnt parameters without gradients (see
        :attr:`ddp_find_unused_parameters`), tell Lightning's DDP strategy to look for them before
        it wraps the model (after ``setup``); a strategy given with the flag keeps it. Nothing
        changes without DDP. (The frozen backbone is left out of DDP by
        :attr:`_ddp_params_and_buffers_to_ignore`.)"""
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        find_unused = self.ddp_find_unused_parameters
        if find_unused is None:
            find_unused = not self.automatic_optimization
        kwargs = getattr(strategy, "_ddp_kwargs", None)
        if (isinstance(strategy, DDPStrategy) and find_unused and isinstance(kwargs, dict)
                and "find_unused_parameters" not in kwargs):
            logger.info("%s: DDP with find_unused_parameters=True (some of its training steps leave learnt "
                        "parameters without gradients)", type(self).__name__)
            kwargs["find_unused_parameters"] = True

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """What DDP leaves out: the frozen backbone's parameters and buffers, as the model is now.

        Read by ``DistributedDataParallel`` when Lightning wraps the model for training, and by
        Lightning's own broadcast of the model's state before validate/test/predict. Every process
        builds the backbone alike from the same settings (weights file or tag, seed of random
        weights) and training never changes it, so these broadcasts (1.7 GB for a CLIP
        ViT-L/14@336, and its buffers before every training forward) would copy identical values;
        it has no gradients, so nothing else of DDP concerns it. A property, not a list set once:
        the backbone is built lazily (at ``setup("fit")``, a checkpoint, the first batch), and what
        is broadcast must be the same in a process that has built it and in one that has not yet."""
        frozen = [name for name, p in self.named_parameters() if name.startswith(self.frozen_prefixes)
                  and not p.requires_grad]  # (a trainable one there would still be averaged)
        frozen += [name for name, _ in self.named_buffers() if name.startswith(self.frozen_prefixes)]
        return frozen + [name for name in self.__dict__.get("_ddp_ignored_extra", ()) if name not in frozen]

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names: Sequence[str]) -> None:
        """(``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``: names added to the backbone's.)"""
        self.__dict__["_ddp_ignored_extra"] = list(names)

    def ready_for_inference(self) -> None:
        """Build if not yet built, and say so loudly where the learnt parts were never learnt."""
        _ = self.model
        trainer = getattr(self, "_trainer", None)
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING  # (sanity validation before training)
        untrained = self.has_learnt_parts and not bool(self.learnt_parts_trained)
        if untrained and not fitting and not self._warned_untrained:
            self._warned_untrained = True
            logger.warning("%s runs with learnt parts that were never trained nor loaded: its scores are those of "
                           "%s. Train it (anomalib train), give --ckpt_path, or give the official "
                           "weights (--model.official_checkpoint).", type(self).__name__, self.untrained_scores)

    def _ready_outside_inference_mode(self) -> None:
        # Lightning runs these hooks under inference mode: what is built or cached here (the CLIP,
        # text features, resized position embeddings) must stay usable by a later training step.
        with torch.inference_mode(False), torch.no_grad():
            self.ready_for_inference()

    def on_validation_start(self) -> None:
        self._ready_outside_inference_mode()

    def on_test_start(self) -> None:
        self._ready_outside_inference_mode()

    def on_predict_start(self) -> None:
        self._ready_outside_inference_mode()

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Thresholds from validation, but scores and maps left as the model gives them: the
        papers report un-normalised scores, and min-max normalisation would clip test values
        outside the validation range."""
        return RawScorePostProcessor(enable_normalization=False)

    @staticmethod
    def configure_evaluator() -> Evaluator:
        return paper_evaluator()

    @classmethod
    def configure_visualizer(cls) -> Any:  # noqa: ANN401
        """anomalib's image visualizer, with the drawn maps (not the metrics' ones) brought to [0, 1]
        by the model's validation range and pixel threshold (:mod:`.display`)."""
        from .display import ZeroShotVisualizer

        return ZeroShotVisualizer()

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

    def inference_class_names(self, batch: Any) -> list[str] | None:  # noqa: ANN401
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
        """What depends only on the learnt parts becomes a constant buffer (the CLIP methods' text
        features: no tokenizer and no text tower get exported; a model's ``freeze_text_features``).
        An export of learnt parts that were never learnt says so, as test and predict do."""
        self.ready_for_inference()
        if self.settings.get("class_name") == "auto":
            word = getattr(self.model, "class_name", "object")
            logger.warning("%s exports with the object word %r in its prompts (class_name='auto' reads it from the "
                           "data, which an exported model does not see). Give --model.class_name <object> to export "
                           "for one product.", type(self).__name__, word)
        freeze = getattr(self.model, "freeze_text_features", None)
        if freeze is not None:
            freeze()

    def to_torch(self, *args, **kwargs) -> Any:  # noqa: ANN401
        self._freeze_for_export()
        return super().to_torch(*args, **kwargs)

    def to_onnx(self, *args, **kwargs) -> Any:  # noqa: ANN401  (to_openvino goes through here)
        """anomalib's export, with the input's height and width dynamic: the pre-processor's resize
        in the graph brings any image to the model size (:mod:`.export`); ``input_size`` only sets
        the probe image."""
        from .export import any_size_export

        self._freeze_for_export()
        # The dynamo exporter builds opset 18; anomalib asks for 14, and converting these graphs down
        # fails (torch then logs the converter's traceback and keeps 18). Ask for 18 from the start.
        kwargs.setdefault("opset_version", ONNX_OPSET)
        with any_size_export(self, kwargs) as onnx_kwargs:
            return super().to_onnx(*args, **onnx_kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen backbone out (1.7 GB for a CLIP ViT-L/14@336), but say which it was: it
        is rebuilt from the settings when the checkpoint is loaded, and must be the same. The official
        weights file is not needed again: what was learnt is in the checkpoint."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(self.frozen_prefixes)]:
            del state[key]
        checkpoint[IDENTITY_KEY] = self.identity()
        if "official_checkpoint" in checkpoint.get("hyper_parameters", {}):
            checkpoint["hyper_parameters"]["official_checkpoint"] = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.adopt_checkpoint_settings(checkpoint)  # builds the backbone the checkpoint needs
        state = checkpoint.setdefault("state_dict", {})
        for key, value in self.state_dict().items():
            if key.startswith(self.frozen_prefixes):
                state.setdefault(key, value)


class ZeroShotModuleMixin(ClipModelContract, PluginModuleMixin):
    """:class:`PluginModuleMixin` for the CLIP methods: the backbone is a CLIP
    (:class:`~.contract.ClipModelContract`), images get CLIP's pre-processing, INT8 exports the
    settings that suit a CLIP ViT."""

    @classmethod
    def configure_pre_processor(cls, image_size: int | Sequence[int] | None = None) -> PreProcessor:
        """CLIP's resize and normalisation (not anomalib's ImageNet default), also where anomalib's
        benchmark asks for a pre-processor of a given ``image_size``."""
        return clip_pre_processor(image_size or 518)

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
