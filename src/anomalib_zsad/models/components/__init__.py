"""Pieces that several plugin methods share (losses, map smoothing, the Lightning behaviour)."""

from .lightning import (
    PluginModuleMixin,
    ZeroShotModuleMixin,
    clip_pre_processor,
    imagenet_pre_processor,
    paper_evaluator,
)
from .losses import BinaryDiceLoss, FocalLoss, segmentation_loss
from .smoothing import GaussianBlur

__all__ = [
    "BinaryDiceLoss",
    "FocalLoss",
    "GaussianBlur",
    "PluginModuleMixin",
    "ZeroShotModuleMixin",
    "clip_pre_processor",
    "imagenet_pre_processor",
    "paper_evaluator",
    "segmentation_loss",
]
