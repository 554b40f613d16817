"""M3DM's pictures carry the depth: anomalib's panels, then the z channel of the cloud."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from anomalib.data import DepthBatch, ImageBatch
from PIL import Image

from anomalib_zsad.data.demo3d import render_sample
from anomalib_zsad.models.m3dm import M3DM
from anomalib_zsad.models.m3dm.visualizer import DepthVisualizer, depth_panel


def _batch(tmp_path: Path) -> DepthBatch:
    rgb, xyz, mask = render_sample("dome", 64, np.random.default_rng(0), "bump")
    path = tmp_path / "data" / "dome" / "test" / "bump" / "rgb" / "000.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(rgb).save(path)
    return DepthBatch(image=torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255,
                      depth_map=torch.from_numpy(xyz).permute(2, 0, 1)[None], image_path=[str(path)],
                      gt_mask=torch.from_numpy(mask > 0)[None], anomaly_map=torch.rand(1, 64, 64),
                      pred_score=torch.tensor([0.5]), pred_mask=torch.zeros(1, 64, 64, dtype=torch.bool),
                      gt_label=torch.tensor([True]))


def test_m3dm_saves_pictures_with_the_depth_panel(tmp_path: Path) -> None:
    """The saved picture is anomalib's, one field wider; its last panel is the rendered z channel:
    grey (R = G = B), black background, the dome's top (nearest point) white."""
    visualizer = M3DM.configure_visualizer()
    assert isinstance(visualizer, DepthVisualizer)
    batch = _batch(tmp_path)
    plain = super(DepthVisualizer, visualizer).visualize(ImageBatch(**{k: getattr(batch, k) for k in (
        "image", "image_path", "gt_mask", "anomaly_map", "pred_score", "pred_mask", "gt_label")}))  # anomalib's
    trainer = SimpleNamespace(default_root_dir=tmp_path / "run", datamodule=None)
    module = SimpleNamespace(post_processor=None)
    visualizer.on_test_batch_end(trainer, module, batch, batch, 0)
    saved = list((tmp_path / "run" / "images").rglob("*.png"))
    assert len(saved) == 1
    picture = np.asarray(Image.open(saved[0]).convert("RGB"))
    width = visualizer.field_size[0]
    assert picture.shape[1] == plain.width + width
    panel = picture[-visualizer.field_size[1]:, -width:]  # below the title
    assert (panel[..., 0] == panel[..., 1]).all() and (panel[..., 1] == panel[..., 2]).all()
    expected = np.asarray(depth_panel(batch.depth_map[0], visualizer.field_size))
    assert np.array_equal(panel[-20:], expected[-20:])  # the bottom rows: no title there
    assert panel[-1, -1, 0] == 0 and panel.max() == 255  # background corner black; the nearest point white
    # visualize() gives the same picture as the file
    assert visualizer.visualize(batch).size == Image.open(saved[0]).size


def test_pictures_of_good_and_defective_samples_do_not_overwrite_each_other(tmp_path: Path) -> None:
    """anomalib names a picture after the path below the folder named like the datamodule
    (``MVTec3DFixed`` is not one): both ``test/good/rgb/000.png`` and ``test/bump/rgb/000.png``
    became ``rgb/000.png``. The data set's root folder names them now."""
    batch = _batch(tmp_path)
    good = tmp_path / "data" / "dome" / "test" / "good" / "rgb" / "000.png"
    good.parent.mkdir(parents=True)
    Image.open(batch.image_path[0]).save(good)
    visualizer = M3DM.configure_visualizer()
    datamodule = SimpleNamespace(name="MVTec3DFixed", root=tmp_path / "data", category="dome")
    trainer = SimpleNamespace(default_root_dir=tmp_path / "run", datamodule=datamodule)
    for path in (batch.image_path[0], str(good)):
        batch.image_path = [path]
        visualizer.on_test_batch_end(trainer, SimpleNamespace(post_processor=None), batch, batch, 0)
    saved = sorted(p.relative_to(tmp_path / "run" / "images").as_posix()
                   for p in (tmp_path / "run" / "images").rglob("*.png"))
    assert saved == ["test/bump/rgb/000.png", "test/good/rgb/000.png"]
