"""CoOp (Zhou et al., IJCV 2022) as AnomalyCLIP's learnt-prompt baseline (ICLR 2024, Appendix A.2)."""

from .lightning_model import CoOp
from .prompt_learner import CoOpPromptLearner
from .torch_model import CoOpModel

__all__ = ["CoOp", "CoOpModel", "CoOpPromptLearner"]
