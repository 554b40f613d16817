"""AnomalyCLIP's ablation switches (paper Tables 4-5, 7, 9-11, 13-14, Fig. 5-6) against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import ImageBatch

from anomalib_zsad.clip import ClipModel, tokenize
from anomalib_zsad.models import AnomalyCLIP
from anomalib_zsad.models.anomalyclip import AnomalyCLIPModel
from anomalib_zsad.models.anomalyclip.loss import AnomalyCLIPLoss


def test_shared_context_is_one_tensor(tiny_clip: ClipModel) -> None:
    shared = AnomalyCLIPModel(tiny_clip, shared_context=True).prompt_learner
    separate = AnomalyCLIPModel(tiny_clip).prompt_learner
    assert shared.ctx_pos is shared.ctx_neg
    assert separate.ctx_pos is not separate.ctx_neg
    assert sum(p.numel() for p in shared.parameters()) == (
        sum(p.numel() for p in separate.parameters()) - separate.ctx_neg.numel())
    embeddings = shared.prompt_embeddings(tiny_clip.text)
    n = shared.n_ctx
    torch.testing.assert_close(embeddings[0, 1:1 + n], embeddings[1, 1:1 + n], atol=0, rtol=0)
    # one step moves both prompts' context together
    model = AnomalyCLIPModel(tiny_clip, shared_context=True)
    model.text_features()[1].sum().backward()
    assert model.prompt_learner.ctx_pos.grad is model.prompt_learner.ctx_neg.grad


def test_abnormality_word_is_in_the_anomalous_prompt(tiny_clip: ClipModel) -> None:
    learner = AnomalyCLIPModel(tiny_clip, abnormality_word="flawed").prompt_learner
    x = " ".join(["X"] * learner.n_ctx)
    expected = tokenize([f"{x} object.", f"{x} flawed object."], learner.token_ids.shape[-1])
    assert torch.equal(learner.token_ids, expected)
    default = AnomalyCLIPModel(tiny_clip).prompt_learner
    assert default.sentences("object")[1] == f"{x} damaged object."


def test_object_aware_prompts_name_each_image_class(tiny_clip: ClipModel) -> None:
    model = AnomalyCLIPModel(tiny_clip, object_aware=True)
    x = " ".join(["X"] * model.prompt_learner.n_ctx)
    assert model.prompt_learner.sentences("metal nut") == [f"{x} metal nut.", f"{x} damaged metal nut."]
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    names = ["bottle", "metal nut", "bottle"]
    logits, probs = model.training_outputs(images, names)
    with torch.no_grad():
        global_feature, _ = model.encode_image(images)
        for i, name in enumerate(names):  # by hand: image i against the prompts of its own class
            text = model.text_features(name)
            expected = F.normalize(global_feature[i], dim=-1) @ text.t() / model.temperature
            torch.testing.assert_close(logits[i].detach(), expected, atol=1e-5, rtol=1e-5)
    assert len(probs) == len(model.feature_layers)
    assert not torch.allclose(model.text_features("bottle"), model.text_features("metal nut"))
    # inference: per image with class names; without them the model's own word ("object")
    model.eval()
    out = model(images, names)
    single = model(images[1:2], ["metal nut"])
    torch.testing.assert_close(out.pred_score[1:2], single.pred_score, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model(images).pred_score, model(images, ["object"] * 3).pred_score)
    # object-agnostic (the default) ignores class names
    agnostic = AnomalyCLIPModel(tiny_clip).eval()
    torch.testing.assert_close(agnostic(images, names).pred_score, agnostic(images).pred_score)


@pytest.mark.parametrize("dpam", ["qq", "kk", "none"])
def test_dpam_switch_reads_that_attention(tiny_clip: ClipModel, dpam: str) -> None:
    model = AnomalyCLIPModel(tiny_clip, dpam=dpam)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, patches = model.encode_image(images)
        tokens = tiny_clip.visual(images, model.feature_layers, vv_from=None if dpam == "none" else model.dpam_start,
                                  dpam_attention="vv" if dpam == "none" else dpam)
    for layer, patch in zip(model.feature_layers, patches, strict=True):
        torch.testing.assert_close(patch, tiny_clip.visual.project(tokens.layers[layer]), atol=0, rtol=0)
    with pytest.raises(ValueError, match="dpam"):
        AnomalyCLIPModel(tiny_clip, dpam="qk")


def loss_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 2, generator=g, requires_grad=True)
    probs_logits = torch.randn(2, 2, 8, 8, generator=g, requires_grad=True)
    mask = (torch.rand(2, 8, 8, generator=g) > 0.7).float()
    return logits, torch.tensor([0, 1]), [probs_logits.softmax(1)], mask, probs_logits


@pytest.mark.parametrize(("switch", "zeroed"), [
    ({"global_loss": False}, ("image_loss",)),
    ({"focal_loss": False}, ("focal",)),
    ({"dice_loss": False}, ("dice_anomalous", "dice_normal")),
    ({"focal_loss": False, "dice_loss": False}, ("focal", "dice_anomalous", "dice_normal")),
])
def test_each_loss_switch_zeroes_its_term_and_gradient(switch: dict, zeroed: tuple[str, ...]) -> None:
    logits, labels, probs, mask, probs_logits = loss_inputs()
    full = AnomalyCLIPLoss(4.0)(logits, labels, probs, mask)
    terms = AnomalyCLIPLoss(4.0, **switch)(logits, labels, probs, mask)
    for name in zeroed:
        assert torch.count_nonzero(terms.get(name, torch.zeros(()))) == 0  # reported as 0, or left out
        assert torch.count_nonzero(full[name]) > 0
    # the total is the sum of the terms left on, written out by hand
    kept = {k: v for k, v in full.items() if k in ("focal", "dice_anomalous", "dice_normal") and k not in zeroed}
    expected = (0 if "image_loss" in zeroed else full["image_loss"]) + 4.0 * sum(v.sum() for v in kept.values())
    torch.testing.assert_close(terms["loss"], expected)
    grads = torch.autograd.grad(terms["loss"], [logits, probs_logits], allow_unused=True, retain_graph=True)
    hand = torch.autograd.grad(expected, [logits, probs_logits], allow_unused=True) if torch.is_tensor(
        expected) and expected.requires_grad else (None, None)
    for got, want in zip(grads, hand, strict=True):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, want)
    if "image_loss" in zeroed:  # no gradient reaches the image logits
        assert grads[0] is None or torch.count_nonzero(grads[0]) == 0
    if len(zeroed) == 3:  # no local term: no gradient reaches the maps
        assert grads[1] is None or torch.count_nonzero(grads[1]) == 0


def test_loss_needs_a_term_and_masks_without_global() -> None:
    with pytest.raises(ValueError, match="at least one"):
        AnomalyCLIPLoss(global_loss=False, focal_loss=False, dice_loss=False)
    logits, labels, probs, _, _ = loss_inputs()
    with pytest.raises(ValueError, match="no masks"):
        AnomalyCLIPLoss(global_loss=False)(logits, labels, probs, None)


def tiny(**kwargs) -> AnomalyCLIP:
    return AnomalyCLIP(backbone="zsad-tiny", pretrained=None, image_size=64, **kwargs)


def test_lightning_switches_reach_the_model_and_train_one_step() -> None:
    model = tiny(dpam="kk", object_aware=True, shared_context=True, abnormality_word="defective", local_loss=False)
    assert model.model.dpam == "kk"
    assert model.model.prompt_learner.ctx_pos is model.model.prompt_learner.ctx_neg
    assert not model.loss.local_loss
    batch = ImageBatch(image=torch.rand(2, 3, 64, 64), gt_label=torch.tensor([0, 1]),
                       gt_mask=torch.zeros(2, 64, 64), image_path=["/d/bottle/test/good/0.png",
                                                                   "/d/metal_nut/test/bent/1.png"])
    assert model._class_names(batch) == ["bottle", "metal nut"]
    loss = model.training_step(batch, 0)
    loss.backward()
    assert model.model.prompt_learner.ctx_pos.grad is not None
    with pytest.raises(ValueError, match="at least one loss term"):
        tiny(global_loss=False, local_loss=False)
    with pytest.raises(ValueError, match="dpam"):
        tiny(dpam="QQ")
