"""M3DM: multimodal (RGB + point cloud) industrial anomaly detection via hybrid fusion."""

from .backbones import RGBWeightsUnavailableError, load_rgb_backbone
from .export import M3DMInferencer, PointFrontEnd
from .fusion import FeatureFusionBlock, load_uff_weights, read_uff_checkpoint
from .lightning_model import M3DM, PointCloudsMissingError
from .torch_model import M3DMModel, SampleFeatures, SampleScore

__all__ = [
    "M3DM",
    "M3DMInferencer",
    "PointFrontEnd",
    "PointCloudsMissingError",
    "FeatureFusionBlock",
    "M3DMModel",
    "RGBWeightsUnavailableError",
    "SampleFeatures",
    "SampleScore",
    "load_rgb_backbone",
    "load_uff_weights",
    "read_uff_checkpoint",
]
