"""AA-CLIP (CVPR 2025): anomaly-aware CLIP through two-stage residual adapters."""

from .checkpoint import load_official_checkpoint
from .lightning_model import AACLIP
from .torch_model import AACLIPModel

__all__ = ["AACLIP", "AACLIPModel", "load_official_checkpoint"]
