"""VandModel on the 4-block tiny CLIP: shapes, the map formulas, few-shot memory, text caching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_zsad.clip import ClipModel
from anomalib_zsad.clip.prompts import (
    VAND_ANOMALOUS_STATES,
    VAND_NORMAL_STATES,
    VAND_TEMPLATES,
    ensemble_sentences,
)
from anomalib_zsad.models.vand import VandLoss, VandModel, default_feature_layers, official_few_shot_scores

_TEXT_CACHE: dict[str, torch.Tensor] = {}


@pytest.fixture
def model(tiny_clip: ClipModel) -> VandModel:
    """A fresh model; the text features of a class (a 420-sentence ensemble) are shared across tests."""
    torch.manual_seed(0)
    vand = VandModel(tiny_clip, class_name="bottle")
    cache = vand.text_cache  # a frozen text side: its entries only depend on the device
    cache._entries, cache._key = _TEXT_CACHE, cache._state_key(cache.frozen.device)
    return vand


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))


def test_default_layers_follow_depth() -> None:
    assert default_feature_layers(24) == [6, 12, 18, 24]
    assert default_feature_layers(12) == [3, 6, 9, 12]
    assert default_feature_layers(4) == [1, 2, 3, 4]


def test_layers_outside_the_tower_are_refused(tiny_clip: ClipModel) -> None:
    with pytest.raises(ValueError, match="outside"):
        VandModel(tiny_clip, feature_layers=[2, 5])


def test_only_linear_layers_learn(model: VandModel) -> None:
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"trainable_linearlayer.fc.{i}.{kind}" for i in range(4) for kind in ("weight", "bias")}
    assert model.trainable_linearlayer.fc[0].weight.shape == (32, 64)  # [embed_dim, vision_width]


def test_prompt_ensemble_is_state_major() -> None:
    sentences = ensemble_sentences("cable", VAND_NORMAL_STATES, VAND_TEMPLATES)
    assert len(sentences) == 7 * 35
    assert sentences[0] == "a bad photo of a cable."
    assert sentences[35] == "a bad photo of a flawless cable."
    assert len(ensemble_sentences("cable", VAND_ANOMALOUS_STATES, VAND_TEMPLATES)) == 5 * 35


def test_text_features_are_normalised_and_cached(model: VandModel) -> None:
    text = model.inference_text_features()
    assert text.shape == (2, 32)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert model.class_text_features("bottle") is model.class_text_features("bottle")
    assert not torch.allclose(model.class_text_features("screw"), text)


def test_forward_shapes_and_ranges(model: VandModel, images: torch.Tensor) -> None:
    out = model(images)
    assert out.pred_score.shape == (2,)
    assert out.anomaly_map.shape == (2, 64, 80)
    assert ((out.pred_score >= 0) & (out.pred_score <= 1)).all()
    # Sum of 4 per-layer probabilities.
    assert (out.anomaly_map >= 0).all() and (out.anomaly_map <= len(model.feature_layers)).all()


def test_map_is_the_softmax_of_upsampled_logits(model: VandModel, images: torch.Tensor) -> None:
    """The sigmoid-of-margins shortcut equals the official softmax after upsampling the logits."""
    with torch.no_grad():
        _, tokens = model.encode_image(images)
        text = model.inference_text_features()
        official = sum(F.interpolate(logits.transpose(1, 2).reshape(2, 2, 4, 5), size=(64, 80), mode="bilinear",
                                     align_corners=True).softmax(1)[:, 1]
                       for logits in model.patch_logits(tokens, text))
        probs = model.layer_probabilities(images, text, layer_tokens=tokens)
    torch.testing.assert_close(model(images).anomaly_map, official, atol=1e-5, rtol=0)
    torch.testing.assert_close(sum(p[:, 1] for p in probs), official, atol=1e-5, rtol=0)


def test_last_block_tokens_are_complete(model: VandModel, images: torch.Tensor) -> None:
    """The tower shortens its last block to the class token unless all tokens are asked for."""
    _, tokens = model.encode_image(images)
    assert tokens[4].shape == (2, 1 + 4 * 5, 64)


def test_per_image_class_names(model: VandModel, images: torch.Tensor) -> None:
    same = model(images, ["bottle", "bottle"])
    torch.testing.assert_close(same.anomaly_map, model(images).anomaly_map)
    mixed = model(images, ["bottle", "screw"])
    torch.testing.assert_close(mixed.anomaly_map[0], same.anomaly_map[0])
    assert not torch.allclose(mixed.anomaly_map[1], same.anomaly_map[1])


def test_stored_text_features_until_the_class_changes(model: VandModel, images: torch.Tensor) -> None:
    model.freeze_text_features()
    stored = model.text_cache.frozen.clone()
    computed = []
    model.text_cache._compute = lambda name: computed.append(name)
    model(images)
    torch.testing.assert_close(model.inference_text_features(), stored)
    assert computed == []  # frozen features never go back to the text tower
    model.text_cache._compute = model._ensemble_text_features
    model.set_class_name("screw")
    assert not model.text_cache.is_frozen
    assert not torch.allclose(model.inference_text_features(), stored)
    assert not any("text_cache" in key for key in model.state_dict())  # rebuilt at set-up, never loaded stale


def test_few_shot_memory(model: VandModel, images: torch.Tensor) -> None:
    other = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(5))
    zero_shot, other_zero_shot = model(images).anomaly_map, model(other).anomaly_map
    model.setup_few_shot(images)
    assert model.k_shot_ready and len(model.memory_banks) == 4
    assert model.memory_banks[0].shape == (2 * 20, 64)
    # Reference images are their own nearest neighbours: the few-shot map of a memory image is 0.
    with torch.no_grad():
        _, tokens = model.encode_image(images)
        distances = model.min_distances(tokens)
    assert max(d.abs().max().item() for d in distances) < 1e-5
    torch.testing.assert_close(model(images).anomaly_map, zero_shot, atol=1e-5, rtol=0)
    # Duplicated references do not change anything (the official memory keeps duplicates).
    model.setup_few_shot(torch.cat([images, images[:1]]))
    with_dup = model(other).anomaly_map
    model.setup_few_shot(images)
    torch.testing.assert_close(model(other).anomaly_map, with_dup)
    # An unseen image gets a positive distance map on top of its zero-shot map.
    assert (with_dup - other_zero_shot).min() > 0
    model.setup_few_shot(None)
    assert not model.k_shot_ready and "memory_bank_0" not in dict(model.named_buffers())
    assert not any(k.startswith("memory_bank") for k in model.state_dict())


def test_official_few_shot_scores() -> None:
    zero_shot = torch.tensor([0.2, 0.4, 0.6])
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, 0], maps[1, 1, 1], maps[2, 2, 2] = 1.0, 3.0, 2.0
    torch.testing.assert_close(official_few_shot_scores(zero_shot, maps),
                               torch.tensor([0.1, 0.7, 0.55], dtype=torch.float64))


def test_training_step_moves_only_linear_layers(model: VandModel, images: torch.Tensor) -> None:
    mask = torch.zeros(2, 64, 80)
    mask[1, 10:30, 20:50] = 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.trainable_linearlayer.parameters(), lr=1e-2, betas=(0.5, 0.999))
    text = model.batch_text_features(["bottle", "bottle"])
    loss, focal, dice = VandLoss()(model.layer_probabilities(images, text), mask)
    assert focal.shape == dice.shape == (4,)
    torch.testing.assert_close(loss, focal.sum() + dice.sum())
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith("trainable_linearlayer.")}


def test_single_image_dice_option() -> None:
    """Official: a one-image batch's mask is squeezed to [H, W], so dice is averaged over rows."""
    probs = torch.rand(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    probs = torch.stack([1 - probs[:, 1], probs[:, 1]], dim=1)
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:5, 3:6] = 1
    _, _, per_image = VandLoss()([probs], mask)
    _, _, per_row = VandLoss(official_single_image_dice=True)([probs], mask)
    p, g = probs[0, 1], mask[0]
    expected_image = 1 - (2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1)
    expected_rows = 1 - ((2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)).mean()
    torch.testing.assert_close(per_image[0], expected_image)
    torch.testing.assert_close(per_row[0], expected_rows)
    # With two images both settings agree (per image).
    two = torch.cat([probs, probs])
    torch.testing.assert_close(VandLoss()([two], torch.cat([mask, mask]))[2],
                               VandLoss(official_single_image_dice=True)([two], torch.cat([mask, mask]))[2])
