"""Exports made with ``--input_size`` take images of any size (issue 12).

The exported graph's input has dynamic height and width; the pre-processor's resize inside it
brings every image to the model size, and scores and maps equal the torch model's (its
``forward``: the same resize, then the model) on the same images. Maps come back at the model
size, as with anomalib's own models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from PIL import Image
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from anomalib_zsad.models import AnomalyCLIP
from anomalib_zsad.models.components.display import ZeroShotVisualizer
from anomalib_zsad.models.components.export import (
    ExportResize,
    fixed_resize_size,
    with_export_resize,
)
from conftest import openvino_predict, run_export

# One worker builds the ONNX and OpenVINO exports (fixture ``exported``) for all of this module's
# tests; spread over two xdist workers it was built twice (``--dist loadgroup`` in pyproject.toml).
pytestmark = pytest.mark.xdist_group("export_any_size")

MODEL_SIZE = 64
SIZES = [(64, 64), (80, 96), (120, 90)]  # (height, width): the model size, larger, one side smaller
TOLERANCE = 1e-4


def test_export_resize_equals_torchvision_resize_without_antialias() -> None:
    transform = Compose([Resize((MODEL_SIZE, MODEL_SIZE), interpolation=InterpolationMode.BICUBIC),
                         Normalize(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))])
    transform.transforms[0].antialias = False  # what anomalib's export transform does
    exportable = with_export_resize(transform)
    assert isinstance(exportable.transforms[0], ExportResize)
    for height, width in [*SIZES, (MODEL_SIZE, MODEL_SIZE)]:
        images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(height))
        torch.testing.assert_close(exportable(images), transform(images), atol=0, rtol=0)


def test_only_a_fixed_size_resize_makes_the_input_size_free() -> None:
    assert fixed_resize_size(Compose([Resize((518, 400)), Normalize((0.5,), (0.2,))])) == (518, 400)
    assert fixed_resize_size(Resize(518)) is None  # keeps the aspect ratio: the model would see the input size
    assert fixed_resize_size(Normalize((0.5,), (0.2,))) is None


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("export_any_size")
    model = AnomalyCLIP(backbone="zsad-tiny", pretrained=None, image_size=MODEL_SIZE).eval()
    engine = Engine(accelerator="cpu", default_root_dir=root, logger=False)
    paths = {kind: engine.export(model, export_type=kind, export_root=root / kind.value,
                                 input_size=(MODEL_SIZE, MODEL_SIZE))
             for kind in (ExportType.OPENVINO, ExportType.ONNX)}
    return model, paths


@pytest.mark.slow
@pytest.mark.parametrize("kind", [ExportType.OPENVINO, ExportType.ONNX])
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_export_takes_any_image_size(exported, kind: ExportType, height: int, width: int) -> None:
    model, paths = exported
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(height * width))
    with torch.no_grad():
        expected = model(images)
    scores, maps = run_export(paths[kind], images.numpy())
    assert maps.reshape(2, -1).shape[1] == MODEL_SIZE * MODEL_SIZE  # maps at the model size
    np.testing.assert_allclose(scores.reshape(2), expected.pred_score.numpy(), atol=TOLERANCE)
    np.testing.assert_allclose(maps.reshape(2, MODEL_SIZE, MODEL_SIZE), expected.anomaly_map.numpy(),
                               atol=TOLERANCE)


@pytest.mark.slow
def test_openvino_inferencer_predicts_an_image_file_of_another_size(exported, tmp_path: Path) -> None:
    """The documented call, ``inferencer.predict("image.png")``, on a PNG that is not 64x64."""
    from anomalib.data.utils import read_image

    model, paths = exported
    pixels = np.random.default_rng(0).integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    result = openvino_predict(paths[ExportType.OPENVINO], str(tmp_path / "image.png"))
    image = torch.from_numpy(read_image(tmp_path / "image.png", as_tensor=False)).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = model(image.float())
    assert result.anomaly_map.squeeze().shape == (MODEL_SIZE, MODEL_SIZE)
    np.testing.assert_allclose(np.asarray(result.pred_score).reshape(1), expected.pred_score.numpy(), atol=TOLERANCE)
    np.testing.assert_allclose(np.asarray(result.anomaly_map).reshape(1, MODEL_SIZE, MODEL_SIZE),
                               expected.anomaly_map.numpy(), atol=TOLERANCE)
    # and it draws (docs/deployment.md, Pictures): image and map of different sizes, map on a fixed scale
    picture = ZeroShotVisualizer(map_min=0.0, map_max=4.0, threshold=2.0).visualize(result)
    assert picture is not None and picture.size[1] > 0


@pytest.mark.slow
def test_onnx_input_names_its_dynamic_axes(exported) -> None:
    import onnx

    _, paths = exported
    dims = onnx.load(str(paths[ExportType.ONNX]), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch_size", 3, "height", "width"]
