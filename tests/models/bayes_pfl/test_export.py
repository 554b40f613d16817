"""Export of Bayes-PFL (torch, ONNX, OpenVINO) and the exported files in anomalib's inferencers.

The prompts depend on the image, so the text tower is part of the graph; the class sentence's
token embeddings, the Monte-Carlo noise and the stage are constants. Tolerance 1e-4 (fused
kernels sum in another order; observed ~1e-6).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_export_equals_torch, assert_torch_inferencer_matches, export_every_kind
from anomalib.deploy import ExportType

from anomalib_zsad.models.bayes_pfl import BayesPFL

TOLERANCE = 1e-4
SMALL = {"num_samples": 2, "num_flows": 2, "prompt_num": 2, "topk": 20}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("export")
    model = BayesPFL(backbone="zsad-tiny", pretrained=None, image_size=64, class_name="bottle", **SMALL).eval()
    return model, export_every_kind(model, root)


@pytest.mark.slow
@pytest.mark.parametrize("kind", [ExportType.OPENVINO, ExportType.ONNX])
def test_openvino_and_onnx_equal_torch_for_one_and_two_images(exported, kind: ExportType) -> None:
    model, paths = exported
    assert_export_equals_torch(model, paths[kind], tolerance=TOLERANCE)


@pytest.mark.slow
def test_exported_graph_has_no_token_embedding_table(exported) -> None:
    _, paths = exported
    xml = Path(paths[ExportType.OPENVINO]).read_text()
    assert "49408" not in xml  # the class sentence was embedded once, before export


@pytest.mark.slow
def test_torch_inferencer_runs_the_exported_file(exported, monkeypatch: pytest.MonkeyPatch) -> None:
    model, paths = exported
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib refuses pickled models otherwise
    assert_torch_inferencer_matches(model, paths[ExportType.TORCH], tolerance=TOLERANCE)
