"""AnomalyCLIP as an anomalib model: ``anomalib train --model AnomalyCLIP``.

Only the prompts learn (on auxiliary data: another data set's test split with masks, see
``anomalib_zsad.data.CrossDataset``); the CLIP stays frozen and is not stored in checkpoints.
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

from anomalib_zsad.clip import ClipModel
from anomalib_zsad.models.components import ZeroShotModuleMixin
from anomalib_zsad.models.components.contract import ArgumentCheck, renamed_argument

from .checkpoint import load_official_checkpoint, read_official_checkpoint
from .loss import AnomalyCLIPLoss
from .torch_model import AnomalyCLIPModel


class AnomalyCLIP(ZeroShotModuleMixin, AnomalibModule):
    """AnomalyCLIP: object-agnostic prompt learning for zero-shot anomaly detection (ICLR 2024).

    Args:
        backbone: open_clip architecture of the frozen CLIP (paper: ``ViT-L-14-336``; ``zsad-tiny``
            is a small random one for tests).
        pretrained: CLIP weights: an open_clip tag (``openai``), a local checkpoint file, or None
            for random weights (tests only).
        activation: MLP activation of the CLIP: ``auto`` follows the weights (QuickGELU for
            OpenAI's, as the official code), ``gelu`` or ``quick_gelu``.
        image_size: input side (or [height, width]) of the default pre-processor (paper 518); a
            multiple of the patch size.
        official_checkpoint: an official ``epoch_15.pth`` to start from; the model is then ready
            zero-shot without training.
        n_ctx: learnt context tokens per prompt (official 12).
        prompt_depth: text blocks with deep prompts, counted from the first (official 9).
        deep_prompt_length: tokens per deep prompt (official 4).
        feature_layers: vision blocks (1-based) whose patch tokens make the maps; None = 6, 12, 18,
            24 of 24 (the paper). The official scripts pass ``24`` only.
        dpam_start: first vision block with V-V attention (DPAM); None = depth // 4 (the official
            ``DPAM_layer=20`` on ViT-L).
        sigma: standard deviation of the Gaussian smoothing of the map, in pixels (official 4; 0 = off).
        lam: weight of the segmentation losses against the image loss (official 4).
        lr: Adam learning rate (official 1e-3).
        betas: Adam betas (official (0.5, 0.999)).
        round_deep_prompts_to_fp16: round the deep prompts to float16 as the official ``.half()`` does.
        global_ln_post: apply ``ln_post`` to the global feature (the official code does not).
        seed: initial values of the prompts (and of a random CLIP).
        allow_clip_mismatch: run a checkpoint on another CLIP or image size than it was trained
            with (refused otherwise).
        prompt_checkpoint: deprecated name of ``official_checkpoint``.
        pre_processor: anomalib pre-processor; True = CLIP's resize and normalisation at ``image_size``.
        post_processor: anomalib post-processor; True = thresholds from validation, maps unnormalised.
        evaluator: anomalib evaluator; True = the papers' six metrics.
        visualizer: anomalib visualizer; True = the default one.
    """

    pos_embed_mode = "bilinear"
    paper_max_epochs = 15

    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        activation: str = "auto",
        image_size: int | Sequence[int] = 518,
        official_checkpoint: str | os.PathLike | None = None,
        n_ctx: int = 12,
        prompt_depth: int = 9,
        deep_prompt_length: int = 4,
        feature_layers: Sequence[int] | None = None,
        dpam_start: int | None = None,
        sigma: float = 4.0,
        lam: float = 4.0,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.5, 0.999),
        round_deep_prompts_to_fp16: bool = True,
        global_ln_post: bool = False,
        seed: int = 0,
        allow_clip_mismatch: bool = False,
        prompt_checkpoint: str | os.PathLike | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        official_checkpoint = renamed_argument("AnomalyCLIP", "official_checkpoint", official_checkpoint,
                                               prompt_checkpoint=prompt_checkpoint)
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        self.init_contract(pre_processor, official_checkpoint, renamed=("prompt_checkpoint",))
        self.loss = AnomalyCLIPLoss(lam)

    def check_arguments(self, check: ArgumentCheck, settings: dict[str, Any], arch: Any) -> None:  # noqa: ANN401
        depth = arch.vision_layers if arch is not None else None
        check.positive("n_ctx", settings["n_ctx"])
        check.positive("prompt_depth", settings["prompt_depth"])
        check.positive("deep_prompt_length", settings["deep_prompt_length"])
        check.layers("feature_layers", settings["feature_layers"], depth)
        if settings["dpam_start"] is not None:
            check.layers("dpam_start", [settings["dpam_start"]], depth)
        check.positive("sigma", settings["sigma"], zero=True)
        check.positive("lam", settings["lam"], zero=True)
        check.positive("lr", settings["lr"])
        if arch is not None:
            check.require(settings["prompt_depth"] <= arch.text_layers,
                          f"prompt_depth must be at most the text depth {arch.text_layers}, "
                          f"got {settings['prompt_depth']}")

    def build_model(self, clip: ClipModel) -> AnomalyCLIPModel:
        s = self.settings
        return AnomalyCLIPModel(clip, n_ctx=s["n_ctx"], prompt_depth=s["prompt_depth"],
                                deep_prompt_length=s["deep_prompt_length"], feature_layers=s["feature_layers"],
                                dpam_start=s["dpam_start"], sigma=s["sigma"],
                                round_deep_prompts_to_fp16=s["round_deep_prompts_to_fp16"],
                                global_ln_post=s["global_ln_post"], seed=s["seed"])

    read_official_weights = staticmethod(read_official_checkpoint)
    load_official_weights = staticmethod(load_official_checkpoint)

    def load_official_checkpoint(self, path: str | os.PathLike) -> None:
        """Load official prompt weights (``epoch_15.pth``); the model is then ready zero-shot."""
        load_official_checkpoint(self.model, path)
        self.learnt_parts_trained.fill_(True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.prompt_learner.parameters(), lr=self.settings["lr"],
                                betas=tuple(self.settings["betas"]))

    def training_step(self, batch: Any, *args, **kwargs) -> torch.Tensor:  # noqa: ANN401
        del args, kwargs
        logits, layer_probs = self.model.training_outputs(batch.image)
        terms = self.loss(logits, batch.gt_label, layer_probs, self.masks_for_training(batch))
        self.log("train_loss", terms["loss"], on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=batch.image.shape[0])
        return terms["loss"]
