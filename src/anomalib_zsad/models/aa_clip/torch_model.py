"""AA-CLIP (Ma et al., CVPR 2025) as a plain ``nn.Module``: image -> (score, anomaly map).

Data flow, as the official code at commit 53db195 (README.md lists every difference):
* text: class sentences -> CLIP text tower with residual adapters after the first blocks ->
  ``ln_final`` at the end token -> the adapter's own projection (LeakyReLU), not CLIP's
  ``text_projection``; per state the mean of the unit sentence features, re-normalised ->
  anchors ``T`` [E, 2] (normal, anomalous);
* image: CLIP vision tower with residual adapters after the first blocks; the patch tokens of
  four levels through ``ln_post`` and one projection per level -> unit patch features; the last
  level through a detection projection, unit per token, averaged -> ``det`` (not re-normalised);
* score: ``((det @ T)[anomalous] + 1) / 2``;
* map: per level ``(s_a + 1 - s_n) / 2`` of the 100-scaled similarities on the patch grid,
  summed over levels, smoothed there (kornia Gaussian, reflect border), bilinearly upsampled
  with ``align_corners=True``.
Training has two stages (text adapter with a V-V "surgery" tower, then image adapter); the
pieces each stage needs are here, the losses in ``loss.py``, the schedule in the Lightning model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from anomalib.models.components.filters import GaussianBlur2d
from torch import nn

from anomalib_zsad.clip import ClipModel, quarter_blocks, tokenize
from anomalib_zsad.models.components.text_cache import TextFeatureCache

from .adapters import AdapterHook, ImageAdapter, text_adapter, xavier_init_
from .prompts import describe_class, state_sentences

IMAGE_SCORES = ("text", "map_max")


default_levels = quarter_blocks  # the ends of the tower's four quarters (6, 12, 18, 24 of ViT-L)


def scaled_depth(official: int, official_depth: int, depth: int) -> int:
    """An official block count for a 24-block (vision) / 12-block (text) tower, scaled to ``depth``."""
    return max(1, min(depth, round(official * depth / official_depth)))


class AACLIPModel(nn.Module):
    """AA-CLIP around a frozen :class:`ClipModel`; only ``text_adapter``/``image_adapter`` learn.

    Args:
        clip: the CLIP (frozen here). The official code runs OpenAI's ViT-L/14@336 weights with
            exact GELU and the antialiased bicubic pos-embed resize: load it with
            ``activation="gelu", pos_embed_mode="bicubic_antialias"`` to reproduce it.
        text_adapt_weight / image_adapt_weight: residual weight ``w`` of the adapters (0.1).
        text_adapt_until: text blocks followed by an adapter; None = 3 of 12, scaled to depth.
        image_adapt_until: vision blocks followed by an adapter; None = 6 of 24, scaled.
        levels: 1-based vision blocks whose patch tokens make maps; None = the four quarters.
        relu: a LeakyReLU after the image projections (official ``--relu``, off).
        surgery_from: first vision block whose attention is replaced by V-V in stage 1;
            None = ``depth // 4`` (the official ``surgery_until_layer=20`` = blocks 6..24 of 24).
        surgery_vv_across_batch: the official stage-1 V-V attention across the *batch* axis
            (an LND/NLD layout mix-up, results depend on the batch); False = over the tokens.
        similarity_scale: the fixed 100 of the maps (CLIP's learnt scale is unused).
        blur_kernel_size / blur_sigma: patch-grid smoothing (official industrial 7 / 1,
            medical 9 / 1.5); kernel 1 turns it off.
        image_score: ``"text"`` (``det`` against the anchors, default) or ``"map_max"`` (the
            official medical score, max of the map). The official industrial score averages
            both after a per-class min-max normalisation over the test set, which a model cannot
            do image by image: see :func:`~anomalib_zsad.models.aa_clip.evaluation.official_metrics`.
        class_name: the object name put in the prompts at inference.
        real_names: class name -> description to use instead of the name (the official
            ``REAL_NAMES``, e.g. ``OFFICIAL_REAL_NAMES["VisA"]``); None = the names.
        seed: initialisation of the adapters (xavier uniform, a private generator).
    """

    def __init__(self, clip: ClipModel, *, text_adapt_weight: float = 0.1, image_adapt_weight: float = 0.1,
                 text_adapt_until: int | None = None, image_adapt_until: int | None = None,
                 levels: Sequence[int] | None = None, relu: bool = False, surgery_from: int | None = None,
                 surgery_vv_across_batch: bool = False, similarity_scale: float = 100.0,
                 blur_kernel_size: int = 7, blur_sigma: float = 1.0, image_score: str = "text",
                 class_name: str = "object", real_names: Mapping[str, str] | None = None, seed: int = 0) -> None:
        super().__init__()
        if image_score not in IMAGE_SCORES:
            msg = f"image_score must be one of {IMAGE_SCORES}, got {image_score!r}"
            raise ValueError(msg)
        self.clip = clip.requires_grad_(False).eval()
        arch = clip.arch
        depth, text_depth = arch.vision_layers, arch.text_layers
        self.levels = sorted(levels) if levels else default_levels(depth)
        if any(not 1 <= level <= depth for level in self.levels):
            msg = f"levels must be in 1..{depth}, got {self.levels}"
            raise ValueError(msg)
        self.text_adapt_weight = text_adapt_weight
        self.image_adapt_weight = image_adapt_weight
        text_until = text_adapt_until if text_adapt_until is not None else scaled_depth(3, 12, text_depth)
        image_until = image_adapt_until if image_adapt_until is not None else scaled_depth(6, 24, depth)
        self.surgery_from = surgery_from if surgery_from is not None else max(1, depth // 4)
        self.surgery_vv_across_batch = surgery_vv_across_batch
        self.similarity_scale = similarity_scale
        self.image_score = image_score
        self.class_name = class_name
        self.real_names = dict(real_names) if real_names else None

        self.text_adapter = text_adapter(arch.text_width, arch.embed_dim, text_until)
        self.image_adapter = ImageAdapter(arch.vision_width, arch.embed_dim, image_until, len(self.levels), relu)
        generator = torch.Generator().manual_seed(seed)
        xavier_init_(self.text_adapter, generator)
        xavier_init_(self.image_adapter, generator)
        # kornia's blur on the patch grid (reflect border, window in samples), as the official test code
        self.blur = GaussianBlur2d(sigma=blur_sigma, channels=1, kernel_size=blur_kernel_size)
        # Anchors for inference, computed once per class and adapter state, frozen for export.
        self.text_cache = TextFeatureCache(self.class_text_embedding, self.text_adapter.parameters)

    def train(self, mode: bool = True) -> AACLIPModel:
        """CLIP stays in eval mode, as in the official code (it never calls ``.train()``)."""
        super().train(mode)
        self.clip.eval()
        return self

    # ------------------------------------------------------------------ text
    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [P, L] -> adapted, projected sentence features [P, E], not normalised.

        The sequence is cut after the longest sentence's end token: with causal attention the
        padding after it cannot change the end tokens' features (the official code runs all 77).
        """
        length = int(token_ids.argmax(-1).max()) + 1
        ids = token_ids[:, :length]
        text = self.clip.text
        hook = AdapterHook(self.text_adapter[:-1], self.text_adapt_weight)
        features = text(text.token_embedding(ids), ids.argmax(-1), post_block=hook, project=False)
        return self.text_adapter[-1](features)

    def class_text_embedding(self, class_name: str) -> torch.Tensor:
        """The two anchors of one class, [E, 2] (column 0 normal, 1 anomalous), with autograd."""
        normal, anomalous = state_sentences(describe_class(class_name, self.real_names))
        device = self.text_adapter[-1].fc[0].weight.device
        features = F.normalize(self.encode_text(tokenize(normal + anomalous).to(device)), dim=-1)
        means = [features[: len(normal)].mean(0), features[len(normal):].mean(0)]
        return torch.stack([F.normalize(m, dim=-1) for m in means], dim=1)

    def batch_text_embeddings(self, class_names: Sequence[str]) -> torch.Tensor:
        """Anchors of each sample's class, [B, E, 2]; each distinct class is encoded once."""
        unique = list(dict.fromkeys(class_names))
        table = {name: self.class_text_embedding(name) for name in unique}
        return torch.stack([table[name] for name in class_names])

    def anchors(self, class_name: str) -> torch.Tensor:
        """Anchors of one class for inference, [E, 2]: they depend only on the text adapter and
        the name, so each is computed once (until the adapter changes)."""
        return self.text_cache.get(class_name)

    def text_features_cached(self) -> torch.Tensor:
        """Anchors of ``class_name`` [E, 2]. After :meth:`freeze_text_features` (before export) the
        stored buffer is used as it is, so no text tower is traced."""
        return self.text_cache.current(self.class_name)

    def freeze_text_features(self) -> None:
        """Store the anchors of ``class_name`` as a constant buffer (for export and deployment)."""
        self.text_cache.freeze(self.class_name)

    def set_class_name(self, class_name: str) -> None:
        """Change the object name of the inference prompts (and unfreeze the anchors)."""
        self.class_name = class_name
        self.text_cache.unfreeze()

    # ----------------------------------------------------------------- image
    def encode_image(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """-> (unit patch features per level [B, h*w, E], detection feature ``det`` [B, E])."""
        visual = self.clip.visual
        hook = AdapterHook(self.image_adapter.layer_adapters, self.image_adapt_weight)
        tokens = visual(images, self.levels, post_block=hook)
        seg = [F.normalize(proj(visual.ln_post(tokens.layers[level][:, 1:])), dim=-1)
               for proj, level in zip(self.image_adapter.seg_proj, self.levels, strict=True)]
        last = visual.ln_post(tokens.layers[self.levels[-1]][:, 1:])
        det = F.normalize(self.image_adapter.det_proj(last), dim=-1).mean(1)
        return seg, det

    @torch.no_grad()
    def surgery_features(self, images: torch.Tensor
                         ) -> tuple[list[torch.Tensor], torch.Tensor, dict[int, torch.Tensor]]:
        """Stage 1's frozen visual side -> (patch features per level [B, h*w, E], unit class
        feature [B, E], raw surgery tokens per level [B, 1 + h*w, C]).

        The patch features are ``normalize(proj(ln_post(tok))) + cls``, the class feature coming
        from the plain tower; the sum is not re-normalised (as the official code). No adapter
        is used: stage 1 trains the text side only.
        """
        visual = self.clip.visual
        mode = "replace_batch" if self.surgery_vv_across_batch else "replace"
        tokens = visual(images, self.levels, vv_from=self.surgery_from, vv_mode=mode)
        cls = F.normalize(visual.project(visual(images).cls), dim=-1)
        features = [F.normalize(visual.project(tokens.layers[level][:, 1:]), dim=-1) + cls[:, None]
                    for level in self.levels]
        return features, cls, tokens.layers

    # ------------------------------------------------------------------ maps
    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        return self.clip.visual.grid_size(images)

    def patch_logits(self, features: torch.Tensor, text: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Scaled similarities of patches [B, h*w, E] and anchors ([E, 2] or [B, E, 2]) -> [B, 2, h, w]."""
        sims = self.similarity_scale * (features @ text)
        return sims.transpose(1, 2).reshape(sims.shape[0], 2, *grid)

    @staticmethod
    def raw_map(logits: torch.Tensor) -> torch.Tensor:
        """``(s_anomalous + 1 - s_normal) / 2`` of [B, 2, h, w] logits -> [B, h, w]."""
        return (logits[:, 1] + 1 - logits[:, 0]) / 2

    @staticmethod
    def image_text_score(det: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``((det @ T)[anomalous] + 1) / 2`` for anchors [E, 2] or [B, E, 2]: [B]."""
        sims = det @ text if text.dim() == 2 else (det[:, None] @ text)[:, 0]
        return (sims[:, 1] + 1) / 2

    # -------------------------------------------------------------- training
    def stage1_outputs(self, images: torch.Tensor, class_names: Sequence[str]) -> dict:
        """What stage 1's loss needs: ``level_logits`` [B, 2, h, w] per level and the anchors
        ``text`` [B, E, 2] (with autograd through the text adapter only), plus the intermediate
        ``patch_features``, ``cls`` and ``surgery_tokens``."""
        features, cls, surgery = self.surgery_features(images)
        text = self.batch_text_embeddings(class_names)
        grid = self.grid_size(images)
        logits = [self.patch_logits(f, text, grid) for f in features]
        return {"level_logits": logits, "text": text, "patch_features": features, "cls": cls,
                "surgery_tokens": surgery}

    def stage2_outputs(self, images: torch.Tensor, class_names: Sequence[str]) -> dict:
        """What stage 2's loss needs: ``level_logits`` per level and ``cls_logits`` [B, 2]
        (raw ``det @ T_b``), with autograd through the image adapter only; also ``seg``, ``det``
        and the (fixed) anchors ``text``."""
        with torch.no_grad():
            text = self.batch_text_embeddings(class_names)
        seg, det = self.encode_image(images)
        grid = self.grid_size(images)
        logits = [self.patch_logits(f, text, grid) for f in seg]
        cls_logits = (det[:, None] @ text)[:, 0]
        return {"level_logits": logits, "cls_logits": cls_logits, "seg": seg, "det": det, "text": text}

    def forward(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> InferenceBatch:
        """Images [B, 3, H, W] (CLIP-normalised) -> pred_score [B], anomaly_map [B, H, W].

        ``class_names`` (one per image) picks each image's anchors; None, or frozen anchors,
        = those of ``class_name`` (an exported graph has the images as its only input).
        """
        if class_names is None or self.text_cache.is_frozen:
            text = self.text_features_cached()
        else:
            text = torch.stack([self.anchors(name) for name in class_names])
        with torch.no_grad():
            seg, det = self.encode_image(images)
        return self.head(seg, det, text, images.shape[-2:])

    def head(self, seg: list[torch.Tensor], det: torch.Tensor, text: torch.Tensor, image_size: Sequence[int]
             ) -> InferenceBatch:
        """Features of :meth:`encode_image` and anchors ([E, 2] or [B, E, 2]) -> the outputs."""
        score = self.image_text_score(det, text)
        patch = self.clip.visual.patch_size
        grid = (image_size[0] // patch, image_size[1] // patch)
        # Blur and bilinear upsampling are linear: sum the levels on the patch grid first, then
        # smooth and upsample once (the official code does it per level; same numbers).
        grid_map = torch.stack([self.raw_map(self.patch_logits(f, text, grid)) for f in seg]).sum(0)
        anomaly_map = F.interpolate(self.blur(grid_map[:, None]), size=tuple(image_size), mode="bilinear",
                                    align_corners=True)[:, 0]
        if self.image_score == "map_max":
            score = anomaly_map.amax(dim=(-2, -1))
        return InferenceBatch(pred_score=score, anomaly_map=anomaly_map)
