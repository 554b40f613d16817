"""BGAD's module and Lightning model: one training step's direction, the maps, seeding, the
official weights format, the backbone weights (offline error, local file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_zsad.models.bgad import BGAD, BackboneWeightsUnavailableError
from anomalib_zsad.models.bgad import backbone as backbone_module

TINY = {"backbone": "resnet18", "layers": [1, 2], "pretrained": False, "image_size": 64, "coupling_layers": 2,
        "pos_embed_dim": 16, "flow_batch_size": 256, "permute_soft": False}


def test_one_step_pulls_normals_inside_b_n_and_pushes_anomalies_beyond_b_a() -> None:
    """What training_step does for one chunk: the BGAD loss, one Adam step on the flow. Normal
    log-likelihoods below b_n rise, anomalous ones above b_a fall."""
    model = BGAD(**TINY, bgspp_lambda=10.0, focal_weighting=False, pos_beta=0.5)
    flow_level = 0
    generator = torch.Generator().manual_seed(0)
    dim = model.model.backbone.out_dims[flow_level]
    normal = torch.randn(192, dim, generator=generator)
    anomalous = torch.randn(64, dim, generator=generator) * 0.5 + 0.5
    vectors = torch.cat([normal, anomalous])
    position = torch.randn(256, 16, generator=generator)
    mask = torch.cat([torch.zeros(192), torch.ones(64)])
    optimizer = torch.optim.Adam(model.model.flow_parameters(), lr=1e-3)

    logps = model.model.log_likelihood(flow_level, vectors, position)
    out = model.loss(logps, mask)
    b_n, b_a = (b.item() * model.loss.normalizer for b in out.boundaries)
    below = (mask == 0) & (logps.detach() <= b_n)
    above = (mask == 1) & (logps.detach() >= b_a)
    assert below.any() and above.any() and out.push.item() > 0 and out.pull.item() > 0
    optimizer.zero_grad()
    out.total.backward()
    optimizer.step()
    after = model.model.log_likelihood(flow_level, vectors, position).detach()
    assert after[below].mean() > logps.detach()[below].mean()
    assert after[above].mean() < logps.detach()[above].mean()


def test_maps_scores_and_score_normalization() -> None:
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    trained = BGAD(**TINY).eval()
    trained.model.logp_reference.copy_(torch.tensor([-1.0, -2.0]))
    with torch.no_grad():
        out = trained.model(images)
        alone = trained.model(images[:1])
        logps = trained.model.level_log_likelihoods(images)
    assert out.anomaly_map.shape == (3, 64, 64) and out.pred_score.shape == (3,)
    torch.testing.assert_close(alone.anomaly_map[0], out.anomaly_map[0])  # per image: the batch does not matter
    # by hand: levels - sum_l upsample(exp(logp_l - m_l)); the score is the map's maximum
    expected = 2.0 - sum(torch.nn.functional.interpolate(torch.exp(lp - m)[:, None], size=(64, 64), mode="bilinear",
                                                         align_corners=True)[:, 0] for lp, m in zip(logps, (-1.0, -2.0), strict=True))
    torch.testing.assert_close(out.anomaly_map, expected)
    torch.testing.assert_close(out.pred_score, expected.amax(dim=(-2, -1)))
    # the code's rule: references and top from the evaluated set itself
    trained.model.score_normalization = "batch"
    with torch.no_grad():
        batch = trained.model(images).anomaly_map
    normality = sum(torch.nn.functional.interpolate(torch.exp(lp - lp.amax())[:, None], size=(64, 64),
                                                    mode="bilinear", align_corners=True)[:, 0] for lp in logps)
    torch.testing.assert_close(batch, normality.amax() - normality)


def test_soft_permutations_are_seeded() -> None:
    settings = {**TINY, "layers": [1], "permute_soft": True, "seed": 4}  # drawn from numpy's generator
    first, second = BGAD(**settings), BGAD(**settings)
    state = first.model.flows.state_dict()
    assert all(torch.equal(v, second.model.flows.state_dict()[k]) for k, v in state.items())
    other = BGAD(**{**settings, "seed": 5})
    assert not torch.equal(state["0.module_list.0.w_perm"], other.model.flows.state_dict()["0.module_list.0.w_perm"])


def test_official_weights_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file as the authors' save_weights writes it loads level by level; a wrong one is refused."""
    source = BGAD(**TINY, seed=1)
    with torch.no_grad():  # "trained": away from the initial values that a fresh model has
        for parameter in source.model.flow_parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(7)))
    path = tmp_path / "mvtec_tf_efficientnet_b6_conditional_flow_model_bottle.pt"
    torch.save({"encoder_state_dict": source.model.backbone.feature_extractor.state_dict(),
                "decoder_state_dict": [flow.state_dict() for flow in source.model.flows]}, path)
    loaded = BGAD(**TINY, seed=1, official_checkpoint=path)
    assert bool(loaded.learnt_parts_trained)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().model(images).anomaly_map, source.eval().model(images).anomaly_map)
    with caplog.at_level("WARNING"):  # another encoder than the file's: said
        _ = BGAD(**TINY, seed=2, official_checkpoint=path).model
    assert "differs from the backbone" in caplog.text
    torch.save({"decoder_state_dict": "not flows"}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="official format"):
        BGAD(**TINY, official_checkpoint=tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="does not fit"):
        _ = BGAD(**{**TINY, "coupling_layers": 3}, official_checkpoint=path).model


def test_offline_imagenet_weights_fail_at_once_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbone_module, "cached_hub_file", lambda repo: None)
    monkeypatch.setattr(backbone_module, "_reachable", lambda host, timeout=3.0: False)
    model = BGAD(backbone="resnet18", layers=[1, 2], image_size=64)  # constructs: the backbone is built lazily
    with pytest.raises(BackboneWeightsUnavailableError, match="timm/resnet18") as error:
        _ = model.model
    assert "--model.pretrained" in str(error.value) and "no network" in str(error.value)


def test_local_weights_file(tmp_path: Path) -> None:
    import timm

    full = timm.create_model("resnet18", pretrained=False)
    torch.save(full.state_dict(), tmp_path / "resnet18.pth")
    model = BGAD(**{**TINY, "pretrained": str(tmp_path / "resnet18.pth")})
    torch.testing.assert_close(model.model.backbone.feature_extractor.conv1.weight, full.conv1.weight)
    assert model.identity()["weights_sha256"]
    torch.save({"fc.weight": torch.ones(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not hold the weights"):
        _ = BGAD(**{**TINY, "pretrained": str(tmp_path / "other.pth")}).model


def test_lightning_training_uses_the_anomalies_and_the_schedule(tmp_path: Path) -> None:
    """Two epochs through Lightning (one meta epoch each): the first on normal images only, the
    second with the anomalies' masks at feature resolution in the loss; the schedule's learning
    rate; the map reference taken from training."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    from anomalib_zsad.data.demo import make_demo_dataset
    from anomalib_zsad.data.few_anomalies import FewAnomalies
    from anomalib_zsad.models.bgad import learning_rate

    root = make_demo_dataset(tmp_path / "demo", seed=0, categories=("brick",), image_size=32, n_train=4,
                             n_test_good=1, n_test_defect=4)
    data = FewAnomalies(MVTecAD(root=root, category="brick", train_batch_size=8, num_workers=0), k=2, copy_paste=1)
    model = BGAD(**{**TINY, "image_size": 32, "flow_batch_size": 64}, meta_epochs=2, sub_epochs=1, focal_weighting=False)
    engine = Engine(max_epochs=2, accelerator="cpu", default_root_dir=tmp_path / "run", logger=False,
                    limit_val_batches=0)
    engine.fit(model, datamodule=data)
    metrics = engine.trainer.callback_metrics
    assert metrics["train_push"] > 0 or metrics["train_pull"] > 0  # the boundary-guided loss ran
    assert model._with_fas is True
    batches = engine.trainer.num_training_batches
    expected = learning_rate(2e-4, 1, 2, batch=batches - 1, batches=batches)
    assert model.optimizers().param_groups[0]["lr"] == pytest.approx(expected)
    assert torch.isfinite(model.model.logp_reference).all() and (model.model.logp_reference != 0).all()
