"""AA-CLIP's torch model on the tiny random CLIP: shapes, widths, adapters, stages, caches."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_zsad.clip import ClipModel, load_clip, tokenize
from anomalib_zsad.models.aa_clip.adapters import AdapterHook, residual_adapt
from anomalib_zsad.models.aa_clip.loss import AACLIPLoss
from anomalib_zsad.models.aa_clip.prompts import describe_class, state_sentences
from anomalib_zsad.models.aa_clip.torch_model import AACLIPModel, default_levels
from anomalib_zsad.models.components.class_names import class_name_from_path

SIZE = 112  # 7 x 7 patches of the tiny CLIP (pos-embed resized): fast, and not the native grid


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    return load_clip("zsad-tiny", pretrained=None, seed=0)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_depth_dependent_defaults(clip: ClipModel) -> None:
    assert default_levels(24) == [6, 12, 18, 24]
    model = AACLIPModel(clip)
    assert model.levels == [1, 2, 3, 4]
    assert len(model.image_adapter.layer_adapters) == 1  # 6 of 24 blocks, scaled to 4
    text_depth = clip.arch.text_layers
    assert len(model.text_adapter) == max(1, round(3 * text_depth / 12)) + 1  # adapters + projection
    assert model.surgery_from == 1


def test_widths_follow_the_clip_config() -> None:
    arch = replace(load_clip("zsad-tiny", pretrained=None).arch, vision_width=32, vision_heads=1,
                   vision_mlp_width=64, text_width=48, text_heads=1, text_mlp_width=96, embed_dim=40)
    clip = ClipModel(arch)
    clip.reset_parameters(0)
    model = AACLIPModel(clip)
    assert model.image_adapter.layer_adapters[0].fc[0].weight.shape == (32, 32)
    assert model.image_adapter.seg_proj[0].fc.weight.shape == (40, 32)
    assert model.text_adapter[0].fc[0].weight.shape == (48, 48)
    assert model.text_adapter[-1].fc[0].weight.shape == (40, 48)
    result = model(torch.randn(1, 3, SIZE, SIZE))
    assert result.anomaly_map.shape == (1, SIZE, SIZE)


def test_forward_shapes_and_score(clip: ClipModel, images: torch.Tensor) -> None:
    model = AACLIPModel(clip)
    result = model(images)
    assert result.pred_score.shape == (2,)
    assert result.anomaly_map.shape == (2, SIZE, SIZE)
    assert ((result.pred_score >= 0) & (result.pred_score <= 1)).all()
    model.image_score = "map_max"
    assert torch.allclose(model(images).pred_score, result.anomaly_map.amax(dim=(-2, -1)))


def test_zero_adapter_weight_is_plain_clip(clip: ClipModel, images: torch.Tensor) -> None:
    """With w = 0 the residual adapters change nothing: the towers are CLIP's."""
    model = AACLIPModel(clip, text_adapt_weight=0.0, image_adapt_weight=0.0)
    ids = tokenize(["a photo of a candle.", "a damaged candle."])
    with torch.no_grad():
        plain = clip.text.encode(ids, project=False)
        expected = F.leaky_relu(plain @ model.text_adapter[-1].fc[0].weight.t())
        assert torch.allclose(model.encode_text(ids), expected, atol=1e-5)
        seg, _ = model.encode_image(images)
        tokens = clip.visual(images, [4], return_tokens=True).layers[4][:, 1:]
        expected_seg = F.normalize(model.image_adapter.seg_proj[-1](clip.visual.ln_post(tokens)), dim=-1)
    assert torch.allclose(seg[-1], expected_seg, atol=1e-5)


def test_adapter_keeps_token_norms(clip: ClipModel, images: torch.Tensor) -> None:
    """``a * |x| / |a|`` makes the adapted stream keep each token's norm, whatever w."""
    model = AACLIPModel(clip)
    with torch.no_grad():
        x = clip.visual(images, [1]).layers[1]
        for weight in (1.0, 0.1):
            adapted = residual_adapt(x, model.image_adapter.layer_adapters[0], weight)
            if weight == 1.0:
                assert torch.allclose(adapted.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
            assert not torch.allclose(adapted, x)
        hooked = clip.visual(images, [1], post_block=AdapterHook(model.image_adapter.layer_adapters, 0.1)).layers[1]
    assert torch.allclose(hooked, residual_adapt(x, model.image_adapter.layer_adapters[0], 0.1), atol=1e-6)


def test_surgery_token_axis_is_batch_independent(clip: ClipModel, images: torch.Tensor) -> None:
    token_axis = AACLIPModel(clip)
    batch_axis = AACLIPModel(clip, surgery_vv_across_batch=True)
    both, _, _ = token_axis.surgery_features(images)
    alone, _, _ = token_axis.surgery_features(images[:1])
    assert torch.allclose(both[-1][:1], alone[-1], atol=1e-5)
    both_b, _, _ = batch_axis.surgery_features(images)
    alone_b, _, _ = batch_axis.surgery_features(images[:1])
    assert not torch.allclose(both_b[-1][:1], alone_b[-1], atol=1e-4)  # the official quirk
    assert not torch.allclose(both[-1], both_b[-1], atol=1e-4)


def test_anchor_cache_follows_the_adapter(clip: ClipModel) -> None:
    model = AACLIPModel(clip, class_name="candle")
    first = model.text_features_cached()
    assert model.text_features_cached() is first  # computed once
    normal, anomalous = state_sentences(describe_class("candle"))
    assert len(normal) == 6 and len(anomalous) == 10 and normal[1] == "a photo of candle."
    with torch.no_grad():
        model.text_adapter[0].fc[0].weight.add_(0.1)
    second = model.text_features_cached()
    assert not torch.equal(first, second)
    model.freeze_text_features()
    with torch.no_grad():
        model.text_adapter[0].fc[0].weight.add_(0.1)
    assert torch.equal(model.text_features_cached(), second)  # frozen for export
    model.set_class_name("pcb1")
    assert not torch.equal(model.text_features_cached(), second)
    assert torch.allclose(model.text_features_cached().norm(dim=0), torch.ones(2))


def test_per_image_class_names(clip: ClipModel, images: torch.Tensor) -> None:
    model = AACLIPModel(clip)
    mixed = model(images, class_names=["candle", "pcb1"])
    first = model(images[:1], class_names=["candle"])
    assert torch.allclose(mixed.pred_score[:1], first.pred_score, atol=1e-6)
    assert not torch.allclose(mixed.pred_score[1:], model(images[1:], class_names=["candle"]).pred_score)


def test_stage_losses_and_gradients(clip: ClipModel, images: torch.Tensor) -> None:
    model = AACLIPModel(clip)
    masks = torch.zeros(2, SIZE, SIZE)
    masks[1, 30:70, 40:90] = 1
    names = ["candle", "candle"]
    out = model.stage1_outputs(images, names)
    last = AACLIPLoss(stage1_levels="last").stage1(out["level_logits"], out["text"], masks)
    every = AACLIPLoss(stage1_levels="all").stage1(out["level_logits"], out["text"], masks)
    per_level = every["focal"] + every["dice_normal"] + every["dice_anomalous"]
    assert torch.allclose(every["loss"] - last["loss"], per_level[:-1].sum(), atol=1e-6)
    assert torch.allclose(last["loss"], per_level[-1] + 0.1 * last["orthogonal_loss"], atol=1e-6)
    every["loss"].backward()
    assert all(p.grad is not None for p in model.text_adapter.parameters())
    assert all(p.grad is None for p in model.image_adapter.parameters())
    assert all(p.grad is None for p in model.clip.parameters())

    model.zero_grad()
    out = model.stage2_outputs(images, names)
    terms = AACLIPLoss().stage2(out["level_logits"], out["cls_logits"], torch.tensor([0, 1]), masks)
    assert torch.allclose(terms["cls_loss"], F.cross_entropy(out["cls_logits"], torch.tensor([0, 1])))
    terms["loss"].backward()
    assert all(p.grad is not None for p in model.image_adapter.parameters())
    assert all(p.grad is None for p in model.text_adapter.parameters())
    no_masks = AACLIPLoss().stage2(out["level_logits"], out["cls_logits"], torch.tensor([0, 1]), None)
    assert torch.equal(no_masks["loss"], no_masks["cls_loss"])


def test_options_are_checked(clip: ClipModel) -> None:
    with pytest.raises(ValueError, match="image_score"):
        AACLIPModel(clip, image_score="fused")
    with pytest.raises(ValueError, match="levels"):
        AACLIPModel(clip, levels=[2, 9])
    with pytest.raises(ValueError, match="stage1_levels"):
        AACLIPLoss(stage1_levels="first")
    with pytest.raises(ValueError, match="vv_mode"):
        clip.visual(torch.zeros(1, 3, 224, 224), vv_from=1, vv_mode="sideways")


def test_class_name_from_path() -> None:
    assert class_name_from_path("/d/MVTec/bottle/test/broken_large/000.png") == "bottle"
    assert class_name_from_path("/d/visa/candle/Data/Images/Anomaly/000.JPG") == "candle"
    assert class_name_from_path("/photos/x.png", "object") == "object"
