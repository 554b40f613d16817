"""Export of AACLIP: the graph maps images to outputs with the anchors stored as constants."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_export_equals_torch

from anomalib_zsad.models.aa_clip import AACLIP


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["openvino", "onnx"])
def test_openvino_and_onnx_equal_torch(tmp_path: Path, kind: str) -> None:
    pytest.importorskip("onnxscript")
    model = AACLIP(backbone="zsad-tiny", pretrained=None, image_size=224, class_name="candle").eval()
    path = getattr(model, f"to_{kind}")(tmp_path, input_size=(224, 224))
    assert model.model._frozen  # noqa: SLF001  (anchors stored, no text tower exported)
    assert_export_equals_torch(model, path, size=224, tolerance=1e-4)
