"""M3DM through anomalib: the 3D demo set and the MVTec 3D-AD datamodule, clear errors (no point
clouds, weights missing offline), the official UFF format, the banks' fitting rules, stochastic
depth, and ``anomalib train`` on the command line. The shared flow (fit, test, predict, checkpoint,
reload) is in ``tests/models/test_contract_flow.py``; parity with the official code in ``test_parity.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import DepthBatch, ImageBatch

from anomalib_zsad.data.demo3d import make_demo3d_dataset, render_sample
from anomalib_zsad.data.errors import DatasetError
from anomalib_zsad.data.mvtec3d import MVTec3DFixed
from anomalib_zsad.models.m3dm import (
    M3DM,
    FeatureFusionBlock,
    PointCloudsMissingError,
    RGBWeightsUnavailableError,
    read_uff_checkpoint,
)
from anomalib_zsad.pointcloud import PointMAEWeightsUnavailableError

TINY = {"backbone": "vit_small_patch8_224.dino", "pretrained": False, "point_checkpoint": None, "image_size": 64,
        "num_group": 32, "group_size": 16}


@pytest.fixture(scope="module")
def demo3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo3d_dataset(tmp_path_factory.mktemp("d3") / "demo3d", seed=0, categories=("dome", "ring"),
                               image_size=64, n_train=3, n_test_good=2, n_test_defect=3)


def _clouds(count: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.stack([torch.from_numpy(render_sample("dome", size, rng)[1]).permute(2, 0, 1) for _ in range(count)])


# ------------------------------------------------------------------------------------------ the demo set
def test_demo3d_is_read_by_anomalibs_mvtec3d_layout(demo3d: Path) -> None:
    """MVTec 3D-AD's layout: rgb/xyz/gt per label; organized float32 clouds with a zero background;
    masks where the defects are (none for good samples); the same files again for the same seed."""
    data = MVTec3DFixed(root=demo3d, category="ring", train_batch_size=2, eval_batch_size=8, num_workers=0)
    data.setup()
    assert len(data.train_data) == 3 and len(data.test_data) == 5
    batch = next(iter(data.test_dataloader()))
    assert isinstance(batch, DepthBatch)
    assert batch.depth_map.shape == (5, 3, 64, 64) and batch.depth_map.dtype == torch.float32
    foreground = (batch.depth_map != 0).all(dim=1)
    assert foreground.any() and not foreground.all()
    assert torch.all(batch.depth_map[:, 2][foreground] > 0.3)  # z: ~0.4 m from the camera
    for label, mask in zip(batch.gt_label, batch.gt_mask, strict=True):
        assert bool(mask.any()) == bool(label)
    assert (batch.image.sum(1)[~foreground] == 0).all()  # the render's background is black
    train = next(iter(data.train_dataloader()))
    assert not train.gt_label.any()
    again = make_demo3d_dataset(demo3d, seed=0, categories=("dome", "ring"), image_size=64, n_train=3, n_test_good=2,
                                n_test_defect=3)
    assert again == demo3d
    with pytest.raises(DatasetError, match="other parameters"):
        make_demo3d_dataset(demo3d, seed=1, categories=("dome", "ring"), image_size=64, n_train=3)


def test_demo3d_defects_change_the_right_modality() -> None:
    """bump/dent move the surface inside the mask; a stain changes colour only."""
    for defect in ("bump", "dent", "stain"):
        clean = render_sample("tablet", 64, np.random.default_rng(5))
        rgb, xyz, mask = render_sample("tablet", 64, np.random.default_rng(5), defect)
        inside = mask > 0
        assert inside.any()
        dz = np.abs(xyz[..., 2] - clean[1][..., 2])
        if defect == "stain":
            assert dz.max() < 3e-4  # sensor noise only (the draws after the defect differ)
            assert (np.abs(rgb.astype(int) - clean[0].astype(int))[inside] > 10).any()
        else:
            assert dz[inside].min() > 0.0005 and dz[~inside].max() < dz[inside].max()


def test_anomalib_mvtec3d_index_needs_the_fix_under_pandas_3(demo3d: Path) -> None:
    """anomalib's MVTec3D leaves the training rows' mask paths missing: MVTec3DFixed gives ""."""
    from anomalib.data.datasets.depth.mvtec_3d import MVTec3DDataset

    from anomalib_zsad.data.mvtec3d import MVTec3DFixedDataset

    fixed = MVTec3DFixedDataset(root=demo3d, category="dome", split="train")
    assert (fixed.samples["mask_path"] == "").all()
    assert fixed[0].gt_label == 0
    original = MVTec3DDataset(root=demo3d, category="dome", split="train")
    if original.samples["mask_path"].isna().any():  # pandas 3: anomalib's item fails on the NaN
        with pytest.raises(TypeError, match="Path must be"):
            _ = original[0]


# ------------------------------------------------------------------------------------------ errors
def test_a_batch_without_point_clouds_is_refused_with_the_reason() -> None:
    model = M3DM(**TINY)
    batch = ImageBatch(image=torch.rand(1, 3, 64, 64))
    with pytest.raises(PointCloudsMissingError, match="MVTec3D"):
        model.validation_step(batch)
    depth = DepthBatch(image=torch.rand(1, 3, 64, 64), depth_map=torch.rand(1, 1, 64, 64))
    with pytest.raises(PointCloudsMissingError, match="xyz clouds"):
        model.training_step(depth)


def test_weights_that_cannot_be_had_offline_fail_with_one_clear_message(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    monkeypatch.setenv("ZSAD_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    model = M3DM(**{**TINY, "backbone": "vit_base_patch8_224_dino", "pretrained": True, "image_size": 224})
    with pytest.raises(RGBWeightsUnavailableError) as error:
        _ = model.model
    message = str(error.value)
    assert "timm/vit_base_patch8_224.dino" in message and "dino_vitbase8_pretrain.pth" in message
    assert "--model.pretrained" in message
    missing = tmp_path / "pointmae_pretrain.pth"
    with pytest.raises(PointMAEWeightsUnavailableError, match="pretrain.pth") as error:
        _ = M3DM(**{**TINY, "point_checkpoint": str(missing)}).model
    assert "--model.point_checkpoint" in str(error.value)


def test_official_uff_checkpoint_loads_and_is_checked(tmp_path: Path) -> None:
    """``{'model': FeatureFusionBlock.state_dict(), 'epoch': 0}`` loads completely into the UFF; a
    file without UFF tensors or with NaN is refused at construction; a UFF file does not make the
    model trained (its banks still need the training samples)."""
    block = FeatureFusionBlock(1152, 384)
    torch.save({"model": block.state_dict(), "epoch": 0}, tmp_path / "checkpoint-0.pth")
    model = M3DM(**TINY, official_checkpoint=tmp_path / "checkpoint-0.pth")
    assert not bool(model.learnt_parts_trained)
    state = model.model.fusion.state_dict()
    assert all(torch.equal(state[k], v) for k, v in block.state_dict().items())
    assert set(read_uff_checkpoint(tmp_path / "checkpoint-0.pth")) == set(block.state_dict())
    torch.save({"model": {"other.weight": torch.ones(2)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no UFF"):
        M3DM(**TINY, official_checkpoint=tmp_path / "other.pth")
    small = FeatureFusionBlock(1152, 768)
    torch.save({"model": small.state_dict()}, tmp_path / "vit_b.pth")
    with pytest.raises(ValueError, match="does not fit"):
        _ = M3DM(**TINY, official_checkpoint=tmp_path / "vit_b.pth").model


# ------------------------------------------------------------------------------------------ fitting rules
def test_banks_follow_the_official_sizes_and_normalisation() -> None:
    """Point bank ``int(f·rows)`` plus a zero row, RGB and fused banks ``int(f·n_point)``, all three
    libraries normalised by the point library's mean and the RGB library's std; the SVMs are fitted."""
    model = M3DM(**TINY, f_coreset=0.2)
    images, clouds = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), _clouds(2)
    torch_model = model.model
    features = torch_model.extract(images, clouds)
    for sample in features:
        torch_model.add_training_sample(sample)
    xyz_lib = torch.cat([f.xyz_patch for f in features])
    rgb_lib = torch.cat([f.rgb_patch for f in features])
    torch_model.fit()
    n_xyz = int(0.2 * xyz_lib.shape[0])
    assert torch_model.rgb_bank.shape[0] == torch_model.fusion_bank.shape[0] == int(0.2 * n_xyz)
    assert torch_model.xyz_bank.shape[0] <= n_xyz + 1 and not torch_model.xyz_bank[-1].any()
    torch.testing.assert_close(torch_model.bank_mean, xyz_lib.mean())
    torch.testing.assert_close(torch_model.bank_std, rgb_lib.std())
    assert not torch.equal(torch_model.detect_coef, torch.ones(3, dtype=torch.float64))
    with torch.no_grad():
        out = torch_model(images, clouds)
    assert out.pred_score.shape == (2,) and out.anomaly_map.shape == (2, 64, 64)
    assert torch.isfinite(out.anomaly_map).all()


def test_max_sample_limits_the_training_samples() -> None:
    model = M3DM(**TINY, max_sample=2)  # the official loop takes max_sample + 1
    model.on_train_epoch_start()
    batch = DepthBatch(image=torch.rand(2, 3, 64, 64), depth_map=_clouds(2))
    for _ in range(3):
        model.training_step(batch)
    assert model.model.training_samples == 3


def test_stochastic_depth_is_off_unless_asked_and_then_seeded() -> None:
    """Deterministic by default; ``point_drop_path`` draws anew at every forward (the official
    behaviour), from a generator seeded by ``seed``."""
    clouds = _clouds(1)[0]
    plain = M3DM(**TINY).model
    first, _ = plain.point_features(plain.resize_clouds(clouds[None])[0])
    again, _ = plain.point_features(plain.resize_clouds(clouds[None])[0])
    assert torch.equal(first, again)
    drawn = [M3DM(**TINY, point_drop_path=True, seed=1).model for _ in range(2)]
    cloud = drawn[0].resize_clouds(clouds[None])[0]
    a1, a2 = drawn[0].point_features(cloud)[0], drawn[0].point_features(cloud)[0]
    b1 = drawn[1].point_features(cloud)[0]
    assert torch.equal(a1, b1)  # same seed, same draws
    assert not torch.equal(a1, a2) or not torch.equal(a1, first)  # draws change the features


# ------------------------------------------------------------------------------------------ the 8-bit blur
@pytest.mark.parametrize(("size", "radius"), [((224, 224), 4), ((64, 64), 4), ((31, 17), 2.5), ((5, 7), 7),
                                              ((1, 9), 1), ((40, 40), 0.3)])
def test_gaussian_blur_is_pillows_bit_for_bit(size: tuple[int, int], radius: float) -> None:
    """Pillow's box-blur approximation of a Gaussian on 8-bit images, in torch integer arithmetic."""
    from PIL import Image, ImageFilter

    from anomalib_zsad.models.m3dm.memory import gaussian_blur_8bit

    rng = np.random.default_rng(sum(size))
    for image in (rng.integers(0, 256, size=size, dtype=np.uint8),
                  np.clip(rng.normal(100, 60, size=size), 0, 255).astype(np.uint8)):
        expected = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))
        np.testing.assert_array_equal(gaussian_blur_8bit(torch.from_numpy(image), radius).numpy(), expected)


def test_map_blur_is_the_official_knn_gaussian_blur() -> None:
    """``KNNGaussianBlur``: ToPILImage(map / max) -> GaussianBlur(4) -> ToTensor * max."""
    from PIL import ImageFilter
    from torchvision.transforms import ToPILImage, ToTensor

    from anomalib_zsad.models.m3dm.memory import blur_8bit

    score_map = torch.rand(1, 1, 56, 56, generator=torch.Generator().manual_seed(0)) * 3
    score_map = torch.nn.functional.interpolate(score_map, size=(224, 224), mode="bilinear")
    peak = score_map.max()
    expected = ToTensor()(ToPILImage()(score_map[0] / peak).filter(ImageFilter.GaussianBlur(radius=4))) * peak
    torch.testing.assert_close(blur_8bit(score_map[0, 0], 4), expected[0], atol=0, rtol=0)
    assert not blur_8bit(torch.zeros(8, 8)).any()


# ------------------------------------------------------------------------------------------ single-bank settings
@pytest.mark.parametrize(("method", "modality"), [("DINO", "rgb"), ("Point_MAE", "xyz"), ("Fusion", "fusion")])
def test_single_bank_settings_score_with_their_own_bank(method: str, modality: str) -> None:
    """The official ``--method_name DINO`` / ``Point_MAE`` / ``Fusion``: one bank of that modality
    (the RGB one normalised by its own mean and std, the others not), ``int(f·rows)`` coreset rows,
    no SVM: the output is that bank's re-weighted score (``+1e-5`` in the re-weighting for DINO and
    Point_MAE) and blurred map."""
    from anomalib_zsad.models.m3dm.memory import score_modality

    model = M3DM(**TINY, method_name=method, f_coreset=0.5)
    torch_model = model.model
    images, clouds = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)), _clouds(3)
    features = torch_model.extract(images, clouds)
    for sample in features:
        torch_model.add_training_sample(sample)
    library = torch.cat([getattr(f, f"{modality}_patch") for f in features])
    torch_model.fit()
    bank = getattr(torch_model, f"{modality}_bank")
    assert bank.shape[0] == int(0.5 * library.shape[0])
    if modality == "rgb":
        torch.testing.assert_close(torch_model.bank_mean, library.mean())
        torch.testing.assert_close(torch_model.bank_std, library.std())
    else:
        assert float(torch_model.bank_mean) == 0 and float(torch_model.bank_std) == 1
    for other in {"xyz", "rgb", "fusion"} - {modality}:  # the other banks stay empty
        assert getattr(torch_model, f"{other}_bank").shape[0] == 1
    test_images, test_clouds = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)), _clouds(1, seed=5)
    with torch.no_grad():
        out = torch_model(test_images, test_clouds)
        sample = torch_model.extract(test_images, test_clouds)[0]
    patch = (getattr(sample, f"{modality}_patch") - torch_model.bank_mean) / torch_model.bank_std
    grid = torch_model.rgb_grids(sample)[modality]
    expected = score_modality(patch, bank, grid, (64, 64), weight_eps=0.0 if method == "Fusion" else 1e-5)
    assert torch.equal(out.pred_score[0], expected.s.float())
    assert torch.equal(out.anomaly_map[0], expected.s_map.float())
    unweighted = score_modality(patch, bank, grid, (64, 64))
    assert method == "Fusion" or not torch.equal(unweighted.s, expected.s)


def test_dino_point_mae_fuses_two_banks_with_scores_divided_by_1000() -> None:
    """``method_name`` DINO+Point_MAE (the official ``DoubleRGBPointFeatures``): the main setting's
    normalisation and coreset sizes for the point and RGB banks, no zero row added to the point
    bank, no UFF bank; the re-weighting on distances divided by 1000; 2-input SVMs."""
    from anomalib_zsad.models.m3dm.decision import svm_score_samples
    from anomalib_zsad.models.m3dm.memory import score_modality

    model = M3DM(**TINY, method_name="DINO+Point_MAE", f_coreset=0.5)
    torch_model = model.model
    images, clouds = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)), _clouds(3)
    features = torch_model.extract(images, clouds)
    for sample in features:
        torch_model.add_training_sample(sample)
    xyz_lib = torch.cat([f.xyz_patch for f in features])
    rgb_lib = torch.cat([f.rgb_patch for f in features])
    torch_model.fit()
    n_xyz = int(0.5 * xyz_lib.shape[0])
    assert torch_model.xyz_bank.shape[0] == n_xyz and torch_model.rgb_bank.shape[0] == int(0.5 * n_xyz)
    assert torch_model.fusion_bank.shape[0] == 1
    torch.testing.assert_close(torch_model.bank_mean, xyz_lib.mean())
    torch.testing.assert_close(torch_model.bank_std, rgb_lib.std())
    assert torch_model.detect_coef.shape == torch_model.seg_coef.shape == (2,)
    test_images, test_clouds = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)), _clouds(1, seed=5)
    with torch.no_grad():
        out = torch_model(test_images, test_clouds)
        sample = torch_model.extract(test_images, test_clouds)[0]
    grids = torch_model.rgb_grids(sample)
    single = {name: score_modality(torch_model.normalise(getattr(sample, f"{name}_patch")),
                                   getattr(torch_model, f"{name}_bank"), grids[name], (64, 64), divisor=1000)
              for name in ("xyz", "rgb")}
    s = torch.stack([single["xyz"].s, 0.1 * single["rgb"].s]).reshape(1, 2)
    expected = svm_score_samples(s, torch_model.detect_coef, torch_model.detect_offset)
    assert torch.equal(out.pred_score, expected.float())


def test_unimplemented_method_names_are_refused_at_once() -> None:
    with pytest.raises(ValueError, match="method_name must be one of"):
        M3DM(**TINY, method_name="DINO+Point_MAE+add")
