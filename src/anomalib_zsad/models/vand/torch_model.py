"""VAND / APRIL-GAN (Chen et al., CVPR 2023 VAND workshop) as a plain ``nn.Module``.

Data flow, as the official code at commit f13b8a6 (see README.md for every difference):

* text: the fixed state-word x template ensemble of :mod:`anomalib_zsad.clip.prompts` -> [2, E]
  (normal, anomalous), one pair per class name, computed once and cached;
* image score: ``softmax(100 * cos(ln_post(cls) @ proj, text))[anomalous]``;
* zero-shot map: for each of ``feature_layers`` a learnt linear map (``trainable_linearlayer.fc.i``)
  of the **raw** patch tokens (no ``ln_post``, no ``proj``) into the text space,
  ``100 * cos(., text)`` -> logits on the patch grid, upsampled bilinearly with
  ``align_corners=True`` to the image size, softmax over {normal, anomalous}; the anomalous
  probabilities are **summed** over the layers (range [0, len(feature_layers)]); no smoothing;
* few-shot map (``k_shot`` reference images of the target): for each of ``few_shot_layers``,
  ``min over the memory of (1 - cos(memory token, test token))`` on raw tokens, upsampled the
  same way and summed; it is added to the zero-shot map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_zsad.clip import ClipModel, quarter_blocks
from anomalib_zsad.clip.prompts import (
    VAND_ANOMALOUS_STATES,
    VAND_NORMAL_STATES,
    VAND_TEMPLATES,
    ensemble_text_features,
)
from anomalib_zsad.models.components.text_cache import TextFeatureCache

default_feature_layers = quarter_blocks  # the ends of the tower's four quarters (6, 12, 18, 24 of ViT-L)


class VandLinearLayer(nn.Module):
    """One ``nn.Linear(width, embed_dim)`` per feature layer, under the official names ``fc.i``.

    The official ``LinearLayer`` of model.py has exactly these parameters, so its released
    ``{"trainable_linearlayer": state_dict}`` loads without renaming.
    """

    def __init__(self, width: int, embed_dim: int, layers: int) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(width, embed_dim) for _ in range(layers))

    def forward(self, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Raw tokens per layer [B, 1 + N, C] (class token first) -> [B, N, E]: class token dropped."""
        return [fc(layer_tokens[:, 1:]) for fc, layer_tokens in zip(self.fc, tokens, strict=True)]


class VandModel(nn.Module):
    """VAND around a frozen :class:`ClipModel`; only ``trainable_linearlayer`` is learnt.

    Args:
        clip: the CLIP (frozen here). The official code runs OpenAI's ViT-L/14@336 at 518 px with
            exact GELU and the antialiased bicubic pos-embed resize: load it with
            ``load_clip("ViT-L-14-336", "openai", activation="gelu", pos_embed_mode="bicubic_antialias")``.
        feature_layers: 1-based vision blocks whose tokens make the zero-shot maps (one linear
            layer each); None = the four quarter ends (6, 12, 18, 24 of ViT-L).
        few_shot_layers: blocks used by the few-shot memory; None = ``feature_layers``.
        logit_scale: the hard-coded 100 of the official code (CLIP's learnt scale is unused).
        class_name: the object name put into the prompts at inference.
        normal_states, anomalous_states, templates: the prompt ensemble (official by default).
    """

    def __init__(
        self,
        clip: ClipModel,
        feature_layers: Sequence[int] | None = None,
        few_shot_layers: Sequence[int] | None = None,
        logit_scale: float = 100.0,
        class_name: str = "object",
        normal_states: Sequence[str] = VAND_NORMAL_STATES,
        anomalous_states: Sequence[str] = VAND_ANOMALOUS_STATES,
        templates: Sequence[str] = VAND_TEMPLATES,
    ) -> None:
        super().__init__()
        self.clip = clip.requires_grad_(False)
        depth = len(clip.visual.blocks)
        self.feature_layers = list(feature_layers) if feature_layers else default_feature_layers(depth)
        self.few_shot_layers = list(few_shot_layers) if few_shot_layers else list(self.feature_layers)
        bad = [layer for layer in {*self.feature_layers, *self.few_shot_layers} if not 1 <= layer <= depth]
        if bad:
            msg = f"layers {sorted(bad)} are outside the vision tower's blocks 1..{depth}"
            raise ValueError(msg)
        self.logit_scale = float(logit_scale)
        self.class_name = class_name
        self.prompts = (tuple(normal_states), tuple(anomalous_states), tuple(templates))
        arch = clip.arch
        self.trainable_linearlayer = VandLinearLayer(arch.vision_width, arch.embed_dim, len(self.feature_layers))
        # Text features by class name (the text side is frozen CLIP); frozen for export.
        self.text_cache = TextFeatureCache(self._ensemble_text_features)
        # Few-shot memory: one [M, C] bank of raw tokens per few-shot layer, held in buffers
        # ``memory_bank_<i>`` that are not saved (the memory is rebuilt from the target's images).
        self._memory_size = 0

    # --- text ------------------------------------------------------------------------------------

    def _ensemble_text_features(self, class_name: str) -> torch.Tensor:
        return ensemble_text_features(self.clip, class_name, *self.prompts).float()

    def class_text_features(self, class_name: str) -> torch.Tensor:
        """[2, E] text features of one class name, computed once per name and device."""
        return self.text_cache.get(class_name)

    def batch_text_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """[B, 2, E]: one pair per image, as official training does (each image's own class)."""
        return torch.stack([self.class_text_features(name) for name in class_names])

    def set_class_name(self, class_name: str) -> None:
        """Use ``class_name`` in the prompts from now on (frozen text features are dropped)."""
        self.class_name = class_name
        self.text_cache.unfreeze()

    def inference_text_features(self) -> torch.Tensor:
        """[2, E] for ``class_name`` (the frozen buffer after :meth:`freeze_text_features`)."""
        return self.text_cache.current(self.class_name)

    def freeze_text_features(self) -> None:
        """Store the text features of ``class_name`` as a constant buffer (before export or deployment)."""
        self.text_cache.freeze(self.class_name)

    # --- vision ----------------------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """-> (global feature [B, E] = ``ln_post(cls) @ proj``, raw tokens per layer [B, 1 + N, C])."""
        visual = self.clip.visual
        layers = sorted({*self.feature_layers, *self.few_shot_layers})
        # The tower computes only the class token of its last block unless asked for all tokens.
        tokens = visual(images, layers, return_tokens=len(visual.blocks) in layers)
        return visual.project(tokens.cls), tokens.layers

    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        return self.clip.visual.grid_size(images)

    def image_scores(self, global_feature: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Zero-shot anomaly probability of each image [B]; ``text`` is [2, E] or [B, 2, E]."""
        feature = F.normalize(global_feature, dim=-1)
        logits = self.logit_scale * (feature[:, None] @ text.transpose(-1, -2)).squeeze(1) if text.dim() == 3 \
            else self.logit_scale * feature @ text.t()
        return logits.softmax(-1)[:, 1]

    def patch_logits(self, layer_tokens: dict[int, torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
        """Per feature layer, ``100 * cos(fc(tokens), text)`` [B, N, 2] (column 1 anomalous)."""
        projected = self.trainable_linearlayer([layer_tokens[layer] for layer in self.feature_layers])
        text_t = text.transpose(-1, -2)  # [E, 2] or [B, E, 2]
        return [self.logit_scale * F.normalize(p, dim=-1) @ text_t for p in projected]

    @staticmethod
    def upsample(grid_values: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """[B, N, K] values on the patch grid -> [B, K, H, W], bilinear, ``align_corners=True``."""
        batch, _, channels = grid_values.shape
        image = grid_values.transpose(1, 2).reshape(batch, channels, *grid)
        return F.interpolate(image, size=size, mode="bilinear", align_corners=True)

    def layer_probabilities(self, images: torch.Tensor, text: torch.Tensor | None = None,
                            layer_tokens: dict[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per feature layer, softmax of the upsampled logits [B, 2, H, W]: what training scores."""
        if layer_tokens is None:
            with torch.no_grad():
                _, layer_tokens = self.encode_image(images)
        text = self.inference_text_features() if text is None else text
        grid, size = self.grid_size(images), tuple(images.shape[-2:])
        return [self.upsample(logits, grid, size).softmax(dim=1) for logits in self.patch_logits(layer_tokens, text)]

    def zero_shot_map(self, layer_tokens: dict[int, torch.Tensor], text: torch.Tensor, grid: tuple[int, int],
                      size: tuple[int, int]) -> torch.Tensor:
        """Sum over the feature layers of ``softmax(upsampled logits)[anomalous]`` [B, H, W].

        ``softmax([a, b])[1] = sigmoid(b - a)`` and bilinear upsampling is linear, so each layer's
        map is ``sigmoid(upsample(b - a))``: all layers go through one interpolation call, one
        channel each, instead of two channels per layer (same numbers to float rounding).
        """
        margins = torch.cat([logits[..., 1:] - logits[..., :1] for logits in self.patch_logits(layer_tokens, text)],
                            dim=-1)  # [B, N, L]
        return torch.sigmoid(self.upsample(margins, grid, size)).sum(dim=1)

    # --- few-shot --------------------------------------------------------------------------------

    @torch.no_grad()
    def setup_few_shot(self, reference_images: torch.Tensor | None, batch_size: int = 8) -> None:
        """Fill the memory with the raw patch tokens of ``reference_images`` (None or empty: clear it).

        The official code draws ``k_shot`` train images *with replacement*; duplicates do not
        change a minimum distance, so the memory needs each distinct image once.
        """
        for index in range(self._memory_size):
            delattr(self, f"memory_bank_{index}")
        self._memory_size = 0
        if reference_images is None or len(reference_images) == 0:
            return
        banks: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.few_shot_layers}
        for chunk in reference_images.split(batch_size):
            _, layer_tokens = self.encode_image(chunk)
            for layer in self.few_shot_layers:
                banks[layer].append(layer_tokens[layer][:, 1:].reshape(-1, layer_tokens[layer].shape[-1]))
        for index, layer in enumerate(self.few_shot_layers):
            self.register_buffer(f"memory_bank_{index}", torch.cat(banks[layer]), persistent=False)
        self._memory_size = len(self.few_shot_layers)

    @property
    def memory_banks(self) -> list[torch.Tensor]:
        """The few-shot memory, one [M, C] bank per few-shot layer (empty list: zero-shot)."""
        return [getattr(self, f"memory_bank_{index}") for index in range(self._memory_size)]

    @property
    def k_shot_ready(self) -> bool:
        return self._memory_size > 0

    def min_distances(self, layer_tokens: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Per few-shot layer, ``min_m (1 - cos(memory_m, token))`` for every patch [B, N]."""
        out = []
        for layer, bank in zip(self.few_shot_layers, self.memory_banks, strict=True):
            tokens = F.normalize(layer_tokens[layer][:, 1:], dim=-1)
            similarity = tokens @ F.normalize(bank, dim=-1).t()  # [B, N, M]
            out.append(1 - similarity.amax(dim=-1))
        return out

    def few_shot_map(self, layer_tokens: dict[int, torch.Tensor], grid: tuple[int, int],
                     size: tuple[int, int]) -> torch.Tensor:
        """Sum over the few-shot layers of the upsampled minimum distances [B, H, W]."""
        distances = torch.stack(self.min_distances(layer_tokens), dim=-1)  # [B, N, L]
        return self.upsample(distances, grid, size).sum(dim=1)

    # --- inference -------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> InferenceBatch:
        """Images [B, 3, H, W] (CLIP-normalised) -> pred_score [B], anomaly_map [B, H, W].

        ``class_names`` (one per image) puts each image's own class into the prompts, as the
        official test.py does on a pooled set; None uses ``class_name`` (the exported path).
        ``pred_score`` is the zero-shot image score in both modes: the official few-shot score
        min-max normalises the maps' maxima over the whole evaluated set, which no per-image
        model can do (:func:`official_few_shot_scores` reproduces it on a finished set).
        """
        text = self.inference_text_features() if class_names is None else self.batch_text_features(class_names)
        with torch.no_grad():
            global_feature, layer_tokens = self.encode_image(images)
        grid, size = self.grid_size(images), (images.shape[-2], images.shape[-1])
        anomaly_map = self.zero_shot_map(layer_tokens, text, grid, size)
        if self.k_shot_ready:
            anomaly_map = anomaly_map + self.few_shot_map(layer_tokens, grid, size)
        return InferenceBatch(pred_score=self.image_scores(global_feature, text), anomaly_map=anomaly_map)


def official_few_shot_scores(zero_shot_scores: torch.Tensor, anomaly_maps: torch.Tensor) -> torch.Tensor:
    """The official few-shot image score over a whole evaluated set (test.py, metrics section).

    ``0.5 * (zero_shot_score + minmax_over_the_set(max of each map))``, in float64.
    """
    peaks = anomaly_maps.flatten(1).amax(dim=1).double()
    peaks = (peaks - peaks.min()) / (peaks.max() - peaks.min())
    return 0.5 * (zero_shot_scores.double() + peaks)
