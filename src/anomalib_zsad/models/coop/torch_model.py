"""CoOp (Zhou et al., IJCV 2022) as AnomalyCLIP's baseline (Zhou et al., ICLR 2024, Appendix A.2), as a
plain ``nn.Module``: image -> (score, anomaly map), with learnt context vectors in the prompts.

Data flow:
* text: per class name, ``[V1]..[VM] normal [cls].`` and ``[V1]..[VM] anomalous [cls].`` through
  the frozen CLIP text tower -> [2, E] (normal, anomalous), normalised;
* image, score and map "in the same way as for AnomalyCLIP" (Appendix A.2): patch tokens of the
  quarter blocks (6, 12, 18, 24 of ViT-L) through ``ln_post`` and ``proj``, softmax of the cosine
  similarities over temperature 0.07, the anomalous probability summed over the layers, upsampled,
  Gaussian sigma 4; the score from CLIP's image embedding (``ln_post(cls) @ proj``, as CoOp).
  The vision tower keeps CLIP's attention (no DPAM, which is AnomalyCLIP's own).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_zsad.clip import ClipModel, quarter_blocks
from anomalib_zsad.models.clip_baseline import PromptScoringModel

from .prompt_learner import CoOpPromptLearner


class CoOpModel(PromptScoringModel):
    """CoOp's learnt prompts around a frozen :class:`ClipModel`; only the contexts are trainable.

    Args:
        clip: the CLIP (frozen here).
        n_ctx: learnt context tokens (CoOp's M = 16).
        shared_context: one context for both prompts (the paper's ``[V1]..[VN]`` in both), else one per state.
        class_name: the class name of the prompts when none is given per image (and in an export).
        feature_layers: 1-based vision blocks whose patch tokens make the map; None = the quarters.
        dpam_start: first vision block with V-V attention (DPAM); None = plain CLIP (the paper's baseline).
        temperature: softmax temperature (AnomalyCLIP's 0.07).
        sigma: Gaussian smoothing of the map, in pixels (0 = off).
        seed: initial values of the contexts.
    """

    def __init__(self, clip: ClipModel, n_ctx: int = 16, shared_context: bool = True, class_name: str = "object",
                 feature_layers: Sequence[int] | None = None, dpam_start: int | None = None,
                 temperature: float = 0.07, sigma: float = 4.0, seed: int = 0) -> None:
        learner = CoOpPromptLearner(clip.text, n_ctx=n_ctx, shared_context=shared_context, class_name=class_name,
                                    seed=seed)
        super().__init__(clip, class_name=class_name, feature_layers=feature_layers, dpam_start=dpam_start,
                         temperature=temperature, sigma=sigma, depends_on=learner.parameters)
        self.prompt_learner = learner

    @staticmethod
    def default_layers(depth: int) -> list[int]:
        return quarter_blocks(depth)

    def text_features(self, class_name: str) -> torch.Tensor:
        """Normalised [2, E] text features of ``class_name`` (row 0 normal, row 1 anomalous), with autograd."""
        embeddings, eot = self.prompt_learner.prompt_embeddings_for(self.clip.text, class_name)
        return F.normalize(self.clip.text(embeddings, eot).float(), dim=-1)

    def _text_features_of(self, class_name: str) -> torch.Tensor:
        return self.text_features(class_name)

    def batch_text_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """[B, 2, E] with autograd, each distinct class name encoded once."""
        distinct = list(dict.fromkeys(class_names))
        features = dict(zip(distinct, (self.text_features(name) for name in distinct), strict=True))
        return torch.stack([features[name] for name in class_names])

    def training_outputs(self, images: torch.Tensor, class_names: Sequence[str] | None = None,
                         with_maps: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (image logits [B, 2], per-layer patch probabilities upsampled to [B, 2, H, W], or []
        without ``with_maps``: the image loss alone needs no maps).

        Only the contexts get gradients: the image side runs without autograd.
        """
        names = list(class_names) if class_names is not None else [self.class_name] * images.shape[0]
        text = self.batch_text_features(names)
        with torch.no_grad():
            global_feature, patches = self.encode_image(images)
        if not with_maps:
            return self.logits(global_feature, text), []
        probs = self.layer_probabilities(patches, text, self.clip.visual.grid_size(images))
        upsampled = [F.interpolate(p, size=images.shape[-2:], mode="bilinear", align_corners=False) for p in probs]
        return self.logits(global_feature, text), upsampled

    def learnable_parameters(self) -> list[nn.Parameter]:
        return list(self.prompt_learner.parameters())
