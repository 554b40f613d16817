"""AnomalyCLIP (ICLR 2024): object-agnostic prompt learning for zero-shot anomaly detection."""

from .lightning_model import AnomalyCLIP
from .torch_model import AnomalyCLIPModel

__all__ = ["AnomalyCLIP", "AnomalyCLIPModel"]
