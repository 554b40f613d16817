"""WinCLIP that runs in a benchmark: offline-capable, correct few-shot, sane class names.

anomalib 2.7's :class:`~anomalib.models.WinClip` has four problems for a benchmark grid; this
subclass fixes them from the plugin side without touching anomalib's files:

1. **Backbone hard-wired and downloaded in ``__init__``.** ``WinClipModel.__init__`` always calls
   ``open_clip.create_model_and_transforms("ViT-B-16-plus-240", pretrained="laion400m_e31")``, so
   the model cannot even be constructed offline or with another CLIP. :class:`WinClipFixedModel`
   takes ``backbone`` / ``pretrained`` / ``image_size`` (``pretrained=None`` gives random weights,
   a file path loads local weights; ``backbone`` may also name one of this package's small
   architectures from :mod:`anomalib_zsad.clip.architecture`, e.g. ``"zsad-tiny"``).
2. **Few-shot reference images bypass the pre-processor.** anomalib 2.x applies the model's
   transform in ``PreProcessor.on_*_batch_start`` hooks, but ``WinClip.setup`` pulls reference
   images straight from ``datamodule.train_dataloader()`` (full-size, not CLIP-normalised), so the
   few-shot memory is built from differently sized/scaled images than the queries (or crashes on
   the positional embedding). Here references go through ``pre_processor.transform``.
3. **``few_shot_source`` crashes**: it reads ``pre_processor.test_transform``, which no longer
   exists on anomalib 2.x's ``PreProcessor``. Fixed by the same transform path as (2).
4. **Empty category.** ``Folder`` datamodules report ``category == ""``; ``WinClip._get_class_name``
   returns it, ``WinClipModel.setup("")`` treats it as "no class name", the prompt ensemble is never
   built and the first forward raises "Text embeddings have not been collected". Here the class name is: init argument
   -> non-empty ``datamodule.category`` (``_`` read as a space, ``metal_nut`` -> ``metal nut``)
   -> the ``name`` given to ``Folder`` -> ``"object"`` (with a warning).

The input size follows the CLIP backbone (240 for the default ViT-B-16-plus-240), instead of a
hard-coded 240 that breaks any other backbone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from anomalib.data.predict import PredictDataset
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.models.image.winclip import WinClip
from anomalib.models.image.winclip.torch_model import TEMPERATURE, WinClipModel
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from anomalib_zsad.clip import CLIP_MEAN, CLIP_STD

logger = logging.getLogger(__name__)

__all__ = ["WinClipFixed", "WinClipFixedModel"]

#: OpenAI CLIP normalisation, the one WinCLIP and open_clip's ViT weights use.
DEFAULT_BACKBONE = "ViT-B-16-plus-240"
DEFAULT_PRETRAINED = "laion400m_e31"


def _extra_architecture(backbone: str) -> dict | None:
    """The open_clip-format config of one of this package's small CLIPs, if ``backbone`` names one."""
    try:
        from anomalib_zsad.clip.architecture import EXTRA_ARCHITECTURES
    except ImportError:  # the CLIP layer is optional for this module
        return None
    config = EXTRA_ARCHITECTURES.get(backbone)
    return None if config is None else {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}


def clip_input_size(backbone: str, image_size: int | None = None) -> int:
    """Side length the CLIP ``backbone`` expects (``image_size`` overrides it)."""
    if image_size is not None:
        return int(image_size)
    config = _extra_architecture(backbone)
    if config is None:
        import open_clip

        config = open_clip.get_model_config(backbone)
        if config is None:
            msg = f"unknown open_clip backbone {backbone!r}"
            raise ValueError(msg)
    size = config["vision_cfg"]["image_size"]
    return int(size if isinstance(size, int) else size[0])


def build_open_clip(backbone: str, pretrained: str | None, image_size: int | None) -> nn.Module:
    """An open_clip ``CLIP`` for WinCLIP: named (optionally pretrained) or a small random one."""
    import open_clip

    config = _extra_architecture(backbone)
    if config is not None:
        if pretrained:
            msg = f"{backbone!r} is a random-weight test architecture; set pretrained: null"
            raise ValueError(msg)
        if image_size is not None:
            config["vision_cfg"]["image_size"] = int(image_size)
        return open_clip.CLIP(**config)
    return open_clip.create_model(backbone, pretrained=pretrained or None, force_image_size=image_size)


class WinClipFixedModel(WinClipModel):
    """:class:`WinClipModel` with a configurable (and offline-capable) CLIP backbone.

    ``WinClipModel.__init__`` downloads its fixed backbone before anything else, so it cannot be
    called; this constructor performs the same steps with the backbone chosen by the caller.
    """

    def __init__(
        self,
        class_name: str | None = None,
        reference_images: torch.Tensor | None = None,
        scales: tuple = (2, 3),
        backbone: str = DEFAULT_BACKBONE,
        pretrained: str | None = DEFAULT_PRETRAINED,
        image_size: int | None = None,
    ) -> None:
        nn.Module.__init__(self)  # skip WinClipModel.__init__: it downloads ViT-B-16-plus-240
        self.backbone = backbone
        self.pretrained = pretrained
        self.temperature = TEMPERATURE
        self.class_name = class_name
        self.reference_images = reference_images
        self.scales = tuple(scales)
        self.apply_transform = False
        self.k_shot = 0
        self.clip = build_open_clip(backbone, pretrained, image_size)
        self.clip.visual.output_tokens = True
        side = clip_input_size(backbone, image_size)
        self._transform = Compose([Resize((side, side)), Normalize(CLIP_MEAN, CLIP_STD)])
        self.grid_size = self.clip.visual.grid_size
        if min(self.grid_size) < max(self.scales):
            msg = f"CLIP patch grid {self.grid_size} is smaller than the largest window scale {max(self.scales)}"
            raise ValueError(msg)
        self.register_buffer_list("masks", self._generate_masks(), persistent=False)
        self.register_buffer("_text_embeddings", torch.empty(0))
        self.register_buffer_list("_visual_embeddings", [torch.empty(0) for _ in self.scales])
        self.register_buffer("_patch_embeddings", torch.empty(0))
        self.setup(class_name, reference_images)


class WinClipFixed(WinClip):
    """WinCLIP (zero-/few-shot) usable offline, with correct few-shot references; see module doc.

    Args:
        class_name: Object name for the prompt ensemble; ``None`` reads it from the datamodule.
        k_shot: Number of normal reference images (0 = zero-shot).
        scales: Sliding-window scales.
        few_shot_source: Folder of reference images; ``None`` samples the target's train set.
        backbone: open_clip model name, or a small architecture of :mod:`anomalib_zsad.clip`.
        pretrained: open_clip pretrained tag or a local weights file; ``None`` = random weights.
        image_size: Force the CLIP input size (the position embedding is sized accordingly).
        pre_processor, post_processor, evaluator, visualizer: As for any anomalib model.
    """

    def __init__(
        self,
        class_name: str | None = None,
        k_shot: int = 0,
        scales: tuple = (2, 3),
        few_shot_source: Path | str | None = None,
        backbone: str = DEFAULT_BACKBONE,
        pretrained: str | None = DEFAULT_PRETRAINED,
        image_size: int | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        input_size = clip_input_size(backbone, image_size)
        if pre_processor is True:  # the default must match the chosen backbone, not a fixed 240
            pre_processor = self.clip_pre_processor(input_size)
        # WinClip.__init__ would build the downloading WinClipModel; do its work here instead.
        AnomalibModule.__init__(
            self,
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = WinClipFixedModel(scales=scales, backbone=backbone, pretrained=pretrained, image_size=image_size)
        self.class_name = class_name
        self.k_shot = k_shot
        self.few_shot_source = Path(few_shot_source) if few_shot_source else None
        self.is_setup = False

    @staticmethod
    def clip_pre_processor(size: int) -> PreProcessor:
        """WinCLIP's transform (bicubic resize + CLIP normalisation) at the backbone's input size."""
        return PreProcessor(transform=Compose([
            Resize((size, size), antialias=True, interpolation=InterpolationMode.BICUBIC),
            Normalize(mean=CLIP_MEAN, std=CLIP_STD),
        ]))

    def setup(self, stage: str) -> None:
        """Build text embeddings and (few-shot) reference embeddings from *pre-processed* images."""
        del stage
        if self.is_setup:
            return
        self.class_name = self._get_class_name()
        ref_images = None
        if self.k_shot:
            if self.few_shot_source:
                logger.info("Loading reference images from %s", self.few_shot_source)
                dataset = PredictDataset(self.few_shot_source)
                loader: Iterable[Any] = DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=dataset.collate_fn)
            else:
                logger.info("Collecting %d reference images from the training set", self.k_shot)
                loader = self.trainer.datamodule.train_dataloader()
            ref_images = self.collect_reference_images(loader)
            if ref_images.shape[0] < self.k_shot:
                msg = f"k_shot={self.k_shot} but only {ref_images.shape[0]} reference images are available"
                raise ValueError(msg)
        self.model.setup(self.class_name, ref_images)
        self.is_setup = True

    def collect_reference_images(self, dataloader: Iterable[Any]) -> torch.Tensor:
        """First ``k_shot`` images of ``dataloader``, transformed like the test images."""
        collected: list[torch.Tensor] = []
        count = 0
        for batch in dataloader:
            images = batch.image[: self.k_shot - count]
            if self.pre_processor is not None and getattr(self.pre_processor, "transform", None) is not None:
                images = self.pre_processor.transform(images)
            collected.append(images)
            count += images.shape[0]
            if count >= self.k_shot:
                break
        return torch.cat(collected) if collected else torch.empty(0)

    def _get_class_name(self) -> str:
        if self.class_name:
            return self.class_name
        datamodule = self.trainer.datamodule if getattr(self, "_trainer", None) else None
        category = getattr(datamodule, "category", "") or ""
        if category:
            return category.replace("_", " ")
        data_name = getattr(datamodule, "name", "") or ""  # Folder(name=...); others give their class name
        if data_name and data_name != type(datamodule).__name__:
            return data_name.replace("_", " ")
        logger.warning("WinClip: no class name and no category in the datamodule; prompting with 'object'")
        return "object"

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Same as WinClip (kept explicit so a subclass change upstream does not leak in)."""
        return PostProcessor()
