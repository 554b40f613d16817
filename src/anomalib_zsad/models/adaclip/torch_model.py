"""AdaCLIP (Cao et al., ECCV 2024) as a plain ``nn.Module``: image -> (score, anomaly map).

Data flow of the official code at commit e27ee32 (see README.md for every difference):
* a prompt-free pass of the frozen ViT gives the image embedding ``f``; per-token linear heads
  turn it into *dynamic* visual and text prompts;
* vision: before blocks ``0 .. depth-1`` the prompt tokens ``dynamic + static[i]`` are appended
  to the sequence (block 0) or replace the last ``length`` tokens (blocks 1 ..); they stay in
  the sequence afterwards and are dropped from the collected layer tokens;
* text: the 28 normal / 20 anomalous sentences of the class, with ``dynamic + static[i]``
  replacing tokens ``1 .. length`` before text blocks ``1 .. depth-1``; the text features
  therefore depend on the image;
* patch tokens of the feature layers and the final class embedding go through linear
  projections; x100 cosine logits give the maps; the image score uses hybrid semantic fusion
  (HSF) of the most anomalous patches with the class embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_zsad.clip import ClipModel, end_token_span, tokenize
from anomalib_zsad.models.components import GaussianBlur

from .hsf import HybridSemanticFusion
from .prompting import LinearHeads, StaticPrompts
from .prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, build_sentences, clean_class_name

PROMPTING_TYPES = ("S", "D", "SD")
PROMPTING_BRANCHES = ("V", "L", "VL")


def default_feature_layers(depth: int) -> list[int]:
    """The official ``n_layers // 4 * (1 .. 4)`` (6, 12, 18, 24 of ViT-L), at least block 1."""
    step = max(1, depth // 4)
    return sorted({min(depth, step * i) for i in range(1, 5)})


@dataclass
class AdaCLIPOutput:
    """Everything one pass computes (parity tests and the training loss read the pieces).

    ``patch_features[l]`` and ``cls_feature`` are normalised; ``patch_logits[l]`` are the x100
    logits [B, N, 2]; ``text_features`` [B, 2, E] (row 0 normal); ``image_probs`` [B, 2].
    """

    frozen_image_features: torch.Tensor
    dynamic_visual_prompts: torch.Tensor | None
    dynamic_text_prompts: torch.Tensor | None
    layer_tokens: list[torch.Tensor]
    image_features: torch.Tensor
    text_embeddings: torch.Tensor
    text_features: torch.Tensor
    patch_features: list[torch.Tensor]
    cls_feature: torch.Tensor
    patch_logits: list[torch.Tensor]
    hsf_input: torch.Tensor | None
    hsf_labels: torch.Tensor | None
    hsf_feature: torch.Tensor | None
    image_probs: torch.Tensor
    grid: tuple[int, int]


class AdaCLIPModel(nn.Module):
    """AdaCLIP around a frozen :class:`ClipModel`; prompts, heads and projections are learnt.

    Args:
        clip: the CLIP (frozen here). The official code builds it with exact GELU and bicubic
            pos-embed resizing without antialias: ``load_clip(..., activation="gelu",
            pos_embed_mode="bicubic")``.
        prompt_depth: prompted blocks per tower (official 4); None = ``min(4, layers of each tower)``.
        prompt_length: prompt tokens per block (official 5).
        prompting_type: ``"SD"`` static + dynamic (official), ``"S"`` or ``"D"``.
        prompting_branch: ``"VL"`` both towers (official), ``"V"`` or ``"L"``.
        feature_layers: 1-based vision blocks for the maps; None = ``depth // 4 * (1..4)``.
        use_hsf: hybrid semantic fusion for the image score (official True); else the
            projected class embedding alone.
        k_clusters, n_aggregate, hsf_alpha: HSF's 20 clusters, ``5 * k`` patches, 0.2.
        kmeans_backend, kmeans_seed: ``"torch"`` (deterministic) or ``"sklearn"`` (official call).
        kmeans_export_iterations: Lloyd iterations unrolled in an exported graph (30).
        logit_scale: the fixed 100 of the official code (CLIP's learnt scale is unused).
        sigma: Gaussian smoothing of the final map (official 4; 0 turns it off).
        class_name: the object word of the sentences when a batch names none (``"object"``).
        round_prompts_to_fp16: the official ``.half()`` on the prompt tokens of both towers.
        truncate_text: run the text tower on tokens up to the longest sentence's end token only.
            Causal attention makes that exact (up to float rounding) and 6x cheaper.
        seed: seed of the initial learnable values (static prompts N(0, 0.02), heads as nn.Linear).
    """

    def __init__(self, clip: ClipModel, prompt_depth: int | None = None, prompt_length: int = 5,
                 prompting_type: str = "SD", prompting_branch: str = "VL",
                 feature_layers: Sequence[int] | None = None, use_hsf: bool = True, k_clusters: int = 20,
                 n_aggregate: int | None = None, hsf_alpha: float = 0.2, kmeans_backend: str = "torch",
                 kmeans_seed: int | None = 0, kmeans_export_iterations: int = 30, logit_scale: float = 100.0,
                 sigma: float = 4.0,
                 class_name: str = "object", round_prompts_to_fp16: bool = True, truncate_text: bool = True,
                 normal_states: Sequence[str] = NORMAL_STATES, anomalous_states: Sequence[str] = ANOMALOUS_STATES,
                 templates: Sequence[str] = TEMPLATES, seed: int = 0) -> None:
        super().__init__()
        if prompting_type not in PROMPTING_TYPES or prompting_branch not in PROMPTING_BRANCHES:
            msg = (f"prompting_type must be one of {PROMPTING_TYPES} and prompting_branch one of "
                   f"{PROMPTING_BRANCHES}, got {prompting_type!r} / {prompting_branch!r}")
            raise ValueError(msg)
        self.clip = clip.requires_grad_(False)
        vision_depth, text_depth = len(clip.visual.blocks), len(clip.text.blocks)
        depth = prompt_depth if prompt_depth is not None else min(4, vision_depth, text_depth)
        if depth > vision_depth or depth > text_depth:
            msg = f"prompt_depth {depth} exceeds the towers' {vision_depth} vision / {text_depth} text blocks"
            raise ValueError(msg)
        self.prompt_depth, self.prompt_length = depth, prompt_length
        self.feature_layers = list(feature_layers) if feature_layers else default_feature_layers(vision_depth)
        self.logit_scale = logit_scale
        self.class_name = class_name
        self.round_prompts_to_fp16 = round_prompts_to_fp16
        self.truncate_text = truncate_text
        self.states = (tuple(normal_states), tuple(anomalous_states))
        self.templates = tuple(templates)

        vision_width = clip.visual.conv1.out_channels
        text_width = clip.text.token_embedding.embedding_dim
        embed_dim = clip.visual.proj.shape[1]
        static, dynamic = "S" in prompting_type, "D" in prompting_type
        visual, textual = "V" in prompting_branch, "L" in prompting_branch
        gen = torch.Generator().manual_seed(seed)
        # Same creation order as the official module, so a seed gives comparable initial values.
        self.text_prompter = StaticPrompts(depth, prompt_length, text_width, generator=gen) \
            if static and textual else None
        self.visual_prompter = StaticPrompts(depth, prompt_length, vision_width, generator=gen) \
            if static and visual else None
        self.patch_token_layer = LinearHeads(vision_width, embed_dim, len(self.feature_layers), gen)
        self.cls_token_layer = LinearHeads(embed_dim, embed_dim, 1, gen)
        self.dynamic_visual_prompt_generator = LinearHeads(embed_dim, vision_width, prompt_length, gen) \
            if dynamic and visual else None
        self.dynamic_text_prompt_generator = LinearHeads(embed_dim, text_width, prompt_length, gen) \
            if dynamic and textual else None
        self.visual_prompts_on, self.text_prompts_on = visual, textual

        self.hsf = HybridSemanticFusion(k_clusters, n_aggregate, hsf_alpha, kmeans_backend, kmeans_seed,
                                        kmeans_export_iterations) if use_hsf else None
        self.blur = GaussianBlur(sigma)
        self.register_buffer("token_ids", self.sentence_tokens(class_name), persistent=False)
        # A Python int, so that no data-dependent shape ends up in an exported graph.
        self._used_context = self.used_context(self.token_ids)

    # ------------------------------------------------------------------ prompts
    def sentence_tokens(self, class_name: str) -> torch.Tensor:
        """Token ids [S, L] of the normal then anomalous sentences of one class."""
        name = clean_class_name(class_name)
        sentences = [s for states in self.states for s in build_sentences(name, states, self.templates)]
        return tokenize(sentences, self.clip.text.positional_embedding.shape[0])

    def used_context(self, token_ids: torch.Tensor) -> int:
        """Tokens the text tower must see: up to the last end token (at least the prompt slots),
        or the whole context without ``truncate_text``."""
        if not self.truncate_text:
            return token_ids.shape[-1]
        return end_token_span(token_ids, minimum=self.prompt_length + 1)

    def _tokens_for(self, class_names: Sequence[str] | None, batch: int) -> torch.Tensor:
        """[B, S, L] token ids, cut to the used context; the default class's ids are a buffer
        (no tokenizer at export)."""
        if class_names is None or all(name == self.class_name for name in class_names):
            return self.token_ids[:, : self._used_context if self.truncate_text else None].expand(batch, -1, -1)
        ids = torch.stack([self.sentence_tokens(name) for name in class_names])
        return ids[..., : self.used_context(ids)].to(self.token_ids.device)

    def _prompt_tokens(self, static: StaticPrompts | None, dynamic: torch.Tensor | None, block: int,
                       round_fp16: bool | None = None) -> torch.Tensor:
        """``dynamic + static[block]`` ([B, P, W] or [P, W]), rounded to fp16 values officially."""
        if static is None:
            tokens = dynamic
        elif dynamic is None:
            tokens = static[block]
        else:
            tokens = dynamic + static[block].to(dynamic.dtype)
        round_fp16 = self.round_prompts_to_fp16 if round_fp16 is None else round_fp16
        return tokens.half().to(tokens.dtype) if round_fp16 else tokens

    def dynamic_prompts(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """-> (frozen image embedding [B, E], dynamic visual [B, P, Cv], dynamic text [B, P, Ct])."""
        with torch.no_grad():
            frozen = self.clip.encode_image(images)
        visual = self.dynamic_visual_prompt_generator.tokens(frozen) \
            if self.dynamic_visual_prompt_generator is not None else None
        text = self.dynamic_text_prompt_generator.tokens(frozen) \
            if self.dynamic_text_prompt_generator is not None else None
        return frozen, visual, text

    # ------------------------------------------------------------------ towers
    def encode_image(self, images: torch.Tensor, dynamic: torch.Tensor | None
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (pooled image embedding [B, E], raw tokens [B, 1 + h*w, Cv] of each feature layer)."""
        visual = self.clip.visual
        prompted = self.visual_prompts_on and (self.visual_prompter is not None or dynamic is not None)
        length = self.prompt_length

        def insert(index: int, x: torch.Tensor) -> torch.Tensor:
            if index >= self.prompt_depth:
                return x
            tokens = self._prompt_tokens(self.visual_prompter, dynamic, index).to(x.dtype)
            tokens = tokens.expand(x.shape[0], -1, -1)
            return torch.cat([x if index == 0 else x[:, :-length], tokens], dim=1)

        out = visual(images, self.feature_layers, pre_block=insert if prompted else None, return_tokens=True)
        layers = [out.layers[layer][:, :-length] if prompted else out.layers[layer] for layer in self.feature_layers]
        return visual.project(out.cls), layers

    def encode_text(self, dynamic: torch.Tensor | None, class_names: Sequence[str] | None, batch: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (raw sentence embeddings [B, S, E], text features [B, 2, E] normalised, row 0 normal)."""
        text = self.clip.text
        ids = self._tokens_for(class_names, batch)
        sentences = ids.shape[1]
        ids = ids.reshape(batch * sentences, -1)
        eot = ids.argmax(-1)
        deep: dict[int, torch.Tensor] = {}
        if self.text_prompts_on and (self.text_prompter is not None or dynamic is not None):
            for block in range(1, self.prompt_depth):  # block 0 is not prompted (static[0] is unused)
                # Not rounded here: the official code rounds the prompts of every *sentence* to fp16
                # (``.half()`` on the [sentences, P, C] tokens), so in backward each sentence's gradient
                # is rounded before the sum over sentences. Rounding once before the expansion gives
                # the same values but rounds only the summed gradient.
                tokens = self._prompt_tokens(self.text_prompter, dynamic, block, round_fp16=False)
                tokens = tokens.expand(batch, -1, -1) if tokens.dim() == 2 else tokens
                tokens = tokens[:, None].expand(-1, sentences, -1, -1)
                deep[block] = tokens.reshape(batch * sentences, *tokens.shape[2:])
        embeddings = text(text.token_embedding(ids), eot, deep_prompts=deep or None,
                          round_deep_prompts_to_fp16=self.round_prompts_to_fp16).reshape(batch, sentences, -1)
        normalised = F.normalize(embeddings.float(), dim=-1)
        n_normal = len(self.states[0]) * len(self.templates)
        means = torch.stack([normalised[:, :n_normal].mean(1), normalised[:, n_normal:].mean(1)], dim=1)
        # Officially normalised per class, then once more over the embedding axis: same thing.
        return embeddings, F.normalize(F.normalize(means, dim=-1), dim=-1)

    # ------------------------------------------------------------------ heads
    def compute(self, images: torch.Tensor, class_names: Sequence[str] | None = None,
                hsf_labels: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None) -> AdaCLIPOutput:
        """Run everything up to the patch logits and the image probabilities, with autograd for
        the learnable parts. ``hsf_labels`` [B, n] (or a function of the k-means input [B, n, L*E])
        replaces the k-means labels (parity tests)."""
        batch = images.shape[0]
        frozen, dyn_visual, dyn_text = self.dynamic_prompts(images)
        pooled, tokens = self.encode_image(images, dyn_visual)
        embeddings, text = self.encode_text(dyn_text, class_names, batch)
        patches = [F.normalize(head(layer[:, 1:]), dim=-1) for head, layer in zip(
            self.patch_token_layer.head, tokens, strict=True)]
        cls = F.normalize(self.cls_token_layer.head[0](pooled), dim=-1)
        text_t = text.transpose(1, 2).to(cls.dtype)
        # (scale * features) @ text, in this order as officially (``100.0 * x @ t`` binds so).
        logits = [torch.bmm(self.logit_scale * patch, text_t.to(patch.dtype)) for patch in patches]
        hsf_input = hsf_feature = None
        if self.hsf is not None:
            selected = self.hsf.select(patches, logits)
            hsf_feature, hsf_labels = self.hsf.cluster_feature(selected, hsf_labels)
            fused = F.normalize(self.hsf.alpha * hsf_feature + (1 - self.hsf.alpha) * cls, dim=-1)
            hsf_input = torch.cat(selected, dim=-1)
        else:
            fused, hsf_labels = cls, None
        probs = torch.bmm(self.logit_scale * fused[:, None], text_t)[:, 0].softmax(-1)
        return AdaCLIPOutput(frozen, dyn_visual, dyn_text, tokens, pooled, embeddings, text, patches, cls, logits,
                             hsf_input, hsf_labels, hsf_feature, probs, self.grid_size(images))

    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        patch = self.clip.visual.patch_size
        return images.shape[-2] // patch, images.shape[-1] // patch

    def _to_grid(self, logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return logits.transpose(1, 2).reshape(logits.shape[0], logits.shape[2], *grid)

    def upsampled_logits(self, output: AdaCLIPOutput, size: tuple[int, int]) -> list[torch.Tensor]:
        """Per layer, the logits [B, 2, H, W] upsampled bilinearly (``align_corners=True``)."""
        return [F.interpolate(self._to_grid(lg, output.grid), size=size, mode="bilinear", align_corners=True)
                for lg in output.patch_logits]

    def unsmoothed_map(self, output: AdaCLIPOutput, size: tuple[int, int]) -> torch.Tensor:
        """Inference map [B, H, W]: softmax of the layer-mean of the upsampled logits,
        ``(p_anomalous + 1 - p_normal) / 2``. The mean is taken on the patch grid and upsampled
        once (interpolation is linear: same numbers, a quarter of the work)."""
        mean = torch.stack(output.patch_logits).mean(0)
        up = F.interpolate(self._to_grid(mean, output.grid), size=size, mode="bilinear", align_corners=True)
        probs = up.softmax(1)
        return (probs[:, 1] + 1 - probs[:, 0]) / 2

    def training_outputs(self, images: torch.Tensor, class_names: Sequence[str] | None = None,
                         hsf_labels: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, list[torch.Tensor], AdaCLIPOutput]:
        """-> (image probabilities [B, 2], per-layer softmax maps [B, 2, H, W], all pieces)."""
        output = self.compute(images, class_names, hsf_labels)
        maps = [up.softmax(1) for up in self.upsampled_logits(output, images.shape[-2:])]
        return output.image_probs, maps, output

    def forward(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> InferenceBatch:
        """Images [B, 3, H, W] (CLIP-normalised) -> pred_score [B], anomaly_map [B, H, W] (smoothed)."""
        output = self.compute(images, class_names)
        anomaly_map = self.blur(self.unsmoothed_map(output, images.shape[-2:]))
        return InferenceBatch(pred_score=output.image_probs[:, 1], anomaly_map=anomaly_map)
