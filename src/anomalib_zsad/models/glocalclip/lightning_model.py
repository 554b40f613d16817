"""GlocalCLIP as an anomalib model: ``anomalib train --model GlocalCLIP``.

Only the glocal prompts learn (on auxiliary data: another data set's test split with masks, see
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
from anomalib_zsad.models.components.contract import ArgumentCheck

from .checkpoint import load_official_checkpoint, read_official_checkpoint
from .loss import GlocalCLIPLoss
from .torch_model import GlocalCLIPModel


class GlocalCLIP(ZeroShotModuleMixin, AnomalibModule):
    """GlocalCLIP: object-agnostic global-local prompt learning for zero-shot anomaly detection.

    Args:
        backbone: open_clip architecture of the frozen CLIP (paper: ``ViT-L-14-336``; ``zsad-tiny``
            is a small random one for tests).
        pretrained: CLIP weights: an open_clip tag (``openai``), a local checkpoint file, or None
            for random weights (tests only).
        activation: MLP activation of the CLIP: ``auto`` follows the weights (QuickGELU for
            OpenAI's, as the official code), ``gelu`` or ``quick_gelu``.
        image_size: input side (or [height, width]) of the default pre-processor (official 518); a
            multiple of the patch size.
        official_checkpoint: an official ``epoch_15.pth`` (``{"prompt_learner": state_dict}``) to
            start from; the model is then ready zero-shot without training. Its shapes must fit
            ``n_ctx``, ``ab_ctx``, ``prompt_depth`` and ``deep_prompt_length``.
        n_ctx: learnt normal-context tokens of each branch (global, local); the anomalous prompt of a
            branch starts with them too (official 12).
        ab_ctx: learnt anomalous tokens of each branch, after the normal context (official 12).
        prompt_depth: text blocks with deep prompts, counted from the first (official ``depth`` 9).
        deep_prompt_length: tokens per deep prompt (official ``t_n_ctx`` 4).
        feature_layers: vision blocks (1-based) whose patch tokens make the maps; None = 6, 12, 18,
            24 of 24 (the official scripts).
        dpam_start: first vision block with V-V attention (DPAM); None = depth // 4 (the official
            ``DPAM_layer=20`` on ViT-L).
        sigma: standard deviation of the Gaussian smoothing of the map, in pixels (the official
            scripts pass 8; test.py's default is 4; 0 = off).
        alpha: weight of the glocal contrastive (triplet) loss (official 1.0).
        margin: margin of the triplet loss's hinge (official 0.0: only the pull term acts).
        lr: Adam learning rate (official 1e-3).
        betas: Adam betas (official (0.5, 0.999)).
        round_deep_prompts_to_fp16: round the deep prompts to float16 as the official ``.half()`` does.
        global_ln_post: apply ``ln_post`` to the global feature (the official code does not).
        official_layer_aliasing: reproduce the official code's bug by which every feature layer from
            ``dpam_start - 1`` on is the last block's (all four maps are the layer-24 map). False
            (default): the layers asked for, the paper's intent.
        seed: initial values of the prompts (and of a random CLIP).
        allow_clip_mismatch: run a checkpoint on another CLIP or image size than it was trained
            with (refused otherwise).
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
        ab_ctx: int = 12,
        prompt_depth: int = 9,
        deep_prompt_length: int = 4,
        feature_layers: Sequence[int] | None = None,
        dpam_start: int | None = None,
        sigma: float = 8.0,
        alpha: float = 1.0,
        margin: float = 0.0,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.5, 0.999),
        round_deep_prompts_to_fp16: bool = True,
        global_ln_post: bool = False,
        official_layer_aliasing: bool = False,
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
        self.loss = GlocalCLIPLoss(alpha=alpha, margin=margin)

    def check_arguments(self, check: ArgumentCheck, settings: dict[str, Any], arch: Any) -> None:  # noqa: ANN401
        depth = arch.vision_layers if arch is not None else None
        for name in ("n_ctx", "ab_ctx", "prompt_depth", "deep_prompt_length"):
            check.positive(name, settings[name])
        check.layers("feature_layers", settings["feature_layers"], depth)
        if settings["dpam_start"] is not None:
            check.layers("dpam_start", [settings["dpam_start"]], depth)
        for name in ("sigma", "alpha", "margin"):
            check.positive(name, settings[name], zero=True)
        check.positive("lr", settings["lr"])
        if arch is not None:
            depth_ok = settings["prompt_depth"] <= arch.text_layers
            check.require(depth_ok, f"prompt_depth must be at most the text depth {arch.text_layers}, "
                                    f"got {settings['prompt_depth']}")
            counts = (settings["n_ctx"], settings["ab_ctx"])
            if all(isinstance(c, int) for c in counts):
                # [SOT] n_ctx + ab_ctx tokens "damaged object." [EOT]
                check.require(sum(counts) + 5 <= arch.context_length,
                              f"n_ctx + ab_ctx must leave room for the prompt words in the text context of "
                              f"{arch.context_length} tokens, got {sum(counts)}")

    def build_model(self, clip: ClipModel) -> GlocalCLIPModel:
        s = self.settings
        return GlocalCLIPModel(clip, n_ctx=s["n_ctx"], ab_ctx=s["ab_ctx"], prompt_depth=s["prompt_depth"],
                               deep_prompt_length=s["deep_prompt_length"], feature_layers=s["feature_layers"],
                               dpam_start=s["dpam_start"], sigma=s["sigma"],
                               round_deep_prompts_to_fp16=s["round_deep_prompts_to_fp16"],
                               global_ln_post=s["global_ln_post"],
                               official_layer_aliasing=s["official_layer_aliasing"], seed=s["seed"])

    read_official_weights = staticmethod(read_official_checkpoint)
    load_official_weights = staticmethod(load_official_checkpoint)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.prompt_learner.parameters(), lr=self.settings["lr"],
                                betas=tuple(self.settings["betas"]))

    def training_step(self, batch: Any, *args, **kwargs) -> torch.Tensor:  # noqa: ANN401
        del args, kwargs
        logits, layer_probs, text = self.model.training_outputs(batch.image)
        terms = self.loss(logits, batch.gt_label, layer_probs, self.masks_for_training(batch), text)
        size = batch.image.shape[0]
        self.log("train_loss", terms["loss"], on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
        self.log("train_contrastive", terms["contrastive"], on_step=False, on_epoch=True, batch_size=size)
        return terms["loss"]
