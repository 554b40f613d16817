"""AdaCLIP exports: the whole forward (dynamic prompts, text tower, HSF k-means, maps) traces into
one graph that gives the eager numbers, in torch.export and in OpenVINO through anomalib's exporter.

Tolerance: OpenVINO equals torch within 1e-4 (observed ~2e-6) with ``round_prompts_to_fp16=False``.
With the official fp16 rounding of the prompt tokens, a 1e-6 difference of a prompt value can flip
its fp16 rounding by one ulp, which the x100 logits turn into map differences up to ~3e-4
(observed on the tiny CLIP); the parity README describes the same effect.
"""

from __future__ import annotations

import pytest
import torch

from anomalib_zsad.models.adaclip import AdaCLIPModel
from anomalib_zsad.models.adaclip import hsf as hsf_module

TOLERANCE = 1e-4


class ScoreAndMap(torch.nn.Module):
    def __init__(self, model: AdaCLIPModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out.pred_score, out.anomaly_map


def test_kmeans_fixed_iterations_equal_the_converged_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """In an exported graph the Lloyd loop runs a fixed number of iterations: same labels."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 100, 64, generator=gen)
    eager = hsf_module.kmeans_labels(x, 20)
    monkeypatch.setattr(hsf_module.torch.compiler, "is_exporting", lambda: True)
    assert torch.equal(hsf_module.kmeans_labels(x, 20), eager)
    assert torch.equal(torch.stack([hsf_module.kmeans_labels(x[i], 20) for i in range(3)]), eager)


@pytest.mark.slow
def test_torch_export_matches_eager(tiny_clip) -> None:
    model = AdaCLIPModel(tiny_clip, seed=1).eval()
    images = torch.randn(2, 3, 64, 64)
    wrapper = ScoreAndMap(model)
    with torch.no_grad():
        expected = wrapper(images)
        exported = torch.export.export(wrapper, (images,))
        actual = exported.module()(images)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=0)
