"""Bayes-PFL as an anomalib model: ``anomalib train --model BayesPFL``.

The prompt bank, flows, RCA and mappings learn on auxiliary data (another data set's test split
with masks, see ``anomalib_zsad.data.CrossDataset``); the CLIP stays frozen and is not stored in
checkpoints. Training has the official two stages on a fixed schedule (the official code
switches, and stops, by early stopping on validation data from the *target* domain; not done
here): stage 1 (the full prompt flow loss) for ``stage1_epochs`` epochs, then stage 2 (the image
classifier ``fuse``/``class_mapping``/``image_mapping`` with the classification loss only).
"""

from __future__ import annotations

import logging
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
from anomalib_zsad.models.components.class_names import class_name_from_path
from anomalib_zsad.models.components.contract import ArgumentCheck, renamed_argument

from .checkpoint import load_official_checkpoint, read_official_checkpoint
from .optim import cosine_with_warmup, make_adam, stage1_param_groups, stage2_param_groups
from .torch_model import BayesPFLModel

logger = logging.getLogger(__name__)


class BayesPFL(ZeroShotModuleMixin, AnomalibModule):
    """Bayes-PFL: Bayesian prompt flow learning for zero-shot anomaly detection (CVPR 2025).

    Args:
        backbone: open_clip architecture of the frozen CLIP (paper: ``ViT-L-14-336``; ``zsad-tiny``
            is a small random one for tests).
        pretrained: CLIP weights: an open_clip tag (``openai``), a local checkpoint file, or None
            for random weights (tests only).
        activation: MLP activation of the CLIP: the official code uses exact ``gelu`` even with
            OpenAI's weights (trained with QuickGELU); ``auto`` follows the weights.
        image_size: input side (or [height, width]) of the default pre-processor (official 518); a
            multiple of the patch size.
        official_checkpoint: an official ``{"MyModel": ...}`` file to start from; the model is then
            ready zero-shot without training.
        class_name: the object word of the prompts (``"X <class_name>"``): ``"auto"`` reads each
            image's category from its path (``<root>/<category>/test/...``), else ``"object"``; any
            other string is used for every image.
        prompt_num: prompts in the bank (official 3).
        context_length: learnt context tokens per prompt (official 5).
        state_length: learnt state tokens per prompt (official 5).
        num_flows: planar flows of the prompt distributions (official 10).
        num_samples: Monte-Carlo prompt samples at inference (official 10).
        sample_chunk_size: samples run together (bounds memory; no effect on results).
        feature_layers: vision blocks (1-based); None = the tower's quarters (6, 12, 18, 24 of ViT-L).
        sigma: standard deviation of the Gaussian smoothing of the map, in pixels (official 8).
        score_alpha: weight of the image classifier in the image score, against the top-k mean of
            the map (official 0.5).
        topk: pixels of the map averaged into the image score (official 2000).
        stage1_epochs: epochs of stage 1 before the classifier-only stage 2 (see module docstring).
        lr_prompt: Adam learning rate of the prompt bank (official 1e-3).
        lr_temperature: Adam learning rate of the temperature (official 0.01).
        lr_flow: Adam learning rate of the flows (official 1e-3).
        lr_linear: Adam learning rate of the linear mappings (official 1e-4).
        betas: Adam betas (official (0.5, 0.999)).
        warmup_fraction: share of the steps with a linear warm-up of stage 1 (official 0.1).
        seed: random CLIP weights (tests), parameter init and Monte-Carlo noise.
        allow_clip_mismatch: run a checkpoint on another CLIP or image size than it was trained
            with (refused otherwise).
        checkpoint: deprecated name of ``official_checkpoint``.
        pre_processor: anomalib pre-processor; True = CLIP's resize and normalisation at ``image_size``.
        post_processor: anomalib post-processor; True = thresholds from validation, maps unnormalised.
        evaluator: anomalib evaluator; True = the papers' six metrics.
        visualizer: anomalib visualizer; True = the default one.
    """

    pos_embed_mode = "bicubic_antialias"
    paper_max_epochs = 30

    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        activation: str = "gelu",
        image_size: int | Sequence[int] = 518,
        official_checkpoint: str | os.PathLike | None = None,
        class_name: str | None = "auto",
        prompt_num: int = 3,
        context_length: int = 5,
        state_length: int = 5,
        num_flows: int = 10,
        num_samples: int = 10,
        sample_chunk_size: int = 5,
        feature_layers: Sequence[int] | None = None,
        sigma: float = 8.0,
        score_alpha: float = 0.5,
        topk: int = 2000,
        stage1_epochs: int = 20,
        lr_prompt: float = 1e-3,
        lr_temperature: float = 0.01,
        lr_flow: float = 1e-3,
        lr_linear: float = 1e-4,
        betas: Sequence[float] = (0.5, 0.999),
        warmup_fraction: float = 0.1,
        seed: int = 0,
        allow_clip_mismatch: bool = False,
        checkpoint: str | os.PathLike | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        official_checkpoint = renamed_argument("BayesPFL", "official_checkpoint", official_checkpoint,
                                               checkpoint=checkpoint)
        class_name = class_name or "auto"  # None was the old spelling of "auto"
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        # Two optimisers (one per stage) and a per-batch schedule of stage 1 only.
        self.automatic_optimization = False
        self._stage2_steps = 0
        self.init_contract(pre_processor, official_checkpoint, renamed=("checkpoint",))

    @property
    def class_name(self) -> str | None:
        """The fixed object word, or None for ``"auto"``."""
        name = self.settings["class_name"]
        return None if name == "auto" else name

    @property
    def stage1_epochs(self) -> int:
        return self.settings["stage1_epochs"]

    @property
    def lrs(self) -> dict[str, float]:
        return {name: self.settings[name] for name in ("lr_prompt", "lr_temperature", "lr_flow", "lr_linear")}

    def check_arguments(self, check: ArgumentCheck, settings: dict[str, Any], arch: Any) -> None:  # noqa: ANN401
        for name in ("prompt_num", "context_length", "state_length", "num_samples", "sample_chunk_size", "topk"):
            check.positive(name, settings[name])
        check.positive("num_flows", settings["num_flows"], zero=True)
        check.layers("feature_layers", settings["feature_layers"], arch.vision_layers if arch is not None else None)
        check.positive("sigma", settings["sigma"], zero=True)
        check.in_range("score_alpha", settings["score_alpha"], 0.0, 1.0)
        check.positive("stage1_epochs", settings["stage1_epochs"], zero=True)
        for name in ("lr_prompt", "lr_temperature", "lr_flow", "lr_linear"):
            check.positive(name, settings[name])
        check.in_range("warmup_fraction", settings["warmup_fraction"], 0.0, 1.0)

    def build_model(self, clip: ClipModel) -> BayesPFLModel:
        s = self.settings
        return BayesPFLModel(clip, class_name=self.class_name or "object", prompt_num=s["prompt_num"],
                             context_length=s["context_length"], state_length=s["state_length"],
                             num_flows=s["num_flows"], num_samples=s["num_samples"],
                             sample_chunk_size=s["sample_chunk_size"], feature_layers=s["feature_layers"],
                             sigma=s["sigma"], score_alpha=s["score_alpha"], topk=s["topk"], seed=s["seed"],
                             init_seed=s["seed"])

    read_official_weights = staticmethod(read_official_checkpoint)
    load_official_weights = staticmethod(load_official_checkpoint)

    def load_official_checkpoint(self, path: str | os.PathLike) -> None:
        """Load an official checkpoint (stage-2 inference, as ``test.py``); ready zero-shot."""
        load_official_checkpoint(self.model, path)
        self.learnt_parts_trained.fill_(True)

    # ------------------------------------------------------------------ data
    def class_names(self, batch: Any) -> list[str] | None:  # noqa: ANN401
        """Per-image class words: the fixed ``class_name``, or each image's category."""
        if self.class_name is not None:
            return None  # the model's default tokens
        paths = getattr(batch, "image_path", None)
        if not paths:
            return None
        names = [class_name_from_path(str(p), self.model.class_name) for p in paths]
        return names if any(n != self.model.class_name for n in names) else None

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> tuple[list, list]:
        betas = tuple(self.settings["betas"])
        stage1 = make_adam(stage1_param_groups(self.model, **self.lrs), betas)
        stage2 = make_adam(stage2_param_groups(self.model, self.lrs["lr_linear"]), betas)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        scheduler = cosine_with_warmup(stage1, total, self.settings["warmup_fraction"])
        return [stage1, stage2], [{"scheduler": scheduler, "interval": "step"}]

    def current_stage(self) -> int:
        return 1 if self.current_epoch < self.stage1_epochs else 2

    def training_step(self, batch: Any, *args, **kwargs) -> torch.Tensor:  # noqa: ANN401
        del args, kwargs
        stage = self.current_stage()
        out = self.model.training_outputs(batch.image, batch.gt_label, self.masks_for_training(batch),
                                          self.class_names(batch), stage=stage)
        optimizers = self.optimizers()
        optimizer = optimizers[stage - 1] if isinstance(optimizers, list) else optimizers
        self.model.zero_grad(set_to_none=True)  # also the stage-1 parameters in stage 2 (not stepped)
        self.manual_backward(out["loss"])
        optimizer.step()
        if stage == 1:
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        else:
            self._stage2_steps += 1
            self.model.inference_stage = 2  # checkpoints written from now on run the trained classifier
        size = batch.image.shape[0]
        self.log("train_loss", out["loss"].detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
        self.log("train_loss_class", out["loss_class"].detach(), on_step=False, on_epoch=True, batch_size=size)
        return out["loss"].detach()

    def on_train_start(self) -> None:
        self._stage2_steps = 0
        # Until stage 2 has trained fuse/image_mapping, score images with the stage-1 classifier
        # (also in checkpoints written during stage 1).
        self.model.inference_stage = 1
        # Distinct training draws per process (DDP), repeatable per seed.
        self.model.train_generator.manual_seed(self.model.seed + 1 + 1000 * self.global_rank)

    def on_train_end(self) -> None:
        """The official test runs the stage-2 classifier; if stage 2 never ran (fewer epochs than
        ``stage1_epochs``), its untrained mapping would spoil the image scores: use stage 1."""
        if not self._stage2_steps:
            logger.warning("Bayes-PFL: training ended before stage 2 (stage1_epochs=%d): image scores use the "
                           "stage-1 classifier (the global CLIP embedding).", self.stage1_epochs)
            self.model.inference_stage = 1

    # ------------------------------------------------------------------ evaluation
    def inference_class_names(self, batch: Any) -> list[str] | None:  # noqa: ANN401
        return self.class_names(batch)
