"""CLIP / CLIP-AC as an anomalib model: ``anomalib test --model CLIPBaseline --model.prompts clip_ac``.

Nothing is learnt. The model reports ``ZERO_SHOT`` until validation has set its thresholds, so
``anomalib train`` (``Engine.fit``) and ``anomalib test`` only validate it on the target and never
train; once the thresholds are known it reports ``ONE_CLASS``, as every plugin model does, so that
a later ``predict`` on a plain folder of images (no labels to validate on) runs at once (see
``components/lightning.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from anomalib_zsad.clip import ClipModel
from anomalib_zsad.models.components import ZeroShotModuleMixin
from anomalib_zsad.models.components.class_names import class_names_for, evaluated_category
from anomalib_zsad.models.components.contract import ArgumentCheck

from .torch_model import PROMPT_SETS, CLIPBaselineModel

logger = logging.getLogger(__name__)


def prompt_class_names(paths: Sequence[str] | None, setting: str, default: str) -> list[str] | None:
    """Per-image class names for ``class_name="auto"`` (the category folder of each image path,
    ``metal_nut`` -> ``metal nut``), or None (the model's fixed name)."""
    names = class_names_for(paths, setting, default)
    return None if names is None else [name.replace("_", " ") for name in names]


class CLIPBaseline(ZeroShotModuleMixin, AnomalibModule):
    """CLIP and CLIP-AC: the zero-shot baselines of AnomalyCLIP (ICLR 2024, Appendix A.2); nothing learnt.

    Args:
        backbone: open_clip architecture of the frozen CLIP (AnomalyCLIP paper: ``ViT-L-14-336``;
            ``zsad-tiny`` is a small random one for tests).
        pretrained: CLIP weights: an open_clip tag (``openai``), a local checkpoint file, or None
            for random weights (tests only).
        activation: MLP activation of the CLIP: ``auto`` follows the weights (QuickGELU for
            OpenAI's), ``gelu`` or ``quick_gelu``.
        image_size: input side (or [height, width]) of the default pre-processor (paper 518); a
            multiple of the patch size.
        official_checkpoint: must stay None: these baselines learn nothing and have no released
            weights (a file given here is refused).
        prompts: ``clip``: the paper's two prompts, "A photo of a normal [cls]" and "A photo of an
            anomalous [cls]"; ``clip_ac``: "normal [cls]" and "anomalous [cls]" in each of CLIP's 80
            ImageNet templates, the normalised embeddings averaged per class.
        class_name: the object word [cls] of the prompts: ``"auto"`` reads each image's category
            from its path (MVTec AD / VisA layout, ``_`` read as a space), else the evaluated
            datamodule's category, else ``"object"``; any other string is used for every image
            (and in an export).
        feature_layers: vision blocks (1-based) whose patch tokens make the map; None = the last
            block (CLIP's local visual embeddings, as the paper's baselines).
        dpam_start: first vision block with AnomalyCLIP's V-V attention (DPAM); None = plain CLIP
            attention, as the paper's baselines.
        temperature: softmax temperature of Eq. 1; None = CLIP's own (1 / exp(logit_scale), 0.01
            for OpenAI's weights).
        sigma: standard deviation of the Gaussian smoothing of the map, in pixels (paper's test
            protocol 4; 0 = off).
        seed: the weights of a random CLIP (tests); nothing else is random.
        allow_clip_mismatch: run a checkpoint on another CLIP or image size than it was made with
            (refused otherwise).
        pre_processor: anomalib pre-processor; True = CLIP's resize and normalisation at ``image_size``.
        post_processor: anomalib post-processor; True = thresholds from validation, maps unnormalised.
        evaluator: anomalib evaluator; True = the papers' six metrics.
        visualizer: anomalib visualizer; True = the default one.
    """

    pos_embed_mode = "bilinear"  # run in AnomalyCLIP's code base, which resizes bilinearly
    paper_max_epochs = None  # does not train
    has_learnt_parts = False

    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        activation: str = "auto",
        image_size: int | Sequence[int] = 518,
        official_checkpoint: str | os.PathLike | None = None,
        prompts: str = "clip",
        class_name: str = "auto",
        feature_layers: Sequence[int] | None = None,
        dpam_start: int | None = None,
        temperature: float | None = None,
        sigma: float = 4.0,
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
        # Nothing to learn: ready as it is (the learning-type policy then waits only for thresholds).
        self.learnt_parts_trained.fill_(True)

    @property
    def class_name(self) -> str:
        return self.settings["class_name"]

    def check_arguments(self, check: ArgumentCheck, settings: dict[str, Any], arch: Any) -> None:  # noqa: ANN401
        depth = arch.vision_layers if arch is not None else None
        check.choice("prompts", settings["prompts"], PROMPT_SETS)
        check.require(isinstance(settings["class_name"], str) and settings["class_name"],
                      f"class_name must be 'auto' or an object word, got {settings['class_name']!r}")
        check.layers("feature_layers", settings["feature_layers"], depth)
        if settings["dpam_start"] is not None:
            check.layers("dpam_start", [settings["dpam_start"]], depth)
        check.positive("temperature", settings["temperature"], optional=True)
        check.positive("sigma", settings["sigma"], zero=True)

    def build_model(self, clip: ClipModel) -> CLIPBaselineModel:
        s = self.settings
        return CLIPBaselineModel(clip, prompts=s["prompts"], class_name=self._fixed_class_name(),
                                 feature_layers=s["feature_layers"], dpam_start=s["dpam_start"],
                                 temperature=s["temperature"], sigma=s["sigma"])

    def _fixed_class_name(self) -> str:
        return "object" if self.class_name == "auto" else self.class_name

    @staticmethod
    def read_official_weights(path: Any) -> Any:  # noqa: ANN401
        msg = (f"CLIPBaseline has no official weights: CLIP and CLIP-AC learn nothing (got official_checkpoint="
               f"{str(path)!r}). Leave official_checkpoint out.")
        raise ValueError(msg)

    @staticmethod
    def load_official_weights(model: nn.Module, path: Any) -> None:  # noqa: ANN401
        del model
        CLIPBaseline.read_official_weights(path)

    def _freeze_for_export(self) -> None:
        if self.class_name == "auto":
            logger.warning("CLIPBaseline exports with the object word 'object' in its prompts (class_name='auto' "
                           "reads it from image paths, which an exported model does not see). Give "
                           "--model.class_name <object> to export for one product.")
        super()._freeze_for_export()

    def configure_optimizers(self) -> None:
        """Nothing to optimise."""
        return

    def training_step(self, batch: Any, *args, **kwargs) -> None:  # noqa: ANN401
        """Never run by ``Engine.fit``, which only validates a zero-shot model; nothing to learn."""
        del batch, args, kwargs

    def inference_class_names(self, batch: Any) -> list[str] | None:  # noqa: ANN401
        default = evaluated_category(self) or self._fixed_class_name()
        return prompt_class_names(getattr(batch, "image_path", None), self.class_name, default)
