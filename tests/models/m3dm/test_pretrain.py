"""UFF pre-training (``python -m anomalib_zsad.models.m3dm.pretrain``): the official pairing of the
training data, the MAE learning-rate schedule, and a run on the 3D demo set whose checkpoint loads
into M3DM."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from anomalib_zsad.data.demo3d import make_demo3d_dataset
from anomalib_zsad.models.m3dm import M3DM, read_uff_checkpoint
from anomalib_zsad.models.m3dm.pretrain import mae_learning_rate, main, paired_rgb


def test_tile_pairing_is_the_official_interleaving() -> None:
    """rgb.repeat(4, 1).reshape(R, 4, C).permute(1, 0, 2): row j*R + i holds RGB row (4i + j) mod R."""
    rows = 6
    rgb = torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, 2)
    upsampled = torch.zeros(4 * rows, 2)
    tiled = paired_rgb(rgb, upsampled, "tile")
    expected = [(4 * i + j) % rows for j in range(4) for i in range(rows)]
    assert tiled[:, 0].long().tolist() == expected
    assert torch.equal(paired_rgb(rgb, upsampled, "upsample"), upsampled)
    with pytest.raises(ValueError, match="pairing"):
        paired_rgb(rgb, upsampled, "other")


def test_mae_schedule() -> None:
    assert mae_learning_rate(0.0, 0.003, 10, 1) == 0
    assert mae_learning_rate(0.5, 0.003, 10, 1) == pytest.approx(0.0015)
    assert mae_learning_rate(1.0, 0.003, 10, 1) == pytest.approx(0.003)
    assert mae_learning_rate(5.5, 0.003, 10, 1) == pytest.approx(0.003 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert mae_learning_rate(10.0, 0.003, 10, 1, min_lr=1e-5) == pytest.approx(1e-5)


def test_pretraining_on_the_demo_set_writes_a_checkpoint_m3dm_loads(tmp_path: Path) -> None:
    root = make_demo3d_dataset(tmp_path / "demo3d", categories=("ring",), image_size=64, n_train=3, n_test_good=1,
                               n_test_defect=1)
    last = main(["--root", str(root), "--categories", "ring", "--output", str(tmp_path / "uff"), "--backbone",
                 "vit_small_patch8_224.dino", "--pretrained", "false", "--point-checkpoint", "none", "--image-size",
                 "64", "--num-group", "32", "--group-size", "16", "--epochs", "2", "--batch-size", "2",
                 "--accum-iter", "1", "--lr", "0.001", "--accelerator", "cpu", "--devices", "1"])
    assert last.is_file() and (tmp_path / "uff" / "checkpoint-0.pth").is_file()
    features = sorted((tmp_path / "uff" / "patch_lib").glob("*.pt"))
    assert len(features) == 3 and torch.load(features[0], weights_only=True).shape == (256, 1152 + 384)
    state = read_uff_checkpoint(last)
    model = M3DM(backbone="vit_small_patch8_224.dino", pretrained=False, point_checkpoint=None, image_size=64,
                 num_group=32, group_size=16, official_checkpoint=last)
    loaded = model.model.fusion.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    untrained = M3DM(backbone="vit_small_patch8_224.dino", pretrained=False, point_checkpoint=None, image_size=64,
                     num_group=32, group_size=16).model.fusion.state_dict()
    assert any(not torch.equal(untrained[k], loaded[k]) for k in loaded)  # it learnt something
