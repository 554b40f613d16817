"""BGAD as an anomalib model: ``anomalib train --model BGAD --data <few-anomaly datamodule>``.

Training follows the authors' ``engines/bgad_fas_train_engine.py``: ``meta_epochs`` meta epochs of
``sub_epochs`` passes over the data (one Lightning epoch is one pass: ``max_epochs`` defaults to
``meta_epochs * sub_epochs``). In every batch and at every feature level the feature vectors are
shuffled and cut into chunks of ``flow_batch_size``; each chunk is one Adam step (manual
optimisation, as anomalib's CFlow). The first meta epoch fits the flows on normal images only;
afterwards each chunk with anomalous features adds the boundary-guided semi-push-pull loss
(:mod:`.loss`). The learning rate follows the code's cosine schedule with warm-up per batch.

Data: normal training images plus a few anomalous images with masks
(:class:`anomalib_zsad.data.few_anomalies.FewAnomalies`); with none (k = 0) BGAD trains as the
authors' normal-only engine (BGAD w/o), see ``with_fas``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from torch import nn
from torchvision.transforms.v2 import InterpolationMode

from anomalib_zsad.models.components import PluginModuleMixin, imagenet_pre_processor
from anomalib_zsad.models.components.contract import ArgumentCheck

from .backbone import is_random_weights, load_feature_extractor
from .checkpoint import load_official_checkpoint, read_official_checkpoint
from .loss import BGADLoss, learning_rate
from .torch_model import SCORE_NORMALIZATIONS, BGADModel, feature_mask

logger = logging.getLogger(__name__)

MIN_IMAGE_SIZE = 32


class BGAD(PluginModuleMixin, AnomalibModule):
    """BGAD: explicit boundary guided semi-push-pull contrastive learning (Yao et al., CVPR 2023).

    Defaults are the authors' code's (``config.py`` and the run command of its README, which passes
    ``--focal_weighting --pos_beta 0.01 --margin_tau 0.1 --num_anomalies 10``).

    Args:
        backbone: timm name of the frozen CNN (official ``tf_efficientnet_b6``; which weights timm
            gives for that name depends on its version, see README).
        layers: feature levels: timm out-indices (official 1, 2, 3) or module names.
        pretrained: True: timm's ImageNet weights (a clear error offline); a path: a weights file;
            False: random weights seeded by ``seed`` (tests only).
        image_size: input side or [height, width] of the default pre-processor (official 256).
        official_checkpoint: a file written by the authors' ``save_weights`` (flows per level).
        pos_embed_dim: dimension of the positional condition of the flows (official 128).
        coupling_layers: coupling blocks per flow (official 8).
        clamp_alpha: affine clamping of the coupling blocks (official 1.9).
        permute_soft: random orthogonal permutations between blocks (official True).
        pos_beta: beta, the normal log-likelihood percentile that sets the boundary b_n (official
            run 0.01; ``config.py`` default 0.05).
        margin_tau: tau, the margin b_n - b_a, in ``logp / normalizer`` units (official 0.1).
        normalizer: divides the log-likelihoods in the boundary and the semi-push-pull loss (official 10).
        bgspp_lambda: weight of the semi-push-pull loss (official 1).
        focal_weighting: asymmetric focal weighting of both losses (official run: on).
        normal_focal: (gamma, alpha) of the normal focal weights (official 0.5, 11.7).
        abnormal_focal: (gamma, alpha) of the anomalous focal weights (official 2, 0.53).
        with_fas: train "with few abnormal samples" (push anomalies beyond b_a) or as BGAD w/o
            (pull normals inside b_n only); None: with, unless the training data holds no anomalous image.
        ml_loss: maximum-likelihood term: ``logsigmoid`` (the code: -logsigmoid(logp)) or ``nll``
            (the paper: -log p).
        reduction: ``mean`` (the code) or ``sum`` (the paper's sums) of every loss term.
        lr: Adam learning rate (official 2e-4).
        lr_cosine: cosine decay over the meta epochs to ``lr * lr_decay_rate**3`` (official True);
            else steps of ``lr_decay_rate`` at ``lr_decay_epochs``.
        lr_decay_rate: decay factor (official 0.1).
        lr_decay_epochs: step decay points in percent of the meta epochs (official 50, 75, 90).
        lr_warm: linear warm-up from lr / 10 per batch (official True).
        lr_warm_epochs: meta epochs of warm-up (official 2).
        meta_epochs: meta epochs (official 25): the learning-rate schedule's unit.
        sub_epochs: passes over the data per meta epoch (official 8).
        flow_batch_size: feature vectors per optimisation step (official 4096).
        score_normalization: reference of the map's likelihoods: ``train`` (largest normal one of the
            last training epoch, per image, exportable) or ``batch`` (the batch's largest, the official
            rule when the batch is the whole test set).
        seed: initial values of the flows (and of a random backbone).
        allow_backbone_mismatch: run a checkpoint on another backbone or image size than it was trained with.
        pre_processor: anomalib pre-processor; True = resize to ``image_size`` and ImageNet normalisation.
        post_processor: anomalib post-processor; True = thresholds from validation, maps unnormalised.
        evaluator: anomalib evaluator; True = the papers' six metrics.
        visualizer: anomalib visualizer; True = the default one.
    """

    untrained_scores = "randomly initialised normalizing flows"
    learns_from_anomalies = True

    def __init__(
        self,
        backbone: str = "tf_efficientnet_b6",
        layers: Sequence[int | str] = (1, 2, 3),
        pretrained: bool | str | None = True,
        image_size: int | Sequence[int] = 256,
        official_checkpoint: str | os.PathLike | None = None,
        pos_embed_dim: int = 128,
        coupling_layers: int = 8,
        clamp_alpha: float = 1.9,
        permute_soft: bool = True,
        pos_beta: float = 0.01,
        margin_tau: float = 0.1,
        normalizer: float = 10.0,
        bgspp_lambda: float = 1.0,
        focal_weighting: bool = True,
        normal_focal: Sequence[float] = (0.5, 11.7),
        abnormal_focal: Sequence[float] = (2.0, 0.53),
        with_fas: bool | None = None,
        ml_loss: str = "logsigmoid",
        reduction: str = "mean",
        lr: float = 2e-4,
        lr_cosine: bool = True,
        lr_decay_rate: float = 0.1,
        lr_decay_epochs: Sequence[int] = (50, 75, 90),
        lr_warm: bool = True,
        lr_warm_epochs: int = 2,
        meta_epochs: int = 25,
        sub_epochs: int = 8,
        flow_batch_size: int = 4096,
        score_normalization: str = "train",
        seed: int = 0,
        allow_backbone_mismatch: bool = False,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        self.automatic_optimization = False  # several flow steps per batch, as the code (and anomalib's CFlow)
        self._with_fas: bool | None = None
        self._epoch_reference: list[float] = []
        self._warned_small = False
        self.init_contract(pre_processor, official_checkpoint)
        s = self.settings
        self.loss = BGADLoss(pos_beta=s["pos_beta"], margin_tau=s["margin_tau"], normalizer=s["normalizer"],
                             bgspp_lambda=s["bgspp_lambda"], focal_weighting=s["focal_weighting"],
                             normal_focal=s["normal_focal"], abnormal_focal=s["abnormal_focal"],
                             ml_loss=s["ml_loss"], reduction=s["reduction"])

    # --- the contract --------------------------------------------------------------------------

    @classmethod
    def configure_pre_processor(cls, image_size: int | Sequence[int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (official 256; antialiased bilinear, the code uses PIL's
        antialiasing filter) and ImageNet normalisation, as the official data sets."""
        return imagenet_pre_processor(image_size or 256, InterpolationMode.BILINEAR)

    def check_backbone(self, check: ArgumentCheck, settings: dict[str, Any]) -> Any:  # noqa: ANN401
        """A timm model name and an image size of at least 32 px (strides are known once it is built)."""
        import timm

        name = settings.get("backbone")
        check.require(isinstance(name, str) and bool(name) and timm.is_model(name.split(".")[0]),
                      f"backbone must be a timm model name, got {name!r}")
        check.image_size(settings.get("image_size"), None)
        size = settings.get("image_size")
        sides = [size] * 2 if isinstance(size, int) else list(size or [])
        check.require(not sides or not all(isinstance(v, int) for v in sides) or min(sides) >= MIN_IMAGE_SIZE,
                      f"image_size must be at least {MIN_IMAGE_SIZE} px for a CNN backbone, got {size!r}")
        return None

    def check_arguments(self, check: ArgumentCheck, settings: dict[str, Any], arch: Any) -> None:  # noqa: ANN401
        layers = list(settings["layers"] or [])
        check.require(bool(layers) and all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in layers),
                      f"layers must name at least one feature level (out-indices or module names), got {layers!r}")
        dim = settings["pos_embed_dim"]
        check.require(isinstance(dim, int) and dim > 0 and dim % 4 == 0,
                      f"pos_embed_dim must be a positive multiple of 4, got {dim!r}")
        for name in ("coupling_layers", "meta_epochs", "sub_epochs", "flow_batch_size", "clamp_alpha", "normalizer",
                     "lr", "lr_decay_rate"):
            check.positive(name, settings[name])
        check.positive("margin_tau", settings["margin_tau"], zero=True)
        check.positive("bgspp_lambda", settings["bgspp_lambda"], zero=True)
        check.positive("lr_warm_epochs", settings["lr_warm_epochs"], zero=True)
        check.require(isinstance(settings["pos_beta"], (int, float)) and 0 <= settings["pos_beta"] < 1,
                      f"pos_beta must be in [0, 1), got {settings['pos_beta']!r}")
        check.choice("ml_loss", settings["ml_loss"], ("logsigmoid", "nll"))
        check.choice("reduction", settings["reduction"], ("mean", "sum"))
        check.choice("score_normalization", settings["score_normalization"], SCORE_NORMALIZATIONS)
        check.choice("with_fas", settings["with_fas"], (None, True, False))
        for name in ("normal_focal", "abnormal_focal"):
            value = list(settings[name] or [])
            check.require(len(value) == 2 and all(isinstance(v, (int, float)) for v in value),
                          f"{name} must be (gamma, alpha), got {settings[name]!r}")
        if arch is not None:  # built: the strides are known
            stride = max(arch)
            size = settings["image_size"]
            sides = [size] * 2 if isinstance(size, int) else list(size)
            if any(side % stride for side in sides):
                import warnings

                warnings.warn(f"BGAD: image_size {size} is not a multiple of the patch size of its coarsest level "
                              f"(stride {stride}): the last pixels of each side fall outside the feature grid. Use a "
                              "multiple of it.", stacklevel=5)

    def load_backbone(self, settings: dict[str, Any]) -> Any:  # noqa: ANN401
        return load_feature_extractor(settings["backbone"], settings["layers"], settings["pretrained"],
                                      seed=settings["seed"])

    def backbone_shape(self, backbone: Any) -> Any:  # noqa: ANN401
        return list(backbone.reductions)

    def backbone_identity(self, settings: dict[str, Any]) -> dict[str, Any]:
        identity = super().backbone_identity(settings)
        identity["layers"] = list(settings["layers"])
        if is_random_weights(settings.get("pretrained")):
            identity.update(pretrained=None, weights_sha256=None, seed=settings.get("seed"))
        return identity

    def build_model(self, backbone: Any) -> BGADModel:  # noqa: ANN401
        s = self.settings
        # The flows start as FrEIA initialises them, from ``seed`` (the soft permutations come from
        # numpy's generator, the rest from torch's): two models built alike are the same model.
        state = np.random.get_state()  # noqa: NPY002  (FrEIA's soft permutations draw from numpy's global generator)
        try:
            np.random.seed(s["seed"])  # noqa: NPY002
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s["seed"])
                return BGADModel(backbone, pos_embed_dim=s["pos_embed_dim"], coupling_layers=s["coupling_layers"],
                                 clamp_alpha=s["clamp_alpha"], permute_soft=s["permute_soft"],
                                 score_normalization=s["score_normalization"])
        finally:
            np.random.set_state(state)  # noqa: NPY002

    read_official_weights = staticmethod(read_official_checkpoint)
    load_official_weights = staticmethod(load_official_checkpoint)

    def default_max_epochs(self) -> int:
        """``meta_epochs * sub_epochs`` passes over the data (official 25 x 8)."""
        return int(self.settings["meta_epochs"]) * int(self.settings["sub_epochs"])

    # --- training -------------------------------------------------------------------------------

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.flow_parameters(), lr=self.settings["lr"])

    def on_train_start(self) -> None:
        """Decide the engine: with few abnormal samples, or normal-only (BGAD w/o)."""
        given = self.settings["with_fas"]
        if given is not None:
            self._with_fas = bool(given)
            return
        train = getattr(getattr(self.trainer, "datamodule", None), "train_data", None)
        samples = getattr(train, "samples", None)
        has_anomalies = samples is None or bool((samples["label_index"] == 1).any())
        self._with_fas = has_anomalies
        if not has_anomalies:
            logger.info("BGAD: no anomalous training image: training as BGAD w/o (normal images, pull term only)")

    def on_train_epoch_start(self) -> None:
        self._epoch_reference = [-math.inf] * len(self.model.flows)

    def on_train_epoch_end(self) -> None:
        """The map's reference likelihoods: the largest normal ones seen in this epoch (by any
        process under DDP, so that every process scores maps alike)."""
        seen = torch.tensor(self._epoch_reference, dtype=self.model.logp_reference.dtype)
        seen = self.trainer.strategy.reduce(seen.to(self.device), reduce_op="max").cpu()
        if torch.isfinite(seen).all():
            self.model.logp_reference.copy_(seen.to(self.model.logp_reference.device))

    def _learning_rate(self, batch_idx: int) -> float:
        s = self.settings
        meta_epoch, sub_epoch = divmod(self.current_epoch, s["sub_epochs"])
        batches = self.trainer.num_training_batches
        batches = int(batches) if isinstance(batches, int) or math.isfinite(batches) else batch_idx + 1
        return learning_rate(s["lr"], meta_epoch, s["meta_epochs"], sub_epoch * batches + batch_idx,
                             max(batches, 1) * s["sub_epochs"], cosine=s["lr_cosine"], decay_rate=s["lr_decay_rate"],
                             decay_epochs=s["lr_decay_epochs"], warm=s["lr_warm"], warm_epochs=s["lr_warm_epochs"])

    def _chunks(self, count: int, device: torch.device) -> list[torch.Tensor]:
        """Shuffled chunks of ``flow_batch_size`` rows, the last partial one dropped (as the code);
        fewer rows than one chunk make one chunk of them all (the code would train nothing)."""
        size = self.settings["flow_batch_size"]
        order = torch.randperm(count).to(device)
        if count < size:
            if not self._warned_small:
                logger.warning("BGAD: %d feature vectors in a batch level, fewer than flow_batch_size=%d: training "
                               "on all of them in one step", count, size)
                self._warned_small = True
            return [order]
        return [order[i * size:(i + 1) * size] for i in range(count // size)]

    def training_step(self, batch: Any, batch_idx: int, *args, **kwargs) -> torch.Tensor | None:  # noqa: ANN401
        del args, kwargs
        optimizer = self.optimizers()
        for group in optimizer.param_groups:
            group["lr"] = self._learning_rate(batch_idx)
        boundary = self.current_epoch >= self.settings["sub_epochs"]  # after the first meta epoch
        images = batch.image
        mask = self.masks_for_training(batch)
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], device=images.device)
        if not boundary:  # the first meta epoch sees normal images only (the code's normal loader)
            labels = getattr(batch, "gt_label", None)
            normal = (labels == 0) if labels is not None else mask.flatten(1).amax(1) == 0
            if self.trainer.world_size > 1:
                # every process must take as many steps (DDP): keep the images, leave the anomalous
                # ones out of the loss (their rows count as anomalous, the loss is on normal rows)
                mask = (~normal).to(mask.dtype)[:, None, None].expand_as(mask)
            else:
                images, mask = images[normal], mask[normal]
                if images.shape[0] == 0:
                    return None
        if self._with_fas is None:
            self.on_train_start()
        if len(self._epoch_reference) != len(self.model.flows):
            self.on_train_epoch_start()
        totals, parts = [], {"ml": [], "pull": [], "push": []}
        for level, feature in enumerate(self.model.features(images)):
            vectors, position = self.model.condition(feature)
            level_mask = feature_mask(mask, feature.shape[-2:])
            for chunk in self._chunks(vectors.shape[0], vectors.device):
                logps = self.model.log_likelihood(level, vectors[chunk], position[chunk])
                out = self.loss(logps, level_mask[chunk], boundary=boundary, with_anomalies=self._with_fas)
                optimizer.zero_grad()
                self.manual_backward(out.total)
                optimizer.step()
                normal_logps = logps.detach()[level_mask[chunk] == 0]
                if normal_logps.numel():
                    self._epoch_reference[level] = max(self._epoch_reference[level], float(normal_logps.max()))
                totals.append(out.total.detach())
                for name in parts:
                    parts[name].append(getattr(out, name).detach())
        if not totals:
            return None
        size = images.shape[0]
        loss = torch.stack(totals).mean()
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
        for name, values in parts.items():
            self.log(f"train_{name}", torch.stack(values).mean(), on_step=False, on_epoch=True, batch_size=size)
        return loss
