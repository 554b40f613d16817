"""VAND / APRIL-GAN: zero-/few-shot anomaly segmentation with linear maps of CLIP patch tokens."""

from .checkpoint import load_official_checkpoint, save_official_checkpoint
from .lightning_model import Vand
from .loss import VandLoss, build_optimizer
from .torch_model import VandLinearLayer, VandModel, default_feature_layers, official_few_shot_scores

__all__ = [
    "Vand",
    "VandLinearLayer",
    "VandLoss",
    "VandModel",
    "build_optimizer",
    "default_feature_layers",
    "load_official_checkpoint",
    "official_few_shot_scores",
    "save_official_checkpoint",
]
