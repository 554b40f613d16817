"""BGAD's ``nn.Module``: a frozen CNN, one conditional normalizing flow per feature level.

Built from anomalib's CFlow pieces (``anomalib.models.image.cflow.utils``): ``cflow_head`` (FrEIA's
``SequenceINN`` of anomalib's ``AllInOneBlock``, the same blocks as the official
``conditional_flow_model``: ``subnet_fc``, affine clamping, SOFTPLUS global affine, soft
permutations), ``positional_encoding_2d`` (the official ``positionalencoding2d``) and ``get_logp``.

Inference (the flow's inverse is never needed): per level, the per-dimension log-likelihood of
every feature vector, ``exp(logp - m)``, bilinearly upsampled (``align_corners=True``) to the
image size, summed over levels; the anomaly map is ``levels - sum`` and the image score its
maximum. The official code takes ``m`` as the maximum ``logp`` of the level over the whole test
set (and the map's own maximum instead of ``levels``); a per-image model cannot see the test set,
so ``m`` is a buffer: the largest normal ``logp`` of the last training epoch
(``score_normalization="train"``), or the batch's maximum (``"batch"``, the official rule when the
batch is the whole test set).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from anomalib.models.components import TimmFeatureExtractor
from anomalib.models.image.cflow.utils import cflow_head, get_logp, positional_encoding_2d
from torch import nn

SCORE_NORMALIZATIONS = ("train", "batch")


def feature_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Binary masks [B, H, W] at a feature level's resolution, flattened as the feature vectors
    (row (b, y, x)): nearest-neighbour sampling, as the code's ``F.interpolate(mask, (h, w))``."""
    return F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest").reshape(-1)


class BGADModel(nn.Module):
    """Frozen feature extractor + one conditional flow per level.

    Args:
        backbone: the frozen ``TimmFeatureExtractor`` (its ``out_dims`` size the flows).
        pos_embed_dim: dimension of the 2D sin/cos positional condition (a multiple of 4).
        coupling_layers: coupling blocks per flow.
        clamp_alpha: affine clamping of the coupling blocks.
        permute_soft: random orthogonal (True, official) or hard permutations between blocks.
        score_normalization: ``"train"`` or ``"batch"`` (see the module docstring).
    """

    def __init__(self, backbone: TimmFeatureExtractor, pos_embed_dim: int = 128, coupling_layers: int = 8,
                 clamp_alpha: float = 1.9, permute_soft: bool = True, score_normalization: str = "train") -> None:
        super().__init__()
        self.backbone = backbone
        self.layers = list(backbone.layers)
        self.pos_embed_dim = pos_embed_dim
        self.score_normalization = score_normalization
        self.flows = nn.ModuleList([
            cflow_head(condition_vector=pos_embed_dim, coupling_blocks=coupling_layers, clamp_alpha=clamp_alpha,
                       n_features=dim, permute_soft=permute_soft)
            for dim in backbone.out_dims])
        # per level: the reference log-likelihood m of the map (largest normal logp seen in training)
        self.register_buffer("logp_reference", torch.zeros(len(self.layers)))

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone's feature maps [B, C, h, w], one per level."""
        self.backbone.eval()
        with torch.no_grad():
            features = self.backbone(images)
        return [features[layer].detach() for layer in self.layers]

    def condition(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature vectors [B*h*w, C] and their positional conditions [B*h*w, P], row (b, y, x)."""
        batch, channels, height, width = feature.shape
        position = positional_encoding_2d(self.pos_embed_dim, height, width).to(feature)
        position = position.permute(1, 2, 0).reshape(1, height * width, self.pos_embed_dim)
        position = position.expand(batch, -1, -1).reshape(-1, self.pos_embed_dim)
        vectors = feature.permute(0, 2, 3, 1).reshape(-1, channels)
        return vectors, position

    def log_likelihood(self, level: int, vectors: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Per-dimension log-likelihood ``log p(x) / C`` of feature vectors [N, C] at ``level``."""
        z, log_jac_det = self.flows[level](vectors, [position])
        return get_logp(vectors.shape[1], z, log_jac_det) / vectors.shape[1]

    def level_log_likelihoods(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-dimension log-likelihood maps [B, h, w], one per level."""
        maps = []
        for level, feature in enumerate(self.features(images)):
            vectors, position = self.condition(feature)
            batch, _, height, width = feature.shape
            maps.append(self.log_likelihood(level, vectors, position).reshape(batch, height, width))
        return maps

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """``pred_score`` [B] and ``anomaly_map`` [B, H, W] at the input size."""
        normality = torch.zeros(images.shape[0], 1, *images.shape[-2:], dtype=images.dtype, device=images.device)
        logps = self.level_log_likelihoods(images)
        for level, logp in enumerate(logps):
            reference = logp.amax() if self.score_normalization == "batch" else self.logp_reference[level]
            probability = torch.exp(logp - reference).unsqueeze(1)
            normality = normality + F.interpolate(probability, size=images.shape[-2:], mode="bilinear",
                                                  align_corners=True)
        top = normality.amax() if self.score_normalization == "batch" else float(len(logps))
        anomaly_map = (top - normality).squeeze(1)
        return InferenceBatch(pred_score=anomaly_map.amax(dim=(-2, -1)), anomaly_map=anomaly_map)

    def flow_parameters(self) -> Sequence[nn.Parameter]:
        """What training changes: the flows' trainable parameters."""
        return [p for p in self.flows.parameters() if p.requires_grad]
