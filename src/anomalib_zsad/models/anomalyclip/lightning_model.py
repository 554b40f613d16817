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

from anomalib_zsad.clip import DPAM_ATTENTIONS, ClipModel
from anomalib_zsad.models.clip_baseline.lightning_model import prompt_class_names
from anomalib_zsad.models.components import ZeroShotModuleMixin
from anomalib_zsad.models.components.class_names import evaluated_category
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
        dpam: attention of the DPAM path (Fig. 6, Table 10): ``vv`` (the paper's), ``qq``, ``kk``, or
            ``none``: no DPAM, CLIP's own attention (Table 7 without T1).
        object_aware: each image's class name in the learnt prompts, ``[V1..VE][cls]`` and
            ``[W1..WE][damaged][cls]`` (the paper's object-aware prompts, Fig. 5; Table 7 without T2),
            read from the image paths (MVTec AD / VisA layout) in training, and at test from the
            paths or the evaluated category; False (the paper's) = the object-agnostic word "object".
        shared_context: one learnt context for both prompts (Table 9 "shared"); False = the paper's two.
        abnormality_word: the word before the object in the anomalous prompt (paper ``damaged``;
            Tables 13-14 also try ``anomalous``, ``flawed``, ``defective``, ``blemished``).
        global_loss: train with the image cross-entropy (Table 5 "global").
        local_loss: train with the segmentation terms (Table 5 "local"); False switches focal and Dice off.
        focal_loss: the focal term of the local loss (Table 11).
        dice_loss: the two Dice terms of the local loss (Table 11).
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
        dpam: str = "vv",
        object_aware: bool = False,
        shared_context: bool = False,
        abnormality_word: str = "damaged",
        global_loss: bool = True,
        local_loss: bool = True,
        focal_loss: bool = True,
        dice_loss: bool = True,
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
        self.loss = self._make_loss()

    def _make_loss(self) -> AnomalyCLIPLoss:
        s = self.settings
        local = s["local_loss"]
        return AnomalyCLIPLoss(s["lam"], global_loss=s["global_loss"], focal_loss=local and s["focal_loss"],
                               dice_loss=local and s["dice_loss"])

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
        check.require(settings["dpam"] in DPAM_ATTENTIONS,
                      f"dpam must be one of {list(DPAM_ATTENTIONS)}, got {settings['dpam']!r}")
        check.require(isinstance(settings["abnormality_word"], str) and settings["abnormality_word"].strip(),
                      f"abnormality_word must be a word, got {settings['abnormality_word']!r}")
        local = settings["local_loss"] and (settings["focal_loss"] or settings["dice_loss"])
        check.require(settings["global_loss"] or local,
                      "at least one loss term must be on (global_loss, or local_loss with focal_loss or dice_loss)")
        if arch is not None:
            check.require(settings["prompt_depth"] <= arch.text_layers,
                          f"prompt_depth must be at most the text depth {arch.text_layers}, "
                          f"got {settings['prompt_depth']}")

    def build_model(self, clip: ClipModel) -> AnomalyCLIPModel:
        s = self.settings
        self.loss = self._make_loss()  # settings adopted from a checkpoint reach the loss too
        return AnomalyCLIPModel(clip, n_ctx=s["n_ctx"], prompt_depth=s["prompt_depth"],
                                deep_prompt_length=s["deep_prompt_length"], feature_layers=s["feature_layers"],
                                dpam_start=s["dpam_start"], sigma=s["sigma"],
                                round_deep_prompts_to_fp16=s["round_deep_prompts_to_fp16"],
                                global_ln_post=s["global_ln_post"], seed=s["seed"], dpam=s["dpam"],
                                object_aware=s["object_aware"], shared_context=s["shared_context"],
                                abnormality_word=s["abnormality_word"])

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
        masks = self.masks_for_training(batch) if self.loss.local_loss else None
        logits, layer_probs = self.model.training_outputs(batch.image, self._class_names(batch),
                                                          with_maps=masks is not None)
        terms = self.loss(logits, batch.gt_label, layer_probs, masks)
        self.log("train_loss", terms["loss"], on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=batch.image.shape[0])
        return terms["loss"]

    def _class_names(self, batch: Any, default: str = "object") -> list[str] | None:  # noqa: ANN401
        """Each image's class name for object-aware prompts (from its path), else None."""
        if not self.settings["object_aware"]:
            return None
        return prompt_class_names(getattr(batch, "image_path", None), "auto", default)

    def inference_class_names(self, batch: Any) -> list[str] | None:  # noqa: ANN401
        if not self.settings["object_aware"]:
            return None
        return self._class_names(batch, evaluated_category(self) or "object")
