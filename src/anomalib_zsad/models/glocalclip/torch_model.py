"""GlocalCLIP (arXiv 2411.06071) as a plain ``nn.Module``: image -> (score, anomaly map).

AnomalyCLIP (:class:`AnomalyCLIPModel`, whose image side, DPAM path, similarity and map formula
are reused as they are) with glocal prompts:

* text: the four prompts of :class:`GlocalCLIPPromptLearner` in one pass of the CLIP text tower
  with the shared deep prompts -> [4, E] (global normal, global anomalous, local normal, local
  anomalous), each L2-normalised;
* score: ``softmax(cos(global image feature, global pair) / 0.07)[anomalous]``;
* map: AnomalyCLIP's per-layer ``(p_anomalous + 1 - p_normal) / 2`` of the patch softmax against the
  **local** pair, summed over layers, upsampled bilinearly, smoothed (sigma 8 in the official scripts).

``official_layer_aliasing`` reproduces the official code's collected-token aliasing (see
:meth:`GlocalCLIPModel.encode_image` and README.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch

from anomalib_zsad.clip import ClipModel
from anomalib_zsad.models.anomalyclip.torch_model import AnomalyCLIPModel
from anomalib_zsad.models.components.text_cache import TextFeatureCache

from .prompt_learner import GlocalCLIPPromptLearner


def aliased_layers(feature_layers: Sequence[int], dpam_start: int, depth: int) -> list[int]:
    """The collected layers whose tokens the official code ends up reading from the **last** block.

    The official loop appends the V-V stream tensor after each collected block without a copy, and
    every later DPAM block adds to that tensor in place; the first DPAM block adds in place to its
    input, the output of block ``dpam_start - 1``. So every collected block from ``dpam_start - 1``
    on holds the final V-V stream when the forward ends.
    """
    if dpam_start > depth:
        return []
    return [layer for layer in feature_layers if layer >= dpam_start - 1]


class GlocalCLIPModel(AnomalyCLIPModel):
    """GlocalCLIP around a frozen :class:`ClipModel`; only the prompt learner is trainable.

    Args:
        clip: the CLIP (frozen here).
        n_ctx: learnt normal-context tokens per branch (official 12).
        ab_ctx: learnt anomalous tokens per branch, after the normal context (official 12).
        prompt_depth: official ``depth``; deep prompts go into text blocks ``1 .. depth-1`` (9).
        deep_prompt_length: tokens per deep prompt (official ``t_n_ctx``, 4).
        feature_layers: 1-based vision blocks whose patch tokens make maps; None = the quarters
            (6, 12, 18, 24 of ViT-L, what the official scripts pass).
        dpam_start: first vision block with the V-V path; None = ``depth // 4`` (official
            ``DPAM_layer=20``: 6 of 24).
        temperature: the fixed 0.07 of the official code.
        sigma: Gaussian smoothing of the final map (official scripts 8, test.py's default 4; 0 = off).
        round_deep_prompts_to_fp16: the official ``.half()`` on the deep prompts.
        global_ln_post: apply ``ln_post`` to the global feature (the official code does not).
        official_layer_aliasing: every collected layer from ``dpam_start - 1`` on reads the last
            block's V-V tokens, as the official code does (False: the layers asked for).
        class_name: the object word of the prompts ("object").
        seed: initial values of the prompts.
    """

    def __init__(self, clip: ClipModel, n_ctx: int = 12, ab_ctx: int = 12, prompt_depth: int = 9,
                 deep_prompt_length: int = 4, feature_layers: Sequence[int] | None = None,
                 dpam_start: int | None = None, temperature: float = 0.07, sigma: float = 8.0,
                 round_deep_prompts_to_fp16: bool = True, global_ln_post: bool = False,
                 official_layer_aliasing: bool = False, class_name: str = "object", seed: int = 0) -> None:
        # AnomalyCLIP's image side, smoothing and settings; its two-prompt learner is replaced below.
        super().__init__(clip, n_ctx=n_ctx, prompt_depth=prompt_depth, deep_prompt_length=deep_prompt_length,
                         feature_layers=feature_layers, dpam_start=dpam_start, temperature=temperature,
                         sigma=sigma, round_deep_prompts_to_fp16=round_deep_prompts_to_fp16,
                         global_ln_post=global_ln_post, class_name=class_name, seed=seed)
        self.official_layer_aliasing = official_layer_aliasing
        self.prompt_learner = GlocalCLIPPromptLearner(clip.text, n_ctx, ab_ctx, prompt_depth, deep_prompt_length,
                                                      class_name=class_name, seed=seed)
        self.text_cache = TextFeatureCache(self._text_features_of, self.prompt_learner.parameters)

    # text_features() is AnomalyCLIP's: one text pass over the learner's prompts, here four -> [4, E].

    @staticmethod
    def split_text(text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[4, E] -> (global pair [2, E], local pair [2, E]), each (normal, anomalous)."""
        return text[:2], text[2:]

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (global feature [B, E], patch features per layer [B, 1 + h*w, E]), not normalised.

        With ``official_layer_aliasing`` the layers of :func:`aliased_layers` all get the last
        block's V-V tokens (one tensor), as the official code computes them.
        """
        if not self.official_layer_aliasing:
            return super().encode_image(images)
        visual = self.clip.visual
        depth = len(visual.blocks)
        aliased = aliased_layers(self.feature_layers, self.dpam_start, depth)
        wanted = [layer for layer in self.feature_layers if layer not in aliased] + ([depth] if aliased else [])
        tokens = visual(images, wanted, vv_from=self.dpam_start)
        global_feature = visual.project(tokens.cls, layer_norm=self.global_ln_post)
        last = visual.project(tokens.layers[depth]) if aliased else None
        patches = [last if layer in aliased else visual.project(tokens.layers[layer]) for layer in self.feature_layers]
        return global_feature, patches

    def training_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """-> (image logits [B, 2] from the global pair, per-layer patch probabilities from the local
        pair upsampled to [B, 2, H, W], the text features [4, E] for the glocal triplet loss).

        Only the prompts get gradients: the image side runs without autograd, as officially.
        """
        text = self.text_features()
        global_text, local_text = self.split_text(text)
        with torch.no_grad():
            global_feature, patches = self.encode_image(images)
        probs = self.patch_probabilities(patches, local_text, self.grid_size(images))
        upsampled = [F.interpolate(p, size=images.shape[-2:], mode="bilinear", align_corners=False) for p in probs]
        return self.image_logits(global_feature, global_text), upsampled, text

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Images [B, 3, H, W] (CLIP-normalised) -> pred_score [B], anomaly_map [B, H, W]."""
        global_text, local_text = self.split_text(self.text_features_cached())
        with torch.no_grad():
            global_feature, patches = self.encode_image(images)
        score = self.image_logits(global_feature, global_text).softmax(-1)[:, 1]
        probs = self.patch_probabilities(patches, local_text, self.grid_size(images))
        # Linear map formula and bilinear upsampling commute: sum on the grid, upsample once.
        grid_map = torch.stack([(p[:, 1] + 1 - p[:, 0]) / 2 for p in probs]).sum(0)
        anomaly_map = F.interpolate(grid_map[:, None], size=images.shape[-2:], mode="bilinear",
                                    align_corners=False)[:, 0]
        return InferenceBatch(pred_score=score, anomaly_map=self.blur(anomaly_map))
