"""Pieces that several ZSAD methods share (losses, map smoothing, the Lightning base behaviour)."""

from .losses import BinaryDiceLoss, FocalLoss, segmentation_loss
from .smoothing import GaussianBlur

__all__ = ["BinaryDiceLoss", "FocalLoss", "GaussianBlur", "segmentation_loss"]
