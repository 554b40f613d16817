"""BGAD: explicit boundary guided semi-push-pull contrastive learning for supervised anomaly detection."""

from .backbone import BackboneWeightsUnavailableError, load_feature_extractor
from .checkpoint import load_official_checkpoint, read_official_checkpoint
from .lightning_model import BGAD
from .loss import (
    BGADLoss,
    abnormal_focal_weights,
    learning_rate,
    logp_boundary,
    normal_focal_weights,
    semi_push_pull,
)
from .torch_model import BGADModel

__all__ = [
    "BGAD",
    "BGADLoss",
    "BGADModel",
    "BackboneWeightsUnavailableError",
    "abnormal_focal_weights",
    "learning_rate",
    "load_feature_extractor",
    "load_official_checkpoint",
    "logp_boundary",
    "normal_focal_weights",
    "read_official_checkpoint",
    "semi_push_pull",
]
