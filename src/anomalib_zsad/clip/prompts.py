"""Fixed prompt ensembles (state words x templates), written once for every method that uses them.

A prompt ensemble turns a class name into two text features, "normal" and "anomalous": every
state word is put into every template, each sentence is encoded by the CLIP text tower, the
normalised embeddings of one side are averaged and normalised again. VAND/APRIL-GAN uses this
as its whole text side; WinCLIP, CLIP-AC, AdaCLIP and AA-CLIP use variants (their words and
templates go here, under their own names, when those methods are added).

Orders matter for parity only through float summation order, but they are kept as the official
code writes them anyway (state-major sentences: all templates of state 0, then of state 1, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812

from .model import ClipModel
from .tokenizer import tokenize

# --- VAND / APRIL-GAN (prompt_ensemble.py of github.com/ByChelsea/VAND-APRIL-GAN) -----------------

#: Normal state words; ``{}`` is the class name.
VAND_NORMAL_STATES: tuple[str, ...] = (
    "{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
    "{} without damage",
)
#: Anomalous state words.
VAND_ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage",
)
#: The 35 sentence templates (CLIP's ImageNet templates plus "... in the scene" ones), in the
#: official order.
VAND_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "a low resolution photo of a {}.",
    "a photo of a large {}.", "a blurry photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a photo of the small {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.", "this is one {} in the scene.",
)


# --- AdaCLIP (TextEmbebddingLayer of github.com/caoyunkang/AdaCLIP) -----------------------------

#: AdaCLIP uses VAND's state words and the first four of its templates.
ADACLIP_NORMAL_STATES = VAND_NORMAL_STATES
ADACLIP_ANOMALOUS_STATES = VAND_ANOMALOUS_STATES
ADACLIP_TEMPLATES: tuple[str, ...] = VAND_TEMPLATES[:4]


# --- CLIP and CLIP-AC, the baselines of AnomalyCLIP (Zhou et al., ICLR 2024, Appendix A.2) ---------

#: CLIP's two plain prompts, word for word as the paper gives them ("A photo of a normal [cls]" and
#: "A photo of an anomalous [cls]", no full stop); ``{}`` is the class name.
CLIP_NORMAL_PROMPT = "A photo of a normal {}"
CLIP_ANOMALOUS_PROMPT = "A photo of an anomalous {}"
#: CLIP-AC's two classes, put into every template of :data:`CLIP_IMAGENET_TEMPLATES`.
CLIP_AC_NORMAL_STATES: tuple[str, ...] = ("normal {}",)
CLIP_AC_ANOMALOUS_STATES: tuple[str, ...] = ("anomalous {}",)
#: The 80 prompt templates that CLIP recommends for ImageNet (Radford et al., 2021; the list of
#: OpenAI's ``Prompt_Engineering_for_ImageNet.ipynb``, open_clip's ``OPENAI_IMAGENET_TEMPLATES``), in order.
CLIP_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)


def ensemble_sentences(class_name: str, states: Sequence[str], templates: Sequence[str]) -> list[str]:
    """``[template.format(state.format(class_name)) for state in states for template in templates]``."""
    return [template.format(state.format(class_name)) for state in states for template in templates]


def encode_sentences(clip: ClipModel, sentences: Sequence[str], trim: bool = True) -> torch.Tensor:
    """Unnormalised text embeddings [n, E] of ``sentences``.

    ``trim`` drops the padding columns after the longest sentence's end token before the text
    tower runs: the tower is causal, so the end token never sees them and the result is the same
    (to float rounding) at a fraction of the cost (about 15 of 77 columns for these ensembles).
    """
    context = clip.text.positional_embedding.shape[0]
    tokens = tokenize(list(sentences), context).to(clip.text.positional_embedding.device)
    eot = tokens.argmax(dim=-1)
    if trim:
        tokens = tokens[:, : int(eot.max()) + 1]
    return clip.text(clip.text.token_embedding(tokens), eot)


def ensemble_feature(clip: ClipModel, sentences: Sequence[str]) -> torch.Tensor:
    """One side of an ensemble: mean of the normalised sentence embeddings, normalised [E]."""
    embeddings = F.normalize(encode_sentences(clip, sentences), dim=-1)
    return F.normalize(embeddings.mean(dim=0), dim=-1)


def ensemble_text_features(
    clip: ClipModel,
    class_name: str,
    normal_states: Sequence[str] = VAND_NORMAL_STATES,
    anomalous_states: Sequence[str] = VAND_ANOMALOUS_STATES,
    templates: Sequence[str] = VAND_TEMPLATES,
) -> torch.Tensor:
    """Normalised text features [2, E] of ``class_name``: row 0 normal, row 1 anomalous.

    (The official VAND code returns the transpose, [E, 2]; rows are this package's convention,
    the same as AnomalyCLIP's.) Runs with autograd as the caller's context has it; wrap it in
    ``torch.no_grad()`` for a frozen CLIP.
    """
    normal = ensemble_feature(clip, ensemble_sentences(class_name, normal_states, templates))
    anomalous = ensemble_feature(clip, ensemble_sentences(class_name, anomalous_states, templates))
    return torch.stack([normal, anomalous])


__all__ = [
    "CLIP_AC_ANOMALOUS_STATES",
    "CLIP_AC_NORMAL_STATES",
    "CLIP_ANOMALOUS_PROMPT",
    "CLIP_IMAGENET_TEMPLATES",
    "CLIP_NORMAL_PROMPT",
    "VAND_ANOMALOUS_STATES",
    "VAND_NORMAL_STATES",
    "VAND_TEMPLATES",
    "encode_sentences",
    "ensemble_feature",
    "ensemble_sentences",
    "ensemble_text_features",
]
