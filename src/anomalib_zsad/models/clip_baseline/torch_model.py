"""CLIP and CLIP-AC, the zero-shot baselines of AnomalyCLIP (Zhou et al., ICLR 2024, Appendix A.2),
as a plain ``nn.Module``: image -> (score, anomaly map). Nothing is learnt.

Data flow:
* text: per class name, two text features (normal, anomalous): CLIP's two plain prompts, or CLIP-AC's
  ensemble (each class in every one of CLIP's 80 ImageNet templates; mean of the normalised sentence
  embeddings, normalised again);
* image: CLIP's image embedding (class token, ``ln_post``, ``proj``), and the patch tokens of
  ``feature_layers`` (default: the last block, CLIP's "local visual embeddings") through the same
  ``ln_post`` and ``proj``;
* score: the paper's Eq. 1, ``softmax(cos(image, text) / tau)[anomalous]`` with CLIP's own
  temperature (``1 / exp(logit_scale)``, 1/100 for OpenAI's weights);
* map: the same softmax for every patch ("we extend the above computation to local visual
  embedding"), the anomalous probability summed over ``feature_layers``, upsampled bilinearly to
  the input size, smoothed by a Gaussian (sigma 4, the paper's test-time filter).

:class:`PromptScoringModel` holds the image side and the scoring; the CoOp baseline uses it with
learnt prompts (``anomalib_zsad.models.coop``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_zsad.clip import ClipModel
from anomalib_zsad.clip.prompts import (
    CLIP_AC_ANOMALOUS_STATES,
    CLIP_AC_NORMAL_STATES,
    CLIP_ANOMALOUS_PROMPT,
    CLIP_IMAGENET_TEMPLATES,
    CLIP_NORMAL_PROMPT,
    ensemble_feature,
    ensemble_sentences,
)
from anomalib_zsad.models.components import GaussianBlur
from anomalib_zsad.models.components.text_cache import TextFeatureCache

PROMPT_SETS = ("clip", "clip_ac")
MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learnt scale here


def prompt_sentences(prompts: str, class_name: str) -> tuple[list[str], list[str]]:
    """(normal sentences, anomalous sentences) of a prompt set for ``class_name``."""
    if prompts == "clip":
        return [CLIP_NORMAL_PROMPT.format(class_name)], [CLIP_ANOMALOUS_PROMPT.format(class_name)]
    if prompts == "clip_ac":
        return (ensemble_sentences(class_name, CLIP_AC_NORMAL_STATES, CLIP_IMAGENET_TEMPLATES),
                ensemble_sentences(class_name, CLIP_AC_ANOMALOUS_STATES, CLIP_IMAGENET_TEMPLATES))
    msg = f"prompts must be one of {list(PROMPT_SETS)}, got {prompts!r}"
    raise ValueError(msg)


def clip_temperature(clip: ClipModel) -> float:
    """CLIP's own softmax temperature, ``1 / exp(logit_scale)`` with the scale clamped at 100 as CLIP does."""
    return 1.0 / float(clip.logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE))


class PromptScoringModel(nn.Module):
    """A frozen CLIP that scores images and patches against two text features per class name.

    Subclasses give the text side (:meth:`_text_features_of`); this class caches it per class
    name (:class:`TextFeatureCache`), freezes it for export, and computes scores and maps.

    Args:
        clip: the CLIP (frozen here).
        class_name: the class name of the prompts when none is given per image (and in an export).
        feature_layers: 1-based vision blocks whose patch tokens make the map; None = ``default_layers``.
        dpam_start: first vision block with AnomalyCLIP's V-V attention (DPAM); None = plain CLIP.
        temperature: softmax temperature; None = CLIP's own (``1 / exp(logit_scale)``).
        sigma: Gaussian smoothing of the map, in pixels (0 = off).
        global_ln_post: apply ``ln_post`` to the class token (CLIP's image embedding does).
        depends_on: the learnt parameters the text features depend on (none for fixed prompts).
    """

    def __init__(self, clip: ClipModel, class_name: str = "object", feature_layers: Sequence[int] | None = None,
                 dpam_start: int | None = None, temperature: float | None = None, sigma: float = 4.0,
                 global_ln_post: bool = True, depends_on: object = tuple) -> None:
        super().__init__()
        self.clip = clip.requires_grad_(False)
        depth = len(clip.visual.blocks)
        self.feature_layers = list(feature_layers) if feature_layers else self.default_layers(depth)
        self.dpam_start = dpam_start
        self.temperature = clip_temperature(clip) if temperature is None else float(temperature)
        self.global_ln_post = global_ln_post
        self.class_name = class_name
        self.blur = GaussianBlur(sigma)
        self.text_cache = TextFeatureCache(self._text_features_of, depends_on)

    @staticmethod
    def default_layers(depth: int) -> list[int]:
        return [depth]

    # ------------------------------------------------------------------ text side
    def _text_features_of(self, class_name: str) -> torch.Tensor:
        """Normalised [2, E] text features of ``class_name`` (row 0 normal, row 1 anomalous)."""
        raise NotImplementedError

    def class_text_features(self, class_name: str) -> torch.Tensor:
        """[2, E] for ``class_name``, computed once per class name and state of the learnt parts."""
        return self.text_cache.get(class_name)

    def inference_text_features(self, class_names: Sequence[str] | None, batch_size: int) -> torch.Tensor:
        """[B, 2, E]: each image's class, or ``class_name`` (the frozen buffer after export freezing)."""
        if class_names is None:
            return self.text_cache.current(self.class_name).expand(batch_size, -1, -1)
        return torch.stack([self.class_text_features(name) for name in class_names])

    def set_class_name(self, class_name: str) -> None:
        """Use ``class_name`` when none is given per image (frozen text features are dropped)."""
        self.class_name = class_name
        self.text_cache.unfreeze()

    def freeze_text_features(self) -> None:
        """Store the text features of ``class_name`` as a constant buffer (before export)."""
        self.text_cache.freeze(self.class_name)

    # ------------------------------------------------------------------ image side
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (global feature [B, E], patch features per layer [B, h*w, E]), not normalised."""
        visual = self.clip.visual
        tokens = visual(images, self.feature_layers, vv_from=self.dpam_start)
        global_feature = visual.project(tokens.cls, layer_norm=self.global_ln_post)
        patches = [visual.project(tokens.layers[layer][:, 1:]) for layer in self.feature_layers]
        return global_feature, patches

    def logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine similarities / temperature: features [B, ..., E], text [B, 2, E] -> [B, ..., 2]."""
        features = F.normalize(features, dim=-1)
        if features.dim() == 2:
            return torch.einsum("be,bke->bk", features, text) / self.temperature
        return torch.einsum("bne,bke->bnk", features, text) / self.temperature

    def layer_probabilities(self, patches: list[torch.Tensor], text: torch.Tensor, grid: tuple[int, int]
                            ) -> list[torch.Tensor]:
        """Per layer, the softmax over {normal, anomalous} of each patch: [B, 2, h, w]."""
        out = []
        for patch in patches:
            probs = self.logits(patch, text).softmax(-1)
            out.append(probs.transpose(1, 2).reshape(probs.shape[0], 2, *grid))
        return out

    def forward(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> InferenceBatch:
        """Images [B, 3, H, W] (CLIP-normalised) -> pred_score [B], anomaly_map [B, H, W].

        ``class_names`` (one per image) puts each image's class into the prompts; None uses
        ``class_name`` (the exported path).
        """
        text = self.inference_text_features(class_names, images.shape[0]).to(images.dtype)
        with torch.no_grad():
            global_feature, patches = self.encode_image(images)
        score = self.logits(global_feature, text).softmax(-1)[:, 1]
        probs = self.layer_probabilities(patches, text, self.clip.visual.grid_size(images))
        # The anomalous probability, summed over the layers on the patch grid, upsampled once
        # (bilinear upsampling is linear: the same as upsampling each layer first).
        grid_map = torch.stack([p[:, 1] for p in probs]).sum(0)
        anomaly_map = F.interpolate(grid_map[:, None], size=images.shape[-2:], mode="bilinear",
                                    align_corners=False)[:, 0]
        return InferenceBatch(pred_score=score, anomaly_map=self.blur(anomaly_map))


class CLIPBaselineModel(PromptScoringModel):
    """CLIP (two plain prompts) or CLIP-AC (ImageNet template ensemble) around a frozen CLIP.

    Args:
        clip: the CLIP (frozen here).
        prompts: ``"clip"`` or ``"clip_ac"``.
        class_name: the class name of the prompts when none is given per image.
        feature_layers: 1-based vision blocks whose patch tokens make the map; None = the last one.
        dpam_start: first vision block with V-V attention (DPAM); None = plain CLIP (the paper's baseline).
        temperature: softmax temperature; None = CLIP's own.
        sigma: Gaussian smoothing of the map, in pixels (0 = off).
    """

    def __init__(self, clip: ClipModel, prompts: str = "clip", class_name: str = "object",
                 feature_layers: Sequence[int] | None = None, dpam_start: int | None = None,
                 temperature: float | None = None, sigma: float = 4.0) -> None:
        prompt_sentences(prompts, class_name)  # an unknown prompt set fails here
        super().__init__(clip, class_name=class_name, feature_layers=feature_layers, dpam_start=dpam_start,
                         temperature=temperature, sigma=sigma)
        self.prompts = prompts

    def sentences(self, class_name: str) -> tuple[list[str], list[str]]:
        return prompt_sentences(self.prompts, class_name)

    def _text_features_of(self, class_name: str) -> torch.Tensor:
        normal, anomalous = self.sentences(class_name)
        return torch.stack([ensemble_feature(self.clip, normal), ensemble_feature(self.clip, anomalous)]).float()
