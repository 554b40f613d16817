"""M3DM's decision-layer fusion: two one-class SVMs (scikit-learn's ``SGDOneClassSVM``, official
``nu=0.5, max_iter=1000, random_state=42``) fitted on the per-modality scores of the training
images (``detect``: one 3-vector per image) and on their maps (``seg``: one 3-vector per pixel).

The anomaly score is the raw ``score_samples`` (``x·coef``, larger = farther from the origin).
The fitted ``coef`` and ``offset`` are all that inference needs: they are stored as float64
buffers and applied in torch (:func:`svm_score_samples`), as scikit-learn computes it
(``(x·coef - offset) + offset``, in float64), so the fused score is part of the exported graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FittedSVM:
    coef: np.ndarray  # [3] float64
    offset: np.ndarray  # [1] float64
    n_iter: int
    t: float


def fit_one_class_svm(samples: torch.Tensor | np.ndarray, nu: float = 0.5, max_iter: int = 1000,
                      random_state: int | None = 42) -> FittedSVM:
    """Fit ``SGDOneClassSVM(nu, max_iter, random_state)`` on ``samples`` ``[n, 3]``. The input is
    converted to float64 first, as scikit-learn does with the official torch tensors (fitting on a
    float32 array would keep float32 and change the result)."""
    from sklearn.linear_model import SGDOneClassSVM

    array = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
    svm = SGDOneClassSVM(nu=nu, max_iter=max_iter, random_state=random_state)
    svm.fit(array.astype(np.float64))
    return FittedSVM(coef=np.asarray(svm.coef_, dtype=np.float64).reshape(-1),
                     offset=np.asarray(svm.offset_, dtype=np.float64).reshape(-1), n_iter=int(svm.n_iter_),
                     t=float(svm.t_))


def svm_score_samples(samples: torch.Tensor, coef: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """scikit-learn's ``SGDOneClassSVM.score_samples``: ``(x·coef - offset) + offset`` in float64."""
    return (samples.double() @ coef.double() - offset.double()) + offset.double()
