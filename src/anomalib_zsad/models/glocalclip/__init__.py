"""GlocalCLIP (arXiv 2411.06071): object-agnostic global-local prompt learning for zero-shot
anomaly detection, built on AnomalyCLIP's pieces."""

from .lightning_model import GlocalCLIP
from .torch_model import GlocalCLIPModel

__all__ = ["GlocalCLIP", "GlocalCLIPModel"]
