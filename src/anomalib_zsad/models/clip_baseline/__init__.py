"""CLIP and CLIP-AC, AnomalyCLIP's zero-shot baselines (Zhou et al., ICLR 2024, Appendix A.2)."""

from .lightning_model import CLIPBaseline
from .torch_model import CLIPBaselineModel, PromptScoringModel

__all__ = ["CLIPBaseline", "CLIPBaselineModel", "PromptScoringModel"]
