"""Bayes-PFL (Qu et al., CVPR 2025) as a plain ``nn.Module``: image -> (score, anomaly map).

Data flow, as the official code at commit 8f155a0 (README.md lists every difference):

* image: CLIP vision tower -> global embedding ``ln_post(cls) @ proj`` and the raw patch tokens
  of four layers (the ends of the tower's quarters: 6, 12, 18, 24 of ViT-L);
* prompts: a bank of ``prompt_num`` prompts, each ``P`` context + ``Q`` state vectors put in place
  of ``X`` in ``"X <class name>"``. A planar flow conditioned on the image gives R samples added
  to the context vectors; two image-agnostic flows give R samples added to the normal/abnormal
  state vectors -> ``2 x R x prompt_num`` text embeddings per image;
* score: ``softmax`` over {normal, abnormal} of ``exp(T_img) cos(class_mapping(text), g)`` with
  ``g`` the global embedding (stage 1) or ``image_mapping(g + fuse(tokens))`` (stage 2),
  averaged over samples and prompts;
* map: per layer the text is refined by residual cross-attention over the layer's patches, the
  patch/text logits ``exp(T_pix) cos`` are up-sampled (bilinear, ``align_corners=True``), turned
  into abnormal probabilities and averaged over layers, samples and prompts; Gaussian sigma 8.

Monte-Carlo inference is processed ``sample_chunk_size`` samples at a time (bounded memory;
the result does not depend on the chunk size). Noise comes from a private generator or is
injected (:mod:`.noise`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_zsad.clip import ClipModel, end_token_span, quarter_blocks
from anomalib_zsad.models.components import GaussianBlur

from .flows import ContextFlow, Decoder, FlowSample, GaussianEncoder, StateFlow
from .loss import dice_loss, flow_kl, focal_loss, orthogonal_loss, reconstruction_loss
from .noise import PromptNoise, draw_noise
from .prompts import class_token_ids, encode_prompt_bank
from .rca import GlobalFeature, ResidualCrossAttention

default_feature_layers = quarter_blocks  # the ends of the tower's four quarters (6, 12, 18, 24 of ViT-L)


class BayesPFLModel(nn.Module):
    """Bayes-PFL around a frozen :class:`ClipModel`.

    Parameter names follow the official ``Context_Prompting`` (so released checkpoints load
    through :func:`.checkpoint.load_official_checkpoint`).

    Args:
        clip: the CLIP; frozen here. The official code runs OpenAI weights with exact GELU:
            build it with ``load_clip(..., activation="gelu")`` for the official numbers.
        class_name: class word used when ``forward`` gets no per-image names (``"object"``).
        prompt_num: prompts in the bank (official ``B_p`` = 3).
        context_length: learnt context vectors per prompt (``P`` = 5).
        state_length: learnt state vectors per prompt (``Q`` = 5).
        num_flows: planar flows per distribution (``K`` = 10).
        num_samples: Monte-Carlo samples at inference (``R``; official test 10).
        sample_chunk_size: samples processed at once at inference (memory bound).
        feature_layers: 1-based vision blocks; None = the tower's quarters (6, 12, 18, 24 of 24).
        rca_heads: heads of the residual cross-attention (official 4).
        sigma: Gaussian smoothing of the output map (official metric code: 8; 0 = off).
        score_alpha: ``pred_score = alpha * p_image + (1 - alpha) * top-k mean of the map``
            (official 0.5; the official code min-max normalises both over the test set first,
            see :func:`.postprocess.official_final_scores`). 1.0 = the image probability alone.
        topk: pixels of the top-k mean (official 2000 at 518 px, fixed here: not tuned per class).
        inference_stage: 2 (official test: image classifier with ``fuse``/``image_mapping``) or
            1 (the global embedding as it is; use it when stage 2 was never trained).
        seed: seed of the Monte-Carlo noise (inference) and of the training draws.
        init_seed: seed of the parameter initialisation (official initialisers).
        truncate_text: run the text tower only up to the last end token of the prompts (13 of
            the 77 positions for the default prompts). Causal attention makes that exact up to float
            rounding; False runs the whole context, as the official code does.
    """

    def __init__(
        self,
        clip: ClipModel,
        class_name: str = "object",
        prompt_num: int = 3,
        context_length: int = 5,
        state_length: int = 5,
        num_flows: int = 10,
        num_samples: int = 10,
        sample_chunk_size: int = 5,
        feature_layers: Sequence[int] | None = None,
        rca_heads: int = 4,
        sigma: float = 8.0,
        score_alpha: float = 0.5,
        topk: int = 2000,
        inference_stage: int = 2,
        seed: int = 0,
        init_seed: int = 0,
        truncate_text: bool = True,
    ) -> None:
        super().__init__()
        arch = clip.arch
        if inference_stage not in {1, 2}:
            msg = f"inference_stage must be 1 or 2, got {inference_stage}"
            raise ValueError(msg)
        self.clip = clip.requires_grad_(False)
        depth = len(clip.visual.blocks)
        self.feature_layers = list(feature_layers) if feature_layers else default_feature_layers(depth)
        self.class_name = class_name
        self.prompt_num, self.context_length, self.state_length = prompt_num, context_length, state_length
        self.num_samples = num_samples
        self.sample_chunk_size = max(1, sample_chunk_size)
        self.score_alpha, self.topk = score_alpha, topk
        self.seed = seed
        embed, vision, text = arch.embed_dim, arch.vision_width, arch.text_width
        layers = len(self.feature_layers)

        self.prompt_context = nn.Parameter(torch.zeros(prompt_num, context_length, text))
        self.prompt_state_normal = nn.Parameter(torch.zeros(prompt_num, state_length, text))
        self.prompt_state_abnormal = nn.Parameter(torch.zeros(prompt_num, state_length, text))
        self.temperature_pixel = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.temperature_image = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # Official sizes use one width for the text tokens and the embeddings (it requires text width
        # == embed dim). Where they differ: flow samples have the text width (they are added to the
        # prompt vectors), everything that meets the text/image embeddings has the embed dim.
        self.context_encoder = GaussianEncoder(embed, vision // 2, text)
        self.context_decoder = Decoder(text, vision // 2, embed)
        self.state_encoder = GaussianEncoder(embed, vision // 2, text)  # shared by both state flows
        self.state_decoder = Decoder(text, vision // 2, embed)
        self.PFL_context = ContextFlow(embed, num_flows, text)
        self.PFL_normal = StateFlow(embed, num_flows, text)
        self.PFL_abnormal = StateFlow(embed, num_flows, text)
        self.fuse = GlobalFeature(vision, embed, layers)
        self.RCA = ResidualCrossAttention(vision, embed, layers, rca_heads)
        self.class_mapping = nn.Linear(embed, embed)
        self.image_mapping = nn.Linear(embed, embed)
        self.blur = GaussianBlur(sigma)
        # A Python int (a branch, not data: exported graphs keep one path), saved as extra state.
        self.inference_stage = inference_stage
        self.register_buffer("class_tokens", class_token_ids([class_name], arch.context_length, self.prompt_length),
                             persistent=False)
        self._token_cache: dict[str, torch.Tensor] = {}
        self.truncate_text = truncate_text
        # Python ints (static lengths in an exported graph): the default class's, and per class name.
        self._default_text_length = self._sequence_length(self.class_tokens)
        self._text_lengths: dict[str, int] = {}
        # token embeddings of the default class sentence, stored by freeze_text_features() for export
        self.register_buffer("frozen_class_embeddings", torch.empty(0), persistent=False)
        self.reset_parameters(init_seed)
        self.reseed(seed)

    # ------------------------------------------------------------------ set-up
    def get_extra_state(self) -> dict:
        return {"inference_stage": self.inference_stage}

    def set_extra_state(self, state: dict) -> None:
        self.inference_stage = int(state.get("inference_stage", self.inference_stage))

    @property
    def prompt_length(self) -> int:
        return self.context_length + self.state_length

    def reset_parameters(self, seed: int = 0) -> None:
        """Official initialisation, drawn from a private generator: Linear N(0, 0.02) with zero
        bias, state-flow parameters N(0, 1), prompts truncated N(0 / +0.5 / -0.5, 0.02), the RCA's
        Conv1d PyTorch's default."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, module in self.named_modules():
                if name.startswith("clip"):
                    continue
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, 0.0, 0.02, generator=gen)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
            conv = self.RCA.q_proj_pre
            nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=gen)
            bound = 1 / math.sqrt(conv.weight.shape[1])
            nn.init.uniform_(conv.bias, -bound, bound, generator=gen)
            for flow in (self.PFL_normal, self.PFL_abnormal):
                for p in (flow.amor_u, flow.amor_w, flow.amor_b, flow.state):
                    p.copy_(torch.randn(p.shape, generator=gen))
            for p, mean in ((self.prompt_context, 0.0), (self.prompt_state_normal, 0.5),
                            (self.prompt_state_abnormal, -0.5)):
                nn.init.trunc_normal_(p, mean=mean, std=0.02, generator=gen)
            self.temperature_pixel.fill_(math.log(1 / 0.07))
            self.temperature_image.fill_(math.log(1 / 0.07))

    def reseed(self, seed: int) -> None:
        """Redraw the inference noise (R draws, common to all images) and the training generator."""
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        noise = draw_noise(gen, self.num_samples, self.clip.arch.text_width)
        device = self.prompt_context.device
        for name, value in (("eps_context", noise.context), ("eps_normal", noise.normal),
                            ("eps_abnormal", noise.abnormal)):
            self.register_buffer(name, value.to(device), persistent=False)
        self.train_generator = torch.Generator().manual_seed(seed + 1)

    def set_num_samples(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.reseed(self.seed)

    def inference_noise(self) -> PromptNoise:
        return PromptNoise(self.eps_context, self.eps_normal, self.eps_abnormal)

    def freeze_text_features(self) -> None:
        """Store the default class sentence's token embeddings as a buffer before export.

        The text itself depends on the image (image-specific prompts), so the text tower stays in
        the exported graph; this only keeps the tokenizer's 49408-row embedding table out of it.
        Any later call with explicit ``class_names`` still embeds those names as usual.
        """
        with torch.no_grad():
            self.frozen_class_embeddings = self.clip.text.token_embedding(self.class_tokens).detach()

    def token_ids(self, class_names: Sequence[str] | None, batch: int) -> torch.Tensor:
        """[B, L] class-sentence ids; the default class's are a buffer (export-friendly)."""
        if class_names is None:
            return self.class_tokens.expand(batch, -1)
        if len(class_names) != batch:
            msg = f"{len(class_names)} class names for a batch of {batch}"
            raise ValueError(msg)
        return torch.stack([self._class_row(name) for name in class_names]).to(self.class_tokens.device)

    def _class_row(self, name: str) -> torch.Tensor:
        """One class sentence's ids [L], tokenised once, with its text length (a Python int) beside it."""
        if name not in self._token_cache:
            self._token_cache[name] = class_token_ids([name], self.class_tokens.shape[1], self.prompt_length)[0]
            self._text_lengths[name] = self._sequence_length(self._token_cache[name])
        return self._token_cache[name]

    def _sequence_length(self, token_ids: torch.Tensor) -> int:
        return end_token_span(token_ids, shift=self.prompt_length - 1)

    def text_length(self, class_names: Sequence[str] | None) -> int | None:
        """Positions the text tower runs for these class names (None: the whole context)."""
        if not self.truncate_text:
            return None
        if class_names is None:
            return self._default_text_length
        for name in class_names:
            self._class_row(name)
        return max(self._text_lengths[name] for name in class_names)

    # ------------------------------------------------------------------ building blocks
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (global embedding ``ln_post(cls) @ proj`` [B, E], raw patch tokens [B, N, Wv] per layer)."""
        visual = self.clip.visual
        last = len(visual.blocks)
        out = visual(images, self.feature_layers, return_tokens=last in self.feature_layers)
        return visual.project(out.cls), [out.layers[layer][:, 1:] for layer in self.feature_layers]

    def sample_context(self, image_features: torch.Tensor, eps: torch.Tensor) -> FlowSample:
        """``eps`` [B, S, E] -> image-specific flow sample with z [S, B, E]."""
        return self.PFL_context(image_features, self.context_encoder, eps.transpose(0, 1))

    def sample_states(self, eps_normal: torch.Tensor, eps_abnormal: torch.Tensor) -> tuple[FlowSample, FlowSample]:
        """``eps`` [S, E] each -> normal and abnormal flow samples with z [S, 1, E]."""
        return (self.PFL_normal(self.state_encoder, eps_normal[:, None]),
                self.PFL_abnormal(self.state_encoder, eps_abnormal[:, None]))

    def text_embeddings(self, token_ids: torch.Tensor, z_context: torch.Tensor, z_normal: torch.Tensor,
                        z_abnormal: torch.Tensor, normalize: bool = True, default_class: bool = False,
                        length: int | None = None) -> torch.Tensor:
        """[B, C, E] with C = 2 * S * prompt_num: the normal half first, index ``s * prompt_num + p``.

        ``z_context`` [B, S, E]; ``z_normal``/``z_abnormal`` [S, E]; ``length``: positions the text
        tower runs (:meth:`text_length`; None = the whole context).
        """
        states = torch.stack([self.prompt_state_normal, self.prompt_state_abnormal])
        frozen = self.frozen_class_embeddings if default_class and self.frozen_class_embeddings.numel() else None
        features = encode_prompt_bank(self.clip.text, token_ids, self.prompt_context, states, z_context,
                                      torch.stack([z_normal, z_abnormal]), frozen, length)
        features = features.flatten(1, 3)
        return F.normalize(features, dim=-1) if normalize else features

    def global_embedding(self, image_features: torch.Tensor, tokens: list[torch.Tensor], stage: int) -> torch.Tensor:
        """The image side of the classifier, normalised [B, E]."""
        if stage == 2:
            image_features = self.image_mapping(image_features + self.fuse(tokens))
        return F.normalize(image_features, dim=-1)

    def image_logits(self, text: torch.Tensor, global_embedding: torch.Tensor) -> torch.Tensor:
        """[B, C] ``exp(T_img) cos(class_mapping(text), g)``."""
        mapped = F.normalize(self.class_mapping(text), dim=-1)
        return self.temperature_image.exp() * (mapped @ global_embedding[:, :, None])[..., 0]

    def patch_features(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.RCA.patch_features(t, layer) for layer, t in enumerate(tokens)]

    def pixel_logits(self, text: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer: (RCA-updated text [B, C, E], logits [B, C, h, w])."""
        updated = self.RCA(text, patches)
        logits = self.temperature_pixel.exp() * patches @ updated.transpose(1, 2)  # [B, N, C]
        side = math.isqrt(patches.shape[1])
        return updated, logits.transpose(1, 2).reshape(text.shape[0], text.shape[1], side, side)

    # ------------------------------------------------------------------ inference
    def _chunk_scores(self, text: torch.Tensor, global_embedding: torch.Tensor, patches: list[torch.Tensor],
                      size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums over one chunk's channel pairs of p_abnormal: (image [B], map [B, H, W])."""
        half = text.shape[1] // 2
        logits = self.image_logits(text, global_embedding)
        image = torch.sigmoid(logits[:, half:] - logits[:, :half]).sum(1)
        pixel = None
        for layer_patches in patches:
            _, maps = self.pixel_logits(text, layer_patches)
            # softmax of two channels = sigmoid of their difference; up-sampling is linear, so the
            # difference is taken on the patch grid (half the up-sampling work, same numbers).
            diff = F.interpolate(maps[:, half:] - maps[:, :half], size=size, mode="bilinear", align_corners=True)
            part = torch.sigmoid(diff).sum(1)
            pixel = part if pixel is None else pixel + part
        return image, pixel

    def predict(self, images: torch.Tensor, class_names: Sequence[str] | None = None,
                noise: PromptNoise | None = None) -> dict[str, torch.Tensor]:
        """Image probability, raw and smoothed maps, top-k mean and the fused score."""
        with torch.no_grad():
            image_features, tokens = self.encode_image(images)
        return self.predict_from_features(image_features, tokens, (images.shape[-2], images.shape[-1]),
                                          class_names, noise)

    def predict_from_features(self, image_features: torch.Tensor, tokens: list[torch.Tensor],
                              size: tuple[int, int], class_names: Sequence[str] | None = None,
                              noise: PromptNoise | None = None) -> dict[str, torch.Tensor]:
        """:meth:`predict` after :meth:`encode_image` (``size``: the output map's size)."""
        batch = image_features.shape[0]
        noise = (noise or self.inference_noise()).to(image_features.device, image_features.dtype)
        eps_context = noise.context_for(batch)
        samples = eps_context.shape[1]
        token_ids, length = self.token_ids(class_names, batch), self.text_length(class_names)
        z_context = self.sample_context(image_features, eps_context).zk.transpose(0, 1)  # [B, S, E]
        normal, abnormal = self.sample_states(noise.normal, noise.abnormal)
        z_normal, z_abnormal = normal.zk[:, 0], abnormal.zk[:, 0]
        g = self.global_embedding(image_features, tokens, self.inference_stage)
        patches = self.patch_features(tokens)
        image_sum = image_features.new_zeros(batch)
        map_sum = image_features.new_zeros(batch, *size)
        for start in range(0, samples, self.sample_chunk_size):
            chunk = slice(start, start + self.sample_chunk_size)
            text = self.text_embeddings(token_ids, z_context[:, chunk], z_normal[chunk], z_abnormal[chunk],
                                        default_class=class_names is None, length=length)
            image, pixel = self._chunk_scores(text, g, patches, size)
            image_sum, map_sum = image_sum + image, map_sum + pixel
        pairs = samples * self.prompt_num
        image_prob = image_sum / pairs
        raw_map = map_sum / (pairs * len(patches))
        k = min(self.topk, raw_map[0].numel())
        topk_mean = raw_map.flatten(1).topk(k, dim=1).values.mean(1)
        alpha = self.score_alpha
        return {"image_prob": image_prob, "raw_map": raw_map, "anomaly_map": self.blur(raw_map),
                "topk_mean": topk_mean, "pred_score": alpha * image_prob + (1 - alpha) * topk_mean}

    def forward(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> InferenceBatch:
        """Images [B, 3, H, W] (CLIP-normalised) -> pred_score [B], anomaly_map [B, H, W].

        Without autograd: a graph kept across the Monte-Carlo chunks would undo the memory bound
        (call :meth:`predict` for gradients)."""
        with torch.no_grad():
            out = self.predict(images, class_names)
        return InferenceBatch(pred_score=out["pred_score"], anomaly_map=out["anomaly_map"])

    # ------------------------------------------------------------------ training
    def training_outputs(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor | None = None,
        class_names: Sequence[str] | None = None,
        stage: int = 1,
        noise: PromptNoise | None = None,
        prompt_index: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """One official training step's forward: loss terms and intermediates.

        One flow draw per image (context) and one per state; ONE prompt of the bank (random,
        ``prompt_index``) enters the classification and segmentation losses. Stage 1 optimises
        ``CE + sum_layers(focal + dice) + 0.01 KL + orthogonal``; stage 2 only ``CE`` (its
        optimiser holds ``fuse``/``class_mapping``/``image_mapping``). ``masks`` None (a source
        without masks) drops the segmentation terms.
        """
        batch, dim = images.shape[0], self.clip.arch.text_width
        if noise is None:
            noise = draw_noise(self.train_generator, 1, dim, batch)
        noise = noise.to(images.device, images.dtype)
        eps_context = noise.context.reshape(batch, 1, dim)
        if prompt_index is None:
            prompt_index = int(torch.randint(0, self.prompt_num, (1,), generator=self.train_generator))
        with torch.no_grad():
            image_features, tokens = self.encode_image(images)
        token_ids = self.token_ids(class_names, batch)
        context = self.sample_context(image_features, eps_context)
        normal, abnormal = self.sample_states(noise.normal.reshape(1, dim), noise.abnormal.reshape(1, dim))
        kl = torch.stack([flow_kl(s, batch) for s in (context, normal, abnormal)])
        rec = reconstruction_loss(self.PFL_context.reconstruct(context.zk[0], self.context_decoder), image_features)
        text = self.text_embeddings(token_ids, context.zk.transpose(0, 1), normal.zk[:, 0], abnormal.zk[:, 0],
                                    length=self.text_length(class_names))
        logits = self.image_logits(text, self.global_embedding(image_features, tokens, stage))
        k, pn = prompt_index, self.prompt_num
        loss_class = F.cross_entropy(torch.stack([logits[:, k], logits[:, k + pn]], dim=1), labels.long())
        out = {"image_features": image_features, "tokens": tokens, "text": text, "logits": logits, "kl": kl, "rec": rec,
               "flows": (context, normal, abnormal), "loss_class": loss_class, "prompt_index": torch.tensor(k)}
        if stage == 2:
            out["loss"] = loss_class
            return out
        out["loss_orthogonal"] = orthogonal_loss(text, pn)
        out["loss_dist_reg"] = 0.01 * kl[0] + 0.01 * kl[1] + 0.01 * kl[2]
        rca, maps, focal, dice = [], [], [], []
        for patches in self.patch_features(tokens):
            updated, layer_maps = self.pixel_logits(text, patches)
            rca.append(updated)
            maps.append(layer_maps)
            if masks is not None:
                pair = torch.stack([layer_maps[:, k], layer_maps[:, k + pn]], dim=1)
                probs = F.interpolate(pair, size=masks.shape[-2:], mode="bilinear", align_corners=True).softmax(1)
                focal.append(focal_loss(probs, masks))
                dice.append(dice_loss(probs, masks))
        out.update(rca_text=rca, maps=maps)
        loss = loss_class
        if masks is not None:
            out["loss_focal"], out["loss_dice"] = torch.stack(focal), torch.stack(dice)
            loss = loss + (sum(focal) + sum(dice))
        out["loss"] = loss + out["loss_dist_reg"] + out["loss_orthogonal"]
        return out
