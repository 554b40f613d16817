"""AdaCLIP's fixed text: the shared state words and templates, and its class-name cleaning.

The lists live in :mod:`anomalib_zsad.clip.prompts` (AdaCLIP uses VAND's 7 normal and 5 anomalous
states and the first 4 of its templates). Sentences are state-major, as the official code builds them.
"""

from __future__ import annotations

from anomalib_zsad.clip.prompts import ADACLIP_ANOMALOUS_STATES as ANOMALOUS_STATES
from anomalib_zsad.clip.prompts import ADACLIP_NORMAL_STATES as NORMAL_STATES
from anomalib_zsad.clip.prompts import ADACLIP_TEMPLATES as TEMPLATES
from anomalib_zsad.clip.prompts import ensemble_sentences as build_sentences

__all__ = ["ANOMALOUS_STATES", "NORMAL_STATES", "TEMPLATES", "build_sentences", "clean_class_name"]


def clean_class_name(name: str) -> str:
    """The official code turns ``-`` into spaces and leaves ``_`` (``metal_nut``, ``pipe_fryum``)
    as it is; kept so that converted checkpoints see the sentences they were trained with."""
    return name.replace("-", " ")
