"""Shared pieces: the scipy-equal Gaussian and the official losses' edge behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from anomalib_zsad.models.components import BinaryDiceLoss, FocalLoss, GaussianBlur
from anomalib_zsad.models.components.class_names import class_name_from_path, class_names_for


@pytest.mark.parametrize(("sigma", "shape"), [(4.0, (2, 60, 45)), (1.5, (1, 9, 9)), (8.0, (1, 12, 20))])
def test_gaussian_equals_scipy(sigma: float, shape: tuple[int, ...]) -> None:
    maps = torch.rand(shape)
    expected = np.stack([gaussian_filter(m, sigma=sigma) for m in maps.numpy()])
    np.testing.assert_allclose(GaussianBlur(sigma)(maps).numpy(), expected, atol=1e-6)
    assert GaussianBlur(0)(maps) is maps


def test_losses_reward_the_right_answer() -> None:
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:5, 2:5] = 1
    right = torch.stack([1 - mask, mask], dim=1).clamp(0.01, 0.99)
    wrong = right.flip(1)
    focal, dice = FocalLoss(), BinaryDiceLoss()
    assert focal(right, mask) < focal(wrong, mask)
    assert dice(right[:, 1], mask) < 0.05 < dice(wrong[:, 1], mask)


def test_class_names_come_from_the_data_set_layout() -> None:
    assert class_name_from_path("/data/MVTecAD/metal_nut/test/scratch/000.png") == "metal_nut"
    assert class_name_from_path("/data/visa/candle/Data/Images/Anomaly/001.JPG") == "candle"
    assert class_name_from_path("/data/visa/candle/train/good/001.JPG") == "candle"
    assert class_name_from_path("/some/folder/image.png") == "object"
    assert class_names_for(["/d/bottle/test/good/0.png"], "auto") == ["bottle"]
    assert class_names_for(["/d/bottle/test/good/0.png"], "screw") is None


def test_paper_metrics_equal_scikit_learn_on_synthetic_maps() -> None:
    """The evaluator's image and pixel AUROC and AP (anomalib's step-wise AUPR) are scikit-learn's
    ``roc_auc_score`` and ``average_precision_score``, over every pixel of every map (ties included)."""
    from anomalib.data import ImageBatch
    from sklearn.metrics import average_precision_score, roc_auc_score

    from anomalib_zsad.models.components.lightning import paper_evaluator

    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(6, 32, 32, dtype=torch.bool)
    masks[1, 4:12, 5:15] = masks[3, 20:30, 2:9] = masks[4, 0:5, 0:32] = True
    maps = torch.rand(6, 32, 32, generator=generator) + 0.7 * masks  # informative, overlapping
    maps = (maps * 20).round() / 20  # ties, as quantised maps have
    labels = masks.flatten(1).any(1)
    scores = maps.flatten(1).amax(1)
    metrics = {metric.name: metric for metric in paper_evaluator().test_metrics}
    for half in (slice(0, 3), slice(3, 6)):  # two batches: the metrics accumulate
        batch = ImageBatch(image=torch.zeros(3, 3, 32, 32), pred_score=scores[half], gt_label=labels[half],
                           anomaly_map=maps[half], gt_mask=masks[half])
        for metric in metrics.values():
            metric.update(batch)
    pixels, truth = maps.flatten().numpy(), masks.flatten().numpy()
    expected = {"pixel_AUPR": average_precision_score(truth, pixels), "pixel_AUROC": roc_auc_score(truth, pixels),
                "image_AUPR": average_precision_score(labels.numpy(), scores.numpy()),
                "image_AUROC": roc_auc_score(labels.numpy(), scores.numpy())}
    for name, value in expected.items():
        assert float(metrics[name].compute()) == pytest.approx(value, abs=1e-6), name
