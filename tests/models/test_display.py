"""Pictures of un-normalised maps (issue 13): the visualizer shows them in [0, 1], metrics unchanged."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch, NumpyImageBatch
from anomalib.visualization import ImageVisualizer
from anomalib.visualization.image.functional import apply_colormap
from PIL import Image

from anomalib_zsad.models import AnomalyCLIP
from anomalib_zsad.models.components.display import ZeroShotVisualizer, display_map

WIDTH, HEIGHT = 256, 16
#: anomalib's colour map (JET), value 0..255 -> RGB: to read a drawn colour back as a value.
COLOURS = np.asarray(apply_colormap(Image.fromarray(np.arange(256, dtype=np.uint8)[None]))).reshape(256, 3).astype(int)


def ramp_batch(low: float, high: float) -> ImageBatch:
    ramp = torch.linspace(low, high, WIDTH).expand(HEIGHT, WIDTH)
    return ImageBatch(image=torch.zeros(1, 3, HEIGHT, WIDTH), anomaly_map=ramp[None].clone())


def drawn_levels(visualizer: ImageVisualizer, batch: ImageBatch) -> np.ndarray:
    """The colour-map level (0..255) of each column of the drawn map panel, left to right."""
    picture = np.asarray(visualizer.visualize(batch).convert("RGB")).astype(int)
    row = picture[HEIGHT // 2, :WIDTH]  # the first panel: the anomaly map alone
    return np.argmin(((row[:, None, :] - COLOURS[None]) ** 2).sum(-1), axis=1)


def map_only(visualizer_class: type, **kwargs) -> ImageVisualizer:
    return visualizer_class(fields=["anomaly_map"], overlay_fields=[("image", [])], field_size=(WIDTH, HEIGHT),
                            text_config={"enable": False}, **kwargs)


@pytest.mark.parametrize(("low", "high", "threshold"), [(-1.5, 4.1, 0.74), (0.2, 3.97, 1.73), (0.42, 0.57, math.nan)])
def test_a_ramp_is_drawn_with_monotone_colours(low: float, high: float, threshold: float) -> None:
    """AA-CLIP-, AnomalyCLIP- and Bayes-PFL-like ranges: anomalib's own visualizer wraps around (or
    draws one flat colour); ours climbs the colour map once, threshold in the middle."""
    batch = ramp_batch(low, high)
    plain = drawn_levels(map_only(ImageVisualizer), batch)
    assert (np.diff(plain) < 0).any() or np.ptp(plain) < 64, "the plain visualizer was expected to fail here"

    levels = drawn_levels(map_only(ZeroShotVisualizer, map_min=low, map_max=high, threshold=threshold), batch)
    assert (np.diff(levels) >= 0).all(), "colours wrap around"
    assert np.ptp(levels) > 128, "one flat colour"
    middle = threshold if not math.isnan(threshold) else (low + high) / 2
    at_threshold = levels[np.argmin(np.abs(np.linspace(low, high, WIDTH) - middle))]
    assert abs(int(at_threshold) - 127) <= 2
    assert batch.anomaly_map.min() == low, "the batch itself was changed"


def test_display_follows_anomalib_normalisation_and_leaves_predictions_alone() -> None:
    maps = torch.linspace(-1.5, 4.1, 64).reshape(1, 8, 8)
    expected = ((maps - 0.7) / 5.6 + 0.5).clamp(0, 1)
    torch.testing.assert_close(display_map(maps, -1.5, 4.1, 0.7), expected)

    visualizer = ZeroShotVisualizer()  # no validation yet: the range of the maps drawn so far
    numpy_batch = NumpyImageBatch(image=np.zeros((1, 3, 8, 8), np.float32), anomaly_map=maps.numpy().copy())
    shown = visualizer.for_display(numpy_batch)
    assert isinstance(shown.anomaly_map, np.ndarray)
    assert shown.anomaly_map.min() == 0 and shown.anomaly_map.max() == 1
    np.testing.assert_array_equal(numpy_batch.anomaly_map, maps.numpy())

    restored = ZeroShotVisualizer()
    restored.load_state_dict(ZeroShotVisualizer(map_min=0.2, map_max=3.9, threshold=1.7).state_dict())
    assert (restored.map_min, restored.map_max, restored.threshold) == (0.2, 3.9, 1.7)


@pytest.mark.slow
def test_engine_pictures_use_the_validation_range_and_metrics_do_not_change(demo_root: Path, tmp_path: Path) -> None:
    from anomalib.engine import Engine

    from anomalib_zsad.data import ZSADDemo

    def test(visualizer: ImageVisualizer, root: Path) -> tuple[dict, AnomalyCLIP, Engine]:
        model = AnomalyCLIP(backbone="zsad-tiny", pretrained=None, image_size=64, visualizer=visualizer)  # seeded
        _ = model.model  # build the CLIP now
        model.learnt_parts_trained.fill_(True)  # zero-shot: Engine.test validates (thresholds, range), then tests
        engine = Engine(accelerator="cpu", default_root_dir=root, logger=False)
        datamodule = ZSADDemo(root=demo_root, category="coffee", eval_batch_size=3, num_workers=0)
        return engine.test(model, datamodule=datamodule, verbose=False)[0], model, engine

    assert isinstance(AnomalyCLIP(backbone="zsad-tiny", pretrained=None).visualizer, ZeroShotVisualizer)
    plain, _, _ = test(ImageVisualizer(), tmp_path / "plain")
    ours, model, engine = test(True, tmp_path / "ours")
    assert ours == plain  # the same figures, to the bit

    visualizer = model.visualizer
    assert visualizer.map_min < visualizer.map_max
    assert visualizer.threshold == pytest.approx(float(model.post_processor._pixel_threshold))
    assert len(list((tmp_path / "ours").rglob("*.png"))) == len(list((tmp_path / "plain").rglob("*.png"))) > 0

    engine.trainer.save_checkpoint(tmp_path / "model.ckpt")
    stored = torch.load(tmp_path / "model.ckpt", map_location="cpu", weights_only=True)["callbacks"]
    assert stored["ZeroShotVisualizer"] == visualizer.state_dict()
