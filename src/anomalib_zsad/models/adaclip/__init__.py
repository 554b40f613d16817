"""AdaCLIP (ECCV 2024): hybrid learnable prompts for zero-shot anomaly detection."""

from .checkpoint import load_official_checkpoint
from .lightning_model import AdaCLIP
from .loss import AdaCLIPLoss
from .torch_model import AdaCLIPModel

__all__ = ["AdaCLIP", "AdaCLIPLoss", "AdaCLIPModel", "load_official_checkpoint"]
