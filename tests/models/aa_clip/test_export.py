"""Export of AACLIP: the graph maps images to outputs with the anchors stored as constants."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_zsad.models.aa_clip import AACLIP


@pytest.mark.slow
def test_openvino_matches_torch(tmp_path: Path) -> None:
    ov = pytest.importorskip("openvino")
    pytest.importorskip("onnxscript")
    model = AACLIP(backbone="zsad-tiny", pretrained=None, image_size=224, class_name="candle").eval()
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images)
    path = model.to_openvino(tmp_path, input_size=(224, 224))
    assert model.model._frozen  # noqa: SLF001  (anchors stored, no text tower exported)
    compiled = ov.Core().compile_model(str(path), "CPU")
    outputs = compiled(images.numpy())
    result = {port.get_any_name(): torch.from_numpy(outputs[port]) for port in compiled.outputs}
    assert torch.allclose(result["pred_score"], expected.pred_score, atol=1e-5)
    assert torch.allclose(result["anomaly_map"], expected.anomaly_map, atol=1e-4)
