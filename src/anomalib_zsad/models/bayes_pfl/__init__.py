"""Bayes-PFL (CVPR 2025): Bayesian prompt flow learning for zero-shot anomaly detection."""

from .checkpoint import load_official_checkpoint, save_official_checkpoint
from .lightning_model import BayesPFL
from .noise import PromptNoise
from .postprocess import official_final_scores
from .torch_model import BayesPFLModel

__all__ = ["BayesPFL", "BayesPFLModel", "PromptNoise", "load_official_checkpoint", "official_final_scores",
           "save_official_checkpoint"]
