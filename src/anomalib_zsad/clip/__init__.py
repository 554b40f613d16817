"""The one CLIP layer of anomalib-zsad: loading, tokenizer, towers with the hooks every method needs.

No model folder re-implements any of this; see ``docs/clip_layer.md``.
"""

from .architecture import ClipArchitecture, named_architecture
from .loading import ClipWeightsUnavailableError, default_cache_dir, load_clip, read_clip_state_dict
from .model import ClipModel
from .pos_embed import POS_EMBED_MODES, resize_pos_embed
from .text import TextTower, end_token_span
from .tokenizer import EOT_TOKEN, SOT_TOKEN, tokenize
from .vision import DPAM_ATTENTIONS, VisionTokens, VisionTower, quarter_blocks

# CLIP's image normalisation (OpenAI's training statistics), for every pre-processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DPAM_ATTENTIONS",
    "EOT_TOKEN",
    "POS_EMBED_MODES",
    "SOT_TOKEN",
    "ClipArchitecture",
    "ClipModel",
    "ClipWeightsUnavailableError",
    "TextTower",
    "end_token_span",
    "VisionTokens",
    "VisionTower",
    "default_cache_dir",
    "load_clip",
    "named_architecture",
    "read_clip_state_dict",
    "resize_pos_embed",
    "quarter_blocks",
    "tokenize",
]
