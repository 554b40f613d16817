"""The one CLIP layer of anomalib-zsad: loading, tokenizer, towers with the hooks every method needs.

No model folder re-implements any of this; see ``docs/clip_layer.md``.
"""

from .architecture import ClipArchitecture, named_architecture
from .loading import ClipWeightsUnavailableError, default_cache_dir, load_clip, read_clip_state_dict
from .model import ClipModel
from .pos_embed import POS_EMBED_MODES, resize_pos_embed
from .text import TextTower
from .tokenizer import EOT_TOKEN, SOT_TOKEN, tokenize
from .vision import VisionTokens, VisionTower

__all__ = [
    "EOT_TOKEN",
    "POS_EMBED_MODES",
    "SOT_TOKEN",
    "ClipArchitecture",
    "ClipModel",
    "ClipWeightsUnavailableError",
    "TextTower",
    "VisionTokens",
    "VisionTower",
    "default_cache_dir",
    "load_clip",
    "named_architecture",
    "read_clip_state_dict",
    "resize_pos_embed",
    "tokenize",
]
