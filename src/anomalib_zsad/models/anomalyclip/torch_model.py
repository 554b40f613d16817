"""AnomalyCLIP (Zhou et al., ICLR 2024) as a plain ``nn.Module``: image -> (score, anomaly map).

Data flow, as the official code at commit 45ed4dd (see README.md for every difference):
* text: two learnt prompts -> CLIP text tower with deep prompts -> [2, E] (normal, anomalous);
* image: CLIP vision tower with DPAM (V-V attention, from block ``dpam_start`` on); patch tokens of
  ``feature_layers`` from the V-V stream through ``ln_post`` and ``proj``; the global feature is the
  ordinary stream's class token through ``proj`` **without** ``ln_post`` (as the official code);
* score: ``softmax(cos(global, text) / 0.07)[anomalous]``;
* switches of the paper's ablations (defaults = the paper): ``dpam`` (V-V, Q-Q, K-K or none),
  ``object_aware`` (each image's class name in the prompts instead of "object"), ``shared_context``
  (one context for both prompts), ``abnormality_word`` ("damaged");
* map: per layer ``(p_anomalous + 1 - p_normal) / 2`` of the patch softmax, summed over layers,
  upsampled bilinearly to the input size, smoothed by a Gaussian (sigma 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_zsad.clip import DPAM_ATTENTIONS, ClipModel, quarter_blocks
from anomalib_zsad.models.components import GaussianBlur
from anomalib_zsad.models.components.text_cache import TextFeatureCache

from .prompt_learner import AnomalyCLIPPromptLearner

default_feature_layers = quarter_blocks  # the ends of the tower's four quarters (6, 12, 18, 24 of ViT-L)


class AnomalyCLIPModel(nn.Module):
    """AnomalyCLIP around a frozen :class:`ClipModel`; only the prompt learner is trainable.

    Args:
        clip: the CLIP (frozen here: ``requires_grad`` is switched off).
        n_ctx: learnt context tokens per prompt (official 12).
        prompt_depth: official ``depth``; deep prompts go into text blocks ``1 .. depth-1`` (9).
        deep_prompt_length: tokens per deep prompt (official ``t_n_ctx``, 4).
        feature_layers: 1-based vision blocks whose patch tokens make maps; None = the paper's
            quarters (6, 12, 18, 24). The official scripts pass ``--features_list 24``.
        dpam_start: first vision block with the V-V path; None = ``depth // 4`` (6 of 24: the
            official ``DPAM_layer=20``).
        temperature: the fixed 0.07 of the official code (CLIP's learnt scale is unused).
        sigma: Gaussian smoothing of the final map (official 4; 0 turns it off).
        round_deep_prompts_to_fp16: the official ``.half()`` on the deep prompts.
        global_ln_post: apply ``ln_post`` to the global feature (the official code does not).
        class_name: the object word of the prompts: "object" (object-agnostic); with ``object_aware``
            the word used when no class name is given per image (and in an export).
        seed: initial values of the prompts.
        dpam: the attention of the DPAM path: ``vv`` (the paper's), ``qq``, ``kk``, or ``none`` (no
            DPAM: patch tokens of CLIP's own Q-K attention).
        object_aware: put each image's class name in the prompts (the paper's object-aware prompts,
            Fig. 5; ``forward``/``training_outputs`` then take ``class_names``).
        shared_context: one learnt context for the normal and the anomalous prompt (Table 9).
        abnormality_word: the word before the object in the anomalous prompt (Tables 13-14).
    """

    def __init__(self, clip: ClipModel, n_ctx: int = 12, prompt_depth: int = 9, deep_prompt_length: int = 4,
                 feature_layers: Sequence[int] | None = None, dpam_start: int | None = None,
                 temperature: float = 0.07, sigma: float = 4.0, round_deep_prompts_to_fp16: bool = True,
                 global_ln_post: bool = False, class_name: str = "object", seed: int = 0, dpam: str = "vv",
                 object_aware: bool = False, shared_context: bool = False, abnormality_word: str = "damaged") -> None:
        super().__init__()
        self.clip = clip.requires_grad_(False)
        depth = len(clip.visual.blocks)
        self.feature_layers = list(feature_layers) if feature_layers else default_feature_layers(depth)
        self.dpam_start = dpam_start if dpam_start is not None else max(1, depth // 4)
        self.temperature = temperature
        self.round_deep_prompts_to_fp16 = round_deep_prompts_to_fp16
        self.global_ln_post = global_ln_post
        if dpam not in DPAM_ATTENTIONS:
            msg = f"dpam must be one of {DPAM_ATTENTIONS}, got {dpam!r}"
            raise ValueError(msg)
        self.dpam = dpam
        self.object_aware = object_aware
        self.class_name = class_name
        self.prompt_learner = AnomalyCLIPPromptLearner(clip.text, n_ctx, prompt_depth, deep_prompt_length,
                                                       class_name=class_name, seed=seed,
                                                       anomalous_template=f"{abnormality_word} {{}}",
                                                       shared_context=shared_context)
        self.blur = GaussianBlur(sigma)
        # Text features for inference: computed once per prompt state, frozen for export.
        self.text_cache = TextFeatureCache(self._text_features_of, self.prompt_learner.parameters)

    def text_features(self, class_name: str | None = None) -> torch.Tensor:
        """Normalised [2, E] text features (row 0 normal, row 1 anomalous), with autograd; with a
        ``class_name``, of the prompts with that object word (object-aware)."""
        learner, text = self.prompt_learner, self.clip.text
        if class_name is None:
            embeddings, eot = learner.prompt_embeddings(text), learner.token_ids.argmax(-1)
        else:
            embeddings, eot = learner.prompt_embeddings_for(text, class_name)
        features = text(embeddings, eot, deep_prompts=learner.deep_prompts(),
                        round_deep_prompts_to_fp16=self.round_deep_prompts_to_fp16)
        return F.normalize(features.float(), dim=-1)

    def batch_text_features(self, class_names: Sequence[str] | None, batch_size: int) -> torch.Tensor:
        """With autograd: [2, E] object-agnostic (or without class names), else [B, 2, E], each
        distinct class name encoded once."""
        if not self.object_aware or class_names is None:
            return self.text_features(self.class_name if self.object_aware else None)
        distinct = list(dict.fromkeys(class_names))
        features = dict(zip(distinct, (self.text_features(name) for name in distinct), strict=True))
        return torch.stack([features[name] for name in class_names])

    def _text_features_of(self, class_name: str) -> torch.Tensor:
        # object-agnostic: one pair of prompts for every object (cached under "")
        return self.text_features(class_name if self.object_aware else None)

    def _cache_key(self, class_name: str | None = None) -> str:
        if not self.object_aware:
            return ""
        return self.class_name if class_name is None else class_name

    def text_features_cached(self, class_names: Sequence[str] | None = None, batch_size: int = 1) -> torch.Tensor:
        """Text features for inference: they depend only on the prompts, so compute them once
        (a constant buffer after :meth:`freeze_text_features`). [2, E], or [B, 2, E] for
        object-aware prompts with a class name per image."""
        if not self.object_aware or class_names is None:
            return self.text_cache.current(self._cache_key())
        return torch.stack([self.text_cache.get(name) for name in class_names])

    def freeze_text_features(self) -> None:
        """Store the current text features as a constant buffer (for export and deployment)."""
        self.text_cache.freeze(self._cache_key())

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (global feature [B, E], patch features per layer [B, 1 + h*w, E]), not normalised."""
        visual = self.clip.visual
        tokens = visual(images, self.feature_layers, vv_from=self.dpam_start, dpam_attention=self.dpam)
        global_feature = visual.project(tokens.cls, layer_norm=self.global_ln_post)
        patches = [visual.project(tokens.layers[layer]) for layer in self.feature_layers]
        return global_feature, patches

    def patch_probabilities(self, patches: list[torch.Tensor], text: torch.Tensor, grid: tuple[int, int]
                            ) -> list[torch.Tensor]:
        """Per layer, the softmax over {normal, anomalous} of each patch: [B, 2, h, w]."""
        out = []
        for patch in patches:
            if text.dim() == 3:  # one pair of prompts per image (object-aware)
                logits = torch.einsum("bne,bke->bnk", F.normalize(patch, dim=-1)[:, 1:], text) / self.temperature
            else:
                logits = F.normalize(patch, dim=-1)[:, 1:] @ text.t() / self.temperature
            probs = logits.softmax(-1)
            out.append(probs.transpose(1, 2).reshape(probs.shape[0], 2, *grid))
        return out

    def image_logits(self, global_feature: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if text.dim() == 3:  # one pair of prompts per image (object-aware)
            return torch.einsum("be,bke->bk", F.normalize(global_feature, dim=-1), text) / self.temperature
        return F.normalize(global_feature, dim=-1) @ text.t() / self.temperature

    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        return self.clip.visual.grid_size(images)

    def training_outputs(self, images: torch.Tensor, class_names: Sequence[str] | None = None,
                         with_maps: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (image logits [B, 2], per-layer patch probabilities upsampled to [B, 2, H, W], or []
        without ``with_maps``). ``class_names``: each image's object word (object-aware only).

        Only the prompts get gradients: the image side runs without autograd, as officially.
        """
        text = self.batch_text_features(class_names, images.shape[0])
        with torch.no_grad():
            global_feature, patches = self.encode_image(images)
        if not with_maps:
            return self.image_logits(global_feature, text), []
        probs = self.patch_probabilities(patches, text, self.grid_size(images))
        upsampled = [F.interpolate(p, size=images.shape[-2:], mode="bilinear", align_corners=False) for p in probs]
        return self.image_logits(global_feature, text), upsampled

    def forward(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> InferenceBatch:
        """Images [B, 3, H, W] (CLIP-normalised) -> pred_score [B], anomaly_map [B, H, W].
        ``class_names`` (one per image) are used by object-aware prompts only."""
        text = self.text_features_cached(class_names, images.shape[0])
        with torch.no_grad():
            global_feature, patches = self.encode_image(images)
        score = self.image_logits(global_feature, text).softmax(-1)[:, 1]
        probs = self.patch_probabilities(patches, text, self.grid_size(images))
        # (p1 + 1 - p0) / 2 is linear and so is bilinear upsampling: sum the layers on the patch
        # grid, then upsample once (the official code upsamples every layer first; same numbers).
        grid_map = torch.stack([(p[:, 1] + 1 - p[:, 0]) / 2 for p in probs]).sum(0)
        anomaly_map = F.interpolate(grid_map[:, None], size=images.shape[-2:], mode="bilinear",
                                    align_corners=False)[:, 0]
        return InferenceBatch(pred_score=score, anomaly_map=self.blur(anomaly_map))
