"""AdaCLIP's torch model on the tiny random CLIP: data flow, prompts, HSF, loss, gradients."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from anomalib_zsad.clip import ClipModel
from anomalib_zsad.models.adaclip import AdaCLIPLoss, AdaCLIPModel
from anomalib_zsad.models.adaclip.hsf import HybridSemanticFusion, kmeans_labels, sklearn_kmeans_labels
from anomalib_zsad.models.adaclip.torch_model import default_feature_layers
from anomalib_zsad.models.components.class_names import class_name_from_path, class_names_for

SIZE = 64  # 4 x 4 patches of the tiny CLIP: a forward pass takes milliseconds


@pytest.fixture
def model(tiny_clip) -> AdaCLIPModel:
    return AdaCLIPModel(tiny_clip, seed=1).eval()


def test_layers_and_depth_follow_the_clip(tiny_clip) -> None:
    assert default_feature_layers(24) == [6, 12, 18, 24]
    assert default_feature_layers(12) == [3, 6, 9, 12]
    assert default_feature_layers(4) == [1, 2, 3, 4]
    model = AdaCLIPModel(tiny_clip)
    assert model.prompt_depth == 4
    assert len(model.patch_token_layer) == 4
    shallow_text = ClipModel(replace(tiny_clip.arch, text_layers=2))
    assert AdaCLIPModel(shallow_text).prompt_depth == 2  # min(4, vision blocks, text blocks)
    with pytest.raises(ValueError, match="prompt_depth 4 exceeds"):
        AdaCLIPModel(shallow_text, prompt_depth=4)
    with pytest.raises(ValueError, match="prompting_type"):
        AdaCLIPModel(tiny_clip, prompting_type="X")


def test_forward_gives_scores_and_smoothed_maps(model) -> None:
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = model(images)
        raw = model.unsmoothed_map(model.compute(images), (SIZE, SIZE))
    assert out.pred_score.shape == (2,)
    assert ((out.pred_score > 0) & (out.pred_score < 1)).all()
    assert out.anomaly_map.shape == (2, SIZE, SIZE)
    torch.testing.assert_close(out.anomaly_map, model.blur(raw))
    assert ((raw >= 0) & (raw <= 1)).all()


def test_a_batch_equals_its_images_one_by_one(model) -> None:
    """Prompts and text features are per image: batching must not mix images."""
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))  # fixed: a random draw
    # can flip one fp16-rounded prompt value and move a map pixel by ~5e-5 (seen once in CI)
    with torch.no_grad():
        batched = model(images)
        single = [model(images[i:i + 1]) for i in range(3)]
    torch.testing.assert_close(batched.pred_score, torch.cat([s.pred_score for s in single]), atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.anomaly_map, torch.cat([s.anomaly_map for s in single]), atol=5e-5, rtol=0)


def test_visual_prompts_are_appended_then_dropped(model) -> None:
    images = torch.randn(1, 3, SIZE, SIZE)
    seen: list[int] = []
    original = model.clip.visual.forward

    def spy(*args, **kwargs):
        hook = kwargs.get("pre_block")
        if hook is None:  # the prompt-free pass that makes the dynamic prompts
            return original(*args, **kwargs)

        def recording(index, x):
            x = hook(index, x)
            seen.append(x.shape[1])
            return x
        return original(*args, **{**kwargs, "pre_block": recording})

    model.clip.visual.forward = spy
    try:
        with torch.no_grad():
            out = model.compute(images)
    finally:
        del model.clip.visual.forward
    tokens = 1 + (SIZE // 16) ** 2
    assert seen == [tokens + model.prompt_length] * 4  # appended before block 0, then replaced in place
    assert all(layer.shape[1] == tokens for layer in out.layer_tokens)
    assert out.dynamic_visual_prompts.shape == (1, model.prompt_length, 64)


def test_prompts_are_rounded_to_fp16_values(model) -> None:
    dynamic = torch.randn(1, model.prompt_length, 64)
    rounded = model._prompt_tokens(model.visual_prompter, dynamic, 1)
    assert torch.equal(rounded, rounded.half().float())
    model.round_prompts_to_fp16 = False
    exact = model._prompt_tokens(model.visual_prompter, dynamic, 1)
    assert torch.equal(exact, dynamic + model.visual_prompter[1])
    assert not torch.equal(exact, rounded)


def test_text_features_depend_on_image_and_class(model) -> None:
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = model.compute(images)
        named = model.compute(images, class_names=["bottle", "metal_nut"])
    assert out.text_features.shape == (2, 2, 32)
    assert not torch.allclose(out.text_features[0], out.text_features[1])  # dynamic text prompts
    assert not torch.allclose(out.text_features, named.text_features)
    assert model.token_ids.shape[0] == 28 + 20


def test_truncated_text_equals_full_context(model) -> None:
    images = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        short = model.compute(images).text_features
        model.truncate_text = False
        full = model.compute(images).text_features
    torch.testing.assert_close(short, full, atol=2e-6, rtol=0)


@pytest.mark.parametrize(("ptype", "branch", "absent"), [
    ("S", "VL", ["dynamic_visual_prompt_generator", "dynamic_text_prompt_generator"]),
    ("D", "VL", ["text_prompter", "visual_prompter"]),
    ("SD", "V", ["text_prompter", "dynamic_text_prompt_generator"]),
    ("SD", "L", ["visual_prompter", "dynamic_visual_prompt_generator"]),
])
def test_prompting_variants(tiny_clip, ptype: str, branch: str, absent: list[str]) -> None:
    model = AdaCLIPModel(tiny_clip, prompting_type=ptype, prompting_branch=branch).eval()
    names = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert not names & set(absent)
    with torch.no_grad():
        out = model(torch.randn(1, 3, SIZE, SIZE))
    assert torch.isfinite(out.anomaly_map).all()


def test_gradients_reach_every_learnt_part_but_the_unused_prompt(model) -> None:
    model.train()
    images, masks = torch.randn(1, 3, SIZE, SIZE), torch.zeros(1, SIZE, SIZE)
    masks[:, 10:30, 20:40] = 1
    probs, maps, _ = model.training_outputs(images)
    terms = AdaCLIPLoss()(probs, torch.tensor([1]), maps, masks)
    terms["loss"].backward()
    for name, p in model.named_parameters():
        if name.startswith("clip."):
            assert p.grad is None and not p.requires_grad
        elif name == "text_prompter.static_prompts.0":  # block 0 of the text tower is not prompted
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loss_dice_per_row_for_one_image() -> None:
    torch.manual_seed(0)
    probs = torch.rand(1, 2, 8, 8).softmax(1)
    masks = (torch.rand(1, 8, 8) > 0.7).float()
    terms = AdaCLIPLoss()(torch.tensor([[0.3, 0.7]]), torch.tensor([1]), [probs], masks)
    p, g = probs[0, 1], masks[0]
    per_row = (2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)
    torch.testing.assert_close(terms["seg_dice_anomalous"][0], 1 - per_row.mean())
    per_image = AdaCLIPLoss(row_dice=False)(torch.tensor([[0.3, 0.7]]), torch.tensor([1]), [probs], masks)
    whole = (2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1)
    torch.testing.assert_close(per_image["seg_dice_anomalous"][0], 1 - whole)
    expected_cls = -(1 - (0.7 + 1e-5 * 0.3 - 1e-5 * 0.7 + 1e-5)) ** 2 * torch.tensor(0.7 + 1e-5 * 0.3 - 1e-5 * 0.7 + 1e-5).log()
    torch.testing.assert_close(terms["classification_focal"], expected_cls, atol=1e-6, rtol=0)
    total = terms["classification_focal"] + terms["seg_focal"] + terms["seg_dice_anomalous"] + terms["seg_dice_normal"]
    torch.testing.assert_close(terms["loss"], total.squeeze())
    assert set(AdaCLIPLoss()(torch.tensor([[0.3, 0.7]]), torch.tensor([1]), [probs], None)) == {
        "classification_focal", "loss"}


def blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, 16, generator=gen) * 10
    truth = torch.arange(5).repeat_interleave(20)
    return centres[truth] + 0.1 * torch.randn(100, 16, generator=gen), truth


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_is_deterministic_and_finds_blobs() -> None:
    x, truth = blobs()
    labels = kmeans_labels(x, 5, seed=3)
    assert torch.equal(labels, kmeans_labels(x, 5, seed=3))
    assert same_partition(labels, truth)
    assert same_partition(sklearn_kmeans_labels(x, 5, seed=0), truth)
    assert kmeans_labels(x[:4], 20).unique().numel() == 4  # fewer points than clusters


def test_hsf_averages_cluster_means_without_weights() -> None:
    hsf = HybridSemanticFusion(k_clusters=2, n_aggregate=3)
    layer_a = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 5.0]]])
    layer_b = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 3.0]]])
    labels = torch.tensor([[0, 0, 1]])
    h, _ = hsf.cluster_feature([layer_a, layer_b], labels)
    # cluster 0: mean of (1,0),(3,0),(1,0),(1,0) = (1.5, 0); cluster 1: (0, 4); h = normalize((0.75, 2))
    torch.testing.assert_close(h, torch.nn.functional.normalize(torch.tensor([[0.75, 2.0]]), dim=-1))
    logits = [torch.tensor([[[0.0, 1.0], [0.0, 3.0], [0.0, 2.0], [0.0, -5.0]]])]
    selected = HybridSemanticFusion(n_aggregate=2).select([torch.arange(8.0).view(1, 4, 2)], logits)
    assert selected[0].tolist() == [[[2.0, 3.0], [4.0, 5.0]]]  # the two most anomalous patches, ranked


def test_class_names_from_paths() -> None:
    assert class_name_from_path("/d/MVTecAD/metal_nut/test/scratch/000.png") == "metal_nut"
    assert class_name_from_path("/d/VisA/pcb1/Data/Images/Anomaly/000.JPG") == "pcb1"
    assert class_name_from_path("/some/folder/img.png") == "object"
    assert class_names_for(["/a/bottle/train/good/1.png"], "auto") == ["bottle"]
    assert class_names_for(["/a/bottle/train/good/1.png"], "candle") is None


def test_mixed_precision_training_step(model) -> None:
    """The official code trains under fp16 autocast; here bf16 on the CPU: finite, float32 loss."""
    model.train()
    images, masks = torch.randn(2, 3, SIZE, SIZE), torch.zeros(2, SIZE, SIZE)
    masks[:, 5:20, 5:20] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs, maps, _ = model.training_outputs(images)
        terms = AdaCLIPLoss()(probs, torch.tensor([0, 1]), maps, masks)
    terms["loss"].backward()
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])
    assert model.cls_token_layer.head[0].weight.grad is not None
