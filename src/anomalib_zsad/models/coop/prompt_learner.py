"""CoOp's prompts for anomaly detection, AnomalyCLIP's Appendix A.2:
``[V1]..[VM][normal][cls].`` and ``[V1]..[VM][anomalous][cls].``, the class name kept (object-aware).

The learner *is* AnomalyCLIP's (:class:`AnomalyCLIPPromptLearner`: the same ``ctx_pos``/``ctx_neg``
contexts put in place of ``X`` placeholders, the same initialisation), without deep prompts
(``depth=1``), with CoOp's state words, and with the class name read per image: the placeholder
sentences are tokenised once per class name. ``shared_context`` ties the two contexts into one
tensor (CoOp's unified context: the paper writes ``[V1]..[VN]`` in both prompts).
"""

from __future__ import annotations

from anomalib_zsad.clip import TextTower
from anomalib_zsad.models.anomalyclip.prompt_learner import AnomalyCLIPPromptLearner


class CoOpPromptLearner(AnomalyCLIPPromptLearner):
    """Learnt context vectors before ``"normal {cls}."`` and ``"anomalous {cls}."``.

    Args:
        text: the CLIP text tower (for the width and the context length).
        n_ctx: learnt context tokens (CoOp's M, 16 in its paper).
        shared_context: one context for both prompts (``ctx_neg`` is ``ctx_pos``), else one per state.
        normal_template: the normal prompt after the context, ``{}`` = class name.
        anomalous_template: the anomalous prompt after the context.
        class_name: the class name of :attr:`token_ids` (the default prompts).
        init_std: standard deviation of the contexts' normal initialisation (CoOp's 0.02).
        seed: seed of that initialisation.
    """

    def __init__(self, text: TextTower, n_ctx: int = 16, shared_context: bool = True,
                 normal_template: str = "normal {}", anomalous_template: str = "anomalous {}",
                 class_name: str = "object", init_std: float = 0.02, seed: int = 0) -> None:
        super().__init__(text, n_ctx=n_ctx, depth=1, deep_length=1, class_name=class_name,
                         normal_template=normal_template, anomalous_template=anomalous_template,
                         init_std=init_std, seed=seed, shared_context=shared_context)
