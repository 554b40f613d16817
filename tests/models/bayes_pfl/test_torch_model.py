"""Bayes-PFL's torch model on the tiny random CLIP: shapes, Monte-Carlo determinism, chunking,
training-step gradients, the flows and the losses."""

from __future__ import annotations

import pytest
import torch

from anomalib_zsad.clip import load_clip, tokenize
from anomalib_zsad.models.bayes_pfl import BayesPFLModel, PromptNoise, official_final_scores
from anomalib_zsad.models.bayes_pfl.flows import planar_flows
from anomalib_zsad.models.bayes_pfl.loss import dice_loss, flow_kl, focal_loss, orthogonal_loss
from anomalib_zsad.models.bayes_pfl.prompts import class_sentence, class_token_ids
from anomalib_zsad.models.bayes_pfl.torch_model import default_feature_layers

SIZE = 64


def make_model(**kwargs) -> BayesPFLModel:
    clip = load_clip("zsad-tiny", pretrained=None, activation="gelu", seed=0)
    options = {"num_samples": 2, "sample_chunk_size": 2, "num_flows": 3, "prompt_num": 2, "topk": 50} | kwargs
    return BayesPFLModel(clip, **options).eval()


@pytest.fixture(scope="module")
def model() -> BayesPFLModel:
    return make_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_forward_shapes_and_ranges(model: BayesPFLModel, images: torch.Tensor) -> None:
    with torch.no_grad():
        out = model(images)
    assert out.pred_score.shape == (3,)
    assert out.anomaly_map.shape == (3, SIZE, SIZE)
    assert ((out.pred_score >= 0) & (out.pred_score <= 1)).all()
    assert ((out.anomaly_map >= 0) & (out.anomaly_map <= 1)).all()
    assert model.feature_layers == [1, 2, 3, 4]


def test_feature_layers_follow_depth() -> None:
    assert default_feature_layers(24) == [6, 12, 18, 24]
    assert default_feature_layers(12) == [3, 6, 9, 12]
    assert default_feature_layers(4) == [1, 2, 3, 4]


def test_chunk_size_does_not_change_results(images: torch.Tensor) -> None:
    """Memory-bounded Monte-Carlo: processing samples one at a time gives the same numbers."""
    whole, chunked = make_model(sample_chunk_size=2), make_model(sample_chunk_size=1)
    with torch.no_grad():
        a, b = whole.predict(images), chunked.predict(images)
    for key in ("image_prob", "raw_map", "pred_score"):
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_seed_repeats_and_another_seed_differs(model: BayesPFLModel, images: torch.Tensor) -> None:
    torch.manual_seed(123)  # the global RNG must not matter
    with torch.no_grad():
        first = model.predict(images)["image_prob"]
        torch.randn(1000)
        again = model.predict(images)["image_prob"]
    other = make_model(seed=5)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        different = other.predict(images)["image_prob"]
    assert torch.equal(first, again)
    assert not torch.allclose(first, different)


def test_image_result_does_not_depend_on_its_batch(model: BayesPFLModel, images: torch.Tensor) -> None:
    """Common random numbers: every image sees the same draws, whatever batch it is in."""
    with torch.no_grad():
        batch = model.predict(images)
        alone = model.predict(images[1:2])
    torch.testing.assert_close(alone["image_prob"], batch["image_prob"][1:2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(alone["raw_map"], batch["raw_map"][1:2], atol=1e-6, rtol=1e-5)


def test_injected_noise_replaces_the_generator(model: BayesPFLModel, images: torch.Tensor) -> None:
    default = model.inference_noise()
    per_image = PromptNoise(default.context[None].expand(3, -1, -1).clone(), default.normal, default.abnormal)
    zero = PromptNoise(torch.zeros_like(default.context), default.normal, default.abnormal)
    with torch.no_grad():
        base = model.predict(images)["image_prob"]
        same = model.predict(images, noise=per_image)["image_prob"]
        moved = model.predict(images, noise=zero)["image_prob"]
    torch.testing.assert_close(same, base, atol=1e-6, rtol=0)
    assert not torch.allclose(moved, base)
    with pytest.raises(ValueError, match="context noise"):
        model.predict(images, noise=PromptNoise(torch.zeros(2, 2, 64), default.normal, default.abnormal))


def test_more_samples_change_the_estimate_not_the_shape(images: torch.Tensor) -> None:
    small, large = make_model(num_samples=1), make_model(num_samples=3, sample_chunk_size=2)
    with torch.no_grad():
        a, b = small(images), large(images)
    assert a.pred_score.shape == b.pred_score.shape
    assert not torch.allclose(a.pred_score, b.pred_score)


def test_class_sentences_follow_the_official_mapping() -> None:
    assert class_sentence("metal_nut") == "X metal nut"
    assert class_sentence("pcb3") == "X printed circuit board"
    assert class_sentence("Bottle") == "X bottle"
    assert torch.equal(class_token_ids(["metal_nut"], 77, 10), tokenize(["X metal nut"]))
    with pytest.raises(ValueError, match="too long"):
        class_token_ids([" ".join(["word"] * 70)], 77, 10)


def test_class_names_change_the_prompts(model: BayesPFLModel, images: torch.Tensor) -> None:
    with torch.no_grad():
        default = model.predict(images)["image_prob"]
        named = model.predict(images, ["bottle", "bottle", "object"])["image_prob"]
    assert not torch.allclose(default[:2], named[:2])
    torch.testing.assert_close(default[2], named[2])


def test_truncated_text_equals_full_context(images: torch.Tensor) -> None:
    """The text tower stops after the last end token (13 of 77 positions for "X object" with 10
    prompt tokens); causal attention leaves inference and training outputs and gradients unchanged."""
    model = make_model().train()
    assert model.text_length(None) == 13
    assert model.text_length(["metal_nut", "object"]) == 14  # "metal nut" is two words
    width, gen = model.clip.arch.text_width, torch.Generator().manual_seed(2)
    noise = PromptNoise(*(torch.randn(shape, generator=gen) for shape in ((3, 1, width), (1, width), (1, width))))
    labels, masks = torch.tensor([0, 1, 1]), torch.zeros(3, SIZE, SIZE)
    results = {}
    for truncate in (True, False):
        model.truncate_text = truncate
        model.zero_grad()
        out = model.training_outputs(images, labels, masks, ["metal_nut", "object", "bottle"], noise=noise,
                                     prompt_index=1)
        out["loss"].backward()
        with torch.no_grad():
            predicted = model.predict(images)
        results[truncate] = (out["loss"].detach(), model.prompt_context.grad.clone(), predicted)
    (loss, grad, short), (full_loss, full_grad, full) = results[True], results[False]
    torch.testing.assert_close(loss, full_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, full_grad, atol=1e-6, rtol=1e-4)
    for key in ("image_prob", "raw_map", "pred_score"):
        torch.testing.assert_close(short[key], full[key], atol=1e-6, rtol=1e-5)


def test_planar_flow_log_det_is_the_jacobian() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, generator=gen, dtype=torch.float64)
    u, w = (torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    b = torch.randn(3, 1, generator=gen, dtype=torch.float64)
    zk, log_det = planar_flows(z[None], u[:, None], w[:, None], b[:, None])
    jac = torch.autograd.functional.jacobian(lambda x: planar_flows(x[None], u[:, None], w[:, None], b[:, None])[0][0], z)
    assert zk.shape == (1, 5)
    torch.testing.assert_close(log_det[0], torch.linalg.slogdet(jac).logabsdet, atol=1e-3, rtol=0)


def test_training_stage1_gradients(images: torch.Tensor) -> None:
    model = make_model().train()
    masks = torch.zeros(3, SIZE, SIZE)
    masks[1, 10:30, 20:40] = 1
    out = model.training_outputs(images, torch.tensor([0, 1, 0]), masks, stage=1)
    assert torch.isfinite(out["loss"])
    expected = (out["loss_class"] + (out["loss_focal"].sum() + out["loss_dice"].sum()) + out["loss_dist_reg"]
                + out["loss_orthogonal"])
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ("prompt_context", "prompt_state_abnormal", "temperature_pixel", "temperature_image",
                 "PFL_context.amor_u.weight", "PFL_normal.state", "state_encoder.weight_mean.module.0.weight",
                 "RCA.q_proj_pre.weight", "RCA.linear_proj.3.weight", "class_mapping.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    for name in ("context_decoder.weight_mean.module.0.weight", "PFL_context.p_mu.0.weight",
                 "fuse.fuse_modules.weight", "image_mapping.weight"):
        assert grads[name] is None, name
    assert all(p.grad is None for p in model.clip.parameters())


def test_training_stage2_is_the_classification_loss(images: torch.Tensor) -> None:
    model = make_model().train()
    out = model.training_outputs(images, torch.tensor([0, 1, 0]), None, stage=2, prompt_index=1)
    assert int(out["prompt_index"]) == 1
    assert torch.equal(out["loss"], out["loss_class"])
    out["loss"].backward()
    assert model.image_mapping.weight.grad is not None
    assert model.fuse.compress.weight.grad is not None


def test_training_without_masks_has_no_segmentation_terms(images: torch.Tensor) -> None:
    model = make_model().train()
    out = model.training_outputs(images, torch.tensor([0, 1, 1]), None)
    assert "loss_focal" not in out
    torch.testing.assert_close(out["loss"], out["loss_class"] + out["loss_dist_reg"] + out["loss_orthogonal"])


def test_training_draws_come_from_the_private_generator(images: torch.Tensor) -> None:
    a, b = make_model().train(), make_model().train()
    labels = torch.tensor([0, 1, 0])
    torch.manual_seed(0)
    la = a.training_outputs(images, labels)["loss"]
    torch.manual_seed(99)
    lb = b.training_outputs(images, labels)["loss"]
    torch.testing.assert_close(la, lb, atol=0, rtol=0)


def test_focal_and_dice_losses() -> None:
    probs = torch.zeros(1, 2, 2, 2)
    probs[:, 1] = torch.tensor([[0.9, 0.2], [0.5, 0.1]])
    probs[:, 0] = 1 - probs[:, 1]
    mask = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    fg = [-(0.1**2) * torch.log(torch.tensor(0.9)), -(0.5**2) * torch.log(torch.tensor(0.5))]
    bg = [-(0.2**2) * torch.log(torch.tensor(0.8)), -(0.1**2) * torch.log(torch.tensor(0.9))]
    torch.testing.assert_close(focal_loss(probs, mask), sum(fg) / 2 + sum(bg) / 2)
    torch.testing.assert_close(dice_loss(probs, mask), torch.tensor(1 - (2 * 1.4 + 1e-5) / (1.7 + 2 + 1e-5)))


def test_orthogonal_loss_vanishes_for_orthogonal_prompts() -> None:
    eye = torch.eye(4)[None]
    text = torch.cat([eye[:, :2], eye[:, 2:]], dim=1)  # 2 normal, 2 abnormal rows
    assert orthogonal_loss(text, 2) == 0
    same = torch.ones(1, 4, 4)
    torch.testing.assert_close(orthogonal_loss(same, 2), torch.tensor(1.0))  # 2 x mean of off-diagonals 1/2


def test_state_flow_kl_counts_log_det_once_per_batch(model: BayesPFLModel) -> None:
    """The official state-flow KL: (log q - log p) - logdet / B, B the image batch."""
    flow = model.PFL_normal(model.state_encoder, torch.randn(1, 1, 64))
    kl1, kl4 = flow_kl(flow, 1), flow_kl(flow, 4)
    torch.testing.assert_close(kl1 - kl4, -flow.log_det[0, 0] * (1 - 1 / 4), atol=1e-4, rtol=1e-5)


def test_official_final_scores_min_max_each_term() -> None:
    scores = official_final_scores(torch.tensor([0.2, 0.4, 0.3]), torch.tensor([0.5, 0.1, 0.3]))
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64), atol=1e-7, rtol=0)


@pytest.mark.slow
def test_exported_graph_matches_eager(model: BayesPFLModel) -> None:
    """Noise and class tokens are buffers and the stage a Python branch: the whole model (text
    tower included, the prompts depend on the image) exports as one graph."""
    image = torch.rand(1, 3, SIZE, SIZE)
    program = torch.export.export(model, (image,))
    with torch.no_grad():
        expected, actual = model(image), program.module()(image)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, atol=1e-6, rtol=0)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, atol=1e-6, rtol=0)
