"""INT8 through anomalib's ``--compression_type int8_ptq``: what gets quantised in a plugin model's export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anomalib_zsad.models.components.quantization import embedding_comparisons

# One worker builds the INT8 export of the module's fixture for all of this module's tests; spread
# over two xdist workers it can be built twice (``--dist loadgroup`` in pyproject.toml).
pytestmark = pytest.mark.xdist_group("int8_quantization")

ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")


def _inputs_from(op, kind: str) -> bool:
    return any(port.get_source_output().get_node().get_type_name() == kind for port in op.inputs())


def test_embedding_comparisons_are_the_matmuls_with_a_few_constant_rows() -> None:
    from openvino import opset13 as ops

    tokens = ops.parameter([1, 10, 32], np.float32, name="tokens")
    hidden = ops.matmul(tokens, ops.constant(np.ones((64, 32), np.float32)), False, True)
    hidden.set_friendly_name("linear")
    similarity = ops.matmul(hidden, ops.constant(np.ones((2, 64), np.float32)), False, True)
    similarity.set_friendly_name("similarity")
    model = ov.Model([similarity], [tokens])
    assert embedding_comparisons(model) == ["similarity"]


@pytest.fixture(scope="module")
def int8_export(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    from anomalib.data import MVTecAD
    from anomalib.deploy import CompressionType, ExportType
    from anomalib.engine import Engine

    from anomalib_zsad.models import AnomalyCLIP

    root = tmp_path_factory.mktemp("int8")
    model = AnomalyCLIP(backbone="zsad-tiny", pretrained=None, image_size=64).eval()
    calibration = MVTecAD(root=demo_root, category="brick", val_split_mode="same_as_test", eval_batch_size=2,
                          num_workers=0)
    engine = Engine(accelerator="cpu", default_root_dir=root, logger=False)
    xml = engine.export(model, ExportType.OPENVINO, export_root=root, input_size=(64, 64),
                        compression_type=CompressionType.INT8_PTQ, datamodule=calibration)
    return model, Path(xml)


@pytest.mark.slow
def test_int8_ptq_quantises_the_linear_layers_and_keeps_attention_and_head_fp32(int8_export) -> None:
    _, xml = int8_export
    graph = ov.Core().read_model(str(xml))
    ops = graph.get_ordered_ops()
    quantised = [op for op in ops if op.get_type_name() == "MatMul" and _inputs_from(op, "FakeQuantize")]
    attention = [op for op in ops if op.get_type_name() == "ScaledDotProductAttention"]
    # zsad-tiny: 4 blocks x (qkv, out, fc1, fc2); the fused attention survives, unquantised
    assert len(quantised) >= 16
    assert len(attention) >= 4
    assert not any(_inputs_from(op, "FakeQuantize") for op in attention)
    kept = set(embedding_comparisons(graph))
    assert kept
    for op in ops:
        if op.get_friendly_name() in kept or op.get_type_name() == "Convolution":
            assert not _inputs_from(op, "FakeQuantize"), op.get_friendly_name()


@pytest.mark.slow
def test_int8_export_runs_in_the_openvino_inferencer(int8_export) -> None:
    import torch

    from conftest import openvino_predict

    model, xml = int8_export
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = openvino_predict(xml, images.numpy())
    scores, maps = np.asarray(result.pred_score).reshape(2), np.asarray(result.anomaly_map).reshape(2, 64, 64)
    with torch.no_grad():
        expected = model(images)
    assert np.isfinite(scores).all() and np.isfinite(maps).all()
    # 8-bit linear layers in a random 4-block CLIP: close to FP32, not equal to it
    assert np.abs(scores - expected.pred_score.numpy()).max() < 0.5
    assert np.abs(maps - expected.anomaly_map.numpy()).max() > 0


def test_int8_ptq_without_a_datamodule_says_what_is_missing() -> None:
    from anomalib_zsad.models import AnomalyCLIP

    model = AnomalyCLIP(backbone="zsad-tiny", pretrained=None, image_size=64)
    with pytest.raises(ValueError, match="datamodule"):
        model._post_training_quantization_ov(None, datamodule=None)
