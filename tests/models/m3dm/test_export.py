"""M3DM's two-part export: the scoring graph's module computes what the model computes, the
point front end survives its file, the torch export runs image + cloud, the batched 8-bit blur is
the model's, and the traced ONNX and OpenVINO graphs (slow: one trace, on timm's 6-block
``test_vit``; the contract flow's ViT-S/8 takes 1.5 min to trace) give the torch model's outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anomalib_zsad.data.demo3d import render_sample
from anomalib_zsad.models.m3dm import M3DM, PointCloudsMissingError
from anomalib_zsad.models.m3dm.export import (
    FRONT_END_FILE,
    M3DMInferencer,
    PointFrontEnd,
    ScoringGraph,
    blur_8bit_batch,
)
from anomalib_zsad.models.m3dm.memory import blur_8bit

TINY = {"backbone": "vit_small_patch8_224.dino", "pretrained": False, "point_checkpoint": None, "image_size": 64,
        "num_group": 32, "group_size": 16}
#: Scores: float32 sums in another order (and OpenVINO's float32 for the float64 SVM).
SCORE_TOLERANCE = 1e-4


def demo_samples(count: int, seed: int, defect: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] and organized clouds of the 3D demo set's dome."""
    rng = np.random.default_rng(seed)
    samples = [render_sample("dome", 64, rng, defect) for _ in range(count)]
    images = torch.stack([torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 for rgb, _, _ in samples])
    return images, torch.stack([torch.from_numpy(xyz).permute(2, 0, 1) for _, xyz, _ in samples])


def map_tolerance(model: M3DM, images: torch.Tensor, clouds: torch.Tensor) -> float:
    """Maps: each modality's map is quantised to 8 bits before the blur (the official code), so a
    value on a level's edge may fall on either side after float differences of 1e-7. Pillow's box
    blur (weights summing to one, monotone) keeps such differences within one level, i.e.
    ``peak/255`` per modality (``peak``: the map's maximum before the blur); the segmentation SVM
    adds them up: ``Σ |coef|·λ·peak / 255``."""
    torch_model = model.model
    with torch.no_grad():
        results = [torch_model.score_sample(f) for f in torch_model.extract(model.pre_processor(images), clouds)]
    # the quantisation's peak: the largest nearest-bank distance (the map before the blur)
    names = torch_model.modalities
    peaks = torch.stack([torch.stack([r.single[n].min_val.max() for n in names]) for r in results]).amax(0)
    weights = torch.tensor([torch_model.lambdas[f"{n}_smap"] for n in names], dtype=torch.float64)
    return float((torch_model.seg_coef.abs() * weights * peaks.double()).sum() / 255) + SCORE_TOLERANCE


def assert_outputs_match(actual: dict, expected: object, count: int, tolerance: float, size: int = 64) -> None:
    """Exported outputs against the torch model's (``expected``: its InferenceBatch): scores within
    :data:`SCORE_TOLERANCE`, maps within ``tolerance`` (:func:`map_tolerance`)."""
    np.testing.assert_allclose(np.asarray(actual["pred_score"]).reshape(count), expected.pred_score[:count].numpy(),
                               atol=SCORE_TOLERANCE, rtol=SCORE_TOLERANCE)
    np.testing.assert_allclose(np.asarray(actual["anomaly_map"]).reshape(count, size, size),
                               expected.anomaly_map[:count].numpy(), atol=tolerance, rtol=0)


@pytest.fixture(scope="module")
def fitted() -> M3DM:
    """Banks and SVMs from three demo domes (the model's own fitting, without a trainer)."""
    model = M3DM(**TINY)
    images, clouds = demo_samples(3, seed=0)
    with torch.no_grad():
        model.model.add_training_batch(model.pre_processor(images), clouds)
    model.fit()
    return model.eval()


def test_scoring_graph_and_front_end_compute_the_models_outputs(fitted: M3DM, tmp_path: Path) -> None:
    """Part 1 (from its file) then part 2 give the model's score and map, for a good and a bumped dome."""
    images, clouds = demo_samples(1, seed=1)
    bumped, bumped_clouds = demo_samples(1, seed=2, defect="bump")
    images, clouds = torch.cat([images, bumped]), torch.cat([clouds, bumped_clouds])
    PointFrontEnd(fitted.model.point_backbone, fitted.model.image_size).save(tmp_path / FRONT_END_FILE)
    front_end = PointFrontEnd.load(tmp_path / FRONT_END_FILE)
    with torch.no_grad():
        expected = fitted(images, clouds)
        points = front_end(clouds)
        actual = ScoringGraph(fitted).eval()(images, points)
    assert points.shape == (2, fitted.model.point_backbone.out_channels, 16, 16)
    assert_outputs_match(actual._asdict(), expected, 2, map_tolerance(fitted, images, clouds))
    assert torch.equal(actual.pred_label, expected.pred_label)


@pytest.mark.parametrize("method", ["DINO", "Point_MAE"])
def test_scoring_graph_of_a_single_bank_setting(method: str) -> None:
    """``method_name`` DINO / Point_MAE: the graph scores the one bank, as the model."""
    model = M3DM(**TINY, method_name=method, f_coreset=1.0)
    images, clouds = demo_samples(2, seed=0)
    with torch.no_grad():
        model.model.add_training_batch(model.pre_processor(images), clouds)
    model.fit()
    model.eval()
    images, clouds = demo_samples(2, seed=4, defect="dent")
    front_end = PointFrontEnd(model.model.point_backbone, model.model.image_size)
    with torch.no_grad():
        expected = model(images, clouds)
        actual = ScoringGraph(model).eval()(images, front_end(clouds))
    with torch.no_grad():  # one 8-bit level of the map before the blur (see map_tolerance)
        peak = max(float(model.model.score_single(f).min_val.max())
                   for f in model.model.extract(model.pre_processor(images), clouds))
    np.testing.assert_allclose(actual.pred_score.numpy(), expected.pred_score.numpy(), atol=SCORE_TOLERANCE,
                               rtol=SCORE_TOLERANCE)
    np.testing.assert_allclose(actual.anomaly_map.numpy(), expected.anomaly_map.numpy(), atol=peak / 255 + 1e-6)


def test_scoring_graph_of_dino_point_mae() -> None:
    """``method_name`` DINO+Point_MAE: two banks and 2-input SVMs in the graph, as the model."""
    model = M3DM(**TINY, method_name="DINO+Point_MAE", f_coreset=1.0)
    images, clouds = demo_samples(2, seed=0)
    with torch.no_grad():
        model.model.add_training_batch(model.pre_processor(images), clouds)
    model.fit()
    model.eval()
    images, clouds = demo_samples(2, seed=4, defect="bump")
    front_end = PointFrontEnd(model.model.point_backbone, model.model.image_size)
    with torch.no_grad():
        expected = model(images, clouds)
        actual = ScoringGraph(model).eval()(images, front_end(clouds))
    assert_outputs_match(actual._asdict(), expected, 2, map_tolerance(model, images, clouds))


def test_front_end_file_is_checked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="point front end"):
        PointFrontEnd.load(tmp_path / FRONT_END_FILE)


def test_torch_export_runs_image_and_cloud(fitted: M3DM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--export_type torch``: anomalib's pickled module, ``model(image, clouds)``; images alone
    (anomalib's TorchInferencer) are refused with the reason."""
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine

    path = Engine(accelerator="cpu", default_root_dir=tmp_path, logger=False).export(
        fitted, export_type=ExportType.TORCH, export_root=tmp_path / "torch")
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib refuses pickled models otherwise
    images, clouds = demo_samples(2, seed=3)
    with torch.no_grad():
        expected = fitted(images, clouds)
    actual = M3DMInferencer(path).predict(images, clouds)
    np.testing.assert_array_equal(actual["pred_score"], expected.pred_score.numpy())
    np.testing.assert_array_equal(actual["anomaly_map"], expected.anomaly_map.numpy())
    with pytest.raises(PointCloudsMissingError, match="M3DMInferencer"):
        fitted(images)


def test_batched_blur_is_the_models_blur() -> None:
    maps = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0)) * 2
    maps[1] = 0  # an empty map stays empty
    blurred = blur_8bit_batch(maps, 4)
    for index in range(3):
        torch.testing.assert_close(blurred[index], blur_8bit(maps[index], 4), atol=0, rtol=0)


@pytest.mark.slow
def test_onnx_and_openvino_graphs_give_the_torch_models_outputs(tmp_path: Path) -> None:
    """``Engine.export`` to ONNX (the graph and ``point_features.pt`` beside it), OpenVINO converted
    from that file as anomalib converts it; both, run by :class:`M3DMInferencer` on demo images and
    clouds, for one sample and two (the batch axis is dynamic), give the torch model's outputs.
    Whole libraries as banks (``f_coreset=1``: 48 RGB rows of 64 channels are too few for the
    coreset's random projection)."""
    import shutil

    import openvino
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine

    model = M3DM(**{**TINY, "backbone": "test_vit", "f_coreset": 1.0})
    images, clouds = demo_samples(3, seed=0)
    with torch.no_grad():
        model.model.add_training_batch(model.pre_processor(images), clouds)
    model.fit()
    model.eval()
    onnx_path = Engine(accelerator="cpu", default_root_dir=tmp_path, logger=False).export(
        model, export_type=ExportType.ONNX, export_root=tmp_path / "onnx", input_size=(64, 64))
    assert (onnx_path.parent / FRONT_END_FILE).is_file()
    xml = tmp_path / "openvino" / "model.xml"
    xml.parent.mkdir()
    openvino.save_model(openvino.convert_model(onnx_path), xml, compress_to_fp16=False)
    shutil.copy(onnx_path.parent / FRONT_END_FILE, xml.parent)

    images, clouds = demo_samples(1, seed=1)
    bumped, bumped_clouds = demo_samples(1, seed=2, defect="bump")
    images, clouds = torch.cat([images, bumped]), torch.cat([clouds, bumped_clouds])
    with torch.no_grad():
        expected = model(images, clouds)
    tolerance = map_tolerance(model, images, clouds)
    for path in (onnx_path, xml):
        inferencer = M3DMInferencer(path)
        for count in (1, 2):
            assert_outputs_match(inferencer.predict(images[:count], clouds[:count]), expected, count, tolerance)
