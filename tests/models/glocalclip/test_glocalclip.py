"""GlocalCLIP's own behaviour on a tiny random CLIP: glocal prompts, which text pair feeds the
score and which the map, the official layer aliasing, the triplet loss, the official file format,
and the anomalib module (labels-only training, imported weights, argument checks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib import LearningType
from anomalib.data import ImageBatch

from anomalib_zsad.clip import tokenize
from anomalib_zsad.models.anomalyclip import AnomalyCLIPModel
from anomalib_zsad.models.glocalclip import GlocalCLIP, GlocalCLIPModel
from anomalib_zsad.models.glocalclip.checkpoint import load_official_checkpoint
from anomalib_zsad.models.glocalclip.loss import GlocalCLIPLoss, glocal_triplet
from anomalib_zsad.models.glocalclip.torch_model import aliased_layers

TINY = {"backbone": "zsad-tiny", "pretrained": None, "image_size": 64}


def images(count: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))


def official_file(model: GlocalCLIPModel, path: Path) -> Path:
    """``model``'s prompts in the official format, with the buffers and unused projections the
    official file also holds."""
    state = dict(model.prompt_learner.state_dict())
    width = model.prompt_learner.ctx_global_pos.shape[-1]
    state["token_prefix_global_pos"] = torch.zeros(1, 1, 1, width)
    state["tokenized_prompts_local_neg"] = torch.zeros(1, 1, 77, dtype=torch.int32)
    state["compound_prompt_projections.0.weight"] = torch.zeros(896, width)
    torch.save({"prompt_learner": state}, path)
    return path


# ---------------------------------------------------------------- prompts
@pytest.mark.parametrize(("n_ctx", "ab_ctx"), [(12, 12), (12, 13), (3, 5)])
def test_anomalous_prompts_reuse_their_branch_normal_context(tiny_clip, n_ctx: int, ab_ctx: int) -> None:
    learner = GlocalCLIPModel(tiny_clip, n_ctx=n_ctx, ab_ctx=ab_ctx).prompt_learner
    eot = learner.token_ids.argmax(-1)
    # [SOT] contexts "object ." [EOT] and [SOT] contexts "damaged object ." [EOT]
    assert eot.tolist() == [1 + n_ctx + 2, 1 + n_ctx + ab_ctx + 3, 1 + n_ctx + 2, 1 + n_ctx + ab_ctx + 3]
    embedded = learner.prompt_embeddings(tiny_clip.text)
    g_pos, g_neg = learner.ctx_global_pos[0, 0], learner.ctx_global_neg[0, 0]
    l_pos, l_neg = learner.ctx_local_pos[0, 0], learner.ctx_local_neg[0, 0]
    assert torch.equal(embedded[0, 1:1 + n_ctx], g_pos)
    assert torch.equal(embedded[1, 1:1 + n_ctx + ab_ctx], torch.cat([g_pos, g_neg]))
    assert torch.equal(embedded[2, 1:1 + n_ctx], l_pos)
    assert torch.equal(embedded[3, 1:1 + n_ctx + ab_ctx], torch.cat([l_pos, l_neg]))
    # the words after the contexts are those of "object." / "damaged object."
    words_ids = tokenize("damaged object.")[0]
    assert torch.equal(learner.token_ids[1, 1 + n_ctx + ab_ctx:eot[1] + 1], words_ids[1:5])


def test_one_text_pass_with_shared_deep_prompts(tiny_clip) -> None:
    """Every deep prompt reaches all four features; the text features are four unit rows."""
    model = GlocalCLIPModel(tiny_clip)
    text = model.text_features()
    assert text.shape == (4, tiny_clip.arch.embed_dim)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(4))
    for row in range(4):
        grads = torch.autograd.grad(text[row].sum(), list(model.prompt_learner.compound_prompts_text),
                                    retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads)


def test_score_uses_the_global_pair_and_the_map_the_local_pair(tiny_clip, monkeypatch: pytest.MonkeyPatch) -> None:
    model = GlocalCLIPModel(tiny_clip, seed=1).eval()
    batch = images()
    text = model.text_features().detach()
    other = torch.nn.functional.normalize(torch.randn(2, text.shape[1], generator=torch.Generator().manual_seed(3)), dim=-1)

    def run(features: torch.Tensor):
        monkeypatch.setattr(model, "text_features_cached", lambda: features)
        with torch.no_grad():
            return model(batch)

    before = run(text)
    local_changed = run(torch.cat([text[:2], other]))  # the score stays, the map moves
    global_changed = run(torch.cat([other, text[2:]]))  # the map stays, the score moves
    torch.testing.assert_close(local_changed.pred_score, before.pred_score, atol=0, rtol=0)
    assert not torch.allclose(local_changed.anomaly_map, before.anomaly_map)
    torch.testing.assert_close(global_changed.anomaly_map, before.anomaly_map, atol=0, rtol=0)
    assert not torch.allclose(global_changed.pred_score, before.pred_score)


def test_text_features_are_cached_until_the_prompts_change_and_frozen_for_export(tiny_clip) -> None:
    model = GlocalCLIPModel(tiny_clip).eval()
    first = model.text_features_cached()
    assert model.text_features_cached() is first
    with torch.no_grad():
        model.prompt_learner.ctx_local_pos.add_(0.1)
    second = model.text_features_cached()
    assert second is not first
    torch.testing.assert_close(second, model.text_features())
    model.freeze_text_features()
    with torch.no_grad():
        model.prompt_learner.ctx_local_pos.add_(0.1)
    torch.testing.assert_close(model.text_features_cached(), second, atol=0, rtol=0)


# ---------------------------------------------------------------- the official aliasing
def test_aliased_layers_start_one_block_before_dpam() -> None:
    """The first DPAM block adds in place to its input (block dpam_start - 1's output)."""
    assert aliased_layers([6, 12, 18, 24], dpam_start=6, depth=24) == [6, 12, 18, 24]
    assert aliased_layers([3, 4, 5, 12, 24], dpam_start=6, depth=24) == [5, 12, 24]
    assert aliased_layers([6, 12], dpam_start=25, depth=24) == []


def test_official_aliasing_gives_every_layer_the_last_block_tokens(tiny_clip) -> None:
    depth = len(tiny_clip.visual.blocks)
    aliased = GlocalCLIPModel(tiny_clip, official_layer_aliasing=True).eval()
    distinct = GlocalCLIPModel(tiny_clip, official_layer_aliasing=False).eval()
    assert aliased.feature_layers == distinct.feature_layers and len(aliased.feature_layers) > 1
    with torch.no_grad():
        global_a, patches_a = aliased.encode_image(images())
        global_d, patches_d = distinct.encode_image(images())
    torch.testing.assert_close(global_a, global_d, atol=0, rtol=0)
    last = distinct.feature_layers.index(depth)
    for patch in patches_a:
        torch.testing.assert_close(patch, patches_d[last], atol=0, rtol=0)
    assert not torch.allclose(patches_d[0], patches_d[last])


def test_without_aliasing_the_image_side_is_anomalyclips(tiny_clip) -> None:
    """Same CLIP and layers: GlocalCLIP's image features are AnomalyCLIP's (reused, not copied)."""
    glocal, anomaly = GlocalCLIPModel(tiny_clip).eval(), AnomalyCLIPModel(tiny_clip).eval()
    with torch.no_grad():
        (g1, p1), (g2, p2) = glocal.encode_image(images()), anomaly.encode_image(images())
    torch.testing.assert_close(g1, g2, atol=0, rtol=0)
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---------------------------------------------------------------- loss
def test_triplet_is_a_squared_pull_and_a_squared_hinge() -> None:
    anchor, positive, negative = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    pull = ((anchor - positive + 1e-6).norm()) ** 2  # torch.pairwise_distance adds eps to the difference
    torch.testing.assert_close(glocal_triplet(anchor, positive, negative, margin=0.0), pull)
    hinge = (2.0 - (anchor - negative + 1e-6).norm()) ** 2
    torch.testing.assert_close(glocal_triplet(anchor, positive, negative, margin=2.0), pull + hinge)
    torch.testing.assert_close(glocal_triplet(anchor, positive, negative, margin=0.5), pull)  # hinge inactive


def test_loss_is_anomalyclips_without_the_x4_plus_alpha_contrastive(tiny_clip) -> None:
    model = GlocalCLIPModel(tiny_clip)
    logits, probs, text = model.training_outputs(images())
    labels, masks = torch.tensor([0, 1]), (torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    plain = GlocalCLIPLoss(alpha=0.0)(logits, labels, probs, masks, text)
    weighted = GlocalCLIPLoss(alpha=0.5, margin=1.0)(logits, labels, probs, masks, text)
    seg = plain["focal"].sum() + plain["dice_anomalous"].sum() + plain["dice_normal"].sum()
    torch.testing.assert_close(plain["loss"], plain["image_loss"] + seg)
    torch.testing.assert_close(weighted["loss"], plain["loss"] + 0.5 * weighted["contrastive"])
    g_n, g_a, l_n, l_a = (r[None] for r in text)
    torch.testing.assert_close(weighted["triplet_normal"], glocal_triplet(g_n, l_n, l_a, 1.0))
    torch.testing.assert_close(weighted["triplet_anomalous"], glocal_triplet(g_a, l_a, l_n, 1.0))
    weighted["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prompt_learner.parameters())


# ---------------------------------------------------------------- official files
@pytest.mark.parametrize(("n_ctx", "ab_ctx", "depth", "length"), [(12, 12, 9, 4), (12, 13, 10, 2)])
def test_official_prompts_load_in_both_configurations(tiny_clip, tmp_path: Path, n_ctx: int, ab_ctx: int,
                                                      depth: int, length: int) -> None:
    shape = {"n_ctx": n_ctx, "ab_ctx": ab_ctx, "prompt_depth": depth, "deep_prompt_length": length}
    source = GlocalCLIPModel(tiny_clip, seed=1, **shape).eval()
    target = GlocalCLIPModel(tiny_clip, seed=2, **shape).eval()
    assert not torch.allclose(source(images()).pred_score, target(images()).pred_score)
    load_official_checkpoint(target, official_file(source, tmp_path / "epoch_15.pth"))
    torch.testing.assert_close(target(images()).pred_score, source(images()).pred_score)
    torch.testing.assert_close(target(images()).anomaly_map, source(images()).anomaly_map)


def test_a_file_of_another_configuration_names_the_tensors(tiny_clip, tmp_path: Path) -> None:
    path = official_file(GlocalCLIPModel(tiny_clip, ab_ctx=13, prompt_depth=10), tmp_path / "variant.pth")
    with pytest.raises(ValueError, match=r"ab_ctx.*ctx_global_neg: file \(1, 1, 13, 64\) vs model \(1, 1, 12, 64\)"):
        load_official_checkpoint(GlocalCLIPModel(tiny_clip), path)
    with pytest.raises(ValueError, match="unexpected compound_prompts_text.8"):
        load_official_checkpoint(GlocalCLIPModel(tiny_clip, ab_ctx=13), path)


def test_wrong_truncated_and_anomalyclip_files_are_named(tiny_clip, tmp_path: Path) -> None:
    model = GlocalCLIPModel(tiny_clip)
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, other)
    with pytest.raises(ValueError, match="not an official GlocalCLIP checkpoint: expected a dict with key 'prompt_learner'"):
        load_official_checkpoint(model, other)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(official_file(model, tmp_path / "good.pth").read_bytes()[:200])
    with pytest.raises(ValueError, match="could not read GlocalCLIP checkpoint .*broken.pth"):
        load_official_checkpoint(model, broken)
    anomalyclip = tmp_path / "anomalyclip.pth"
    torch.save({"prompt_learner": AnomalyCLIPModel(tiny_clip).prompt_learner.state_dict()}, anomalyclip)
    with pytest.raises(ValueError, match="no GlocalCLIP contexts.*--model AnomalyCLIP"):
        load_official_checkpoint(model, anomalyclip)
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(model, tmp_path / "missing.pth")


# ---------------------------------------------------------------- the anomalib module
def test_labels_only_training_trains_image_and_contrastive_terms(caplog: pytest.LogCaptureFixture) -> None:
    model = GlocalCLIP(**TINY)
    batch = ImageBatch(image=torch.rand(2, 3, 64, 64), gt_label=torch.tensor([0, 1]))
    with caplog.at_level("WARNING"):
        loss = model.training_step(batch, 0)
    loss.backward()
    assert "no masks" in caplog.text
    learner = model.model.prompt_learner
    assert learner.ctx_global_neg.grad.abs().sum() > 0  # image loss
    assert learner.ctx_local_neg.grad.abs().sum() > 0  # reached only through the triplet term


def test_official_prompts_make_it_zero_shot(tmp_path: Path) -> None:
    source = GlocalCLIP(**TINY)
    with torch.no_grad():
        for parameter in source.model.prompt_learner.parameters():
            parameter.add_(torch.randn_like(parameter))
    path = official_file(source.model, tmp_path / "epoch_15.pth")
    model = GlocalCLIP(**TINY, official_checkpoint=path)
    assert model.learning_type == LearningType.ZERO_SHOT
    source.model.eval()
    model.model.eval()
    assert not torch.allclose(GlocalCLIP(**TINY).model.eval()(images()).pred_score, source.model(images()).pred_score)
    torch.testing.assert_close(model.model(images()).anomaly_map, source.model(images()).anomaly_map)


def test_glocal_arguments_are_checked_together() -> None:
    with pytest.raises(ValueError) as error:
        GlocalCLIP(**TINY, n_ctx=0, ab_ctx=-1, alpha=-0.1, margin=-1, feature_layers=[5], prompt_depth=13)
    for name in ("n_ctx", "ab_ctx", "alpha", "margin", "feature_layers", "prompt_depth"):
        assert name in str(error.value)
    with pytest.raises(ValueError, match="n_ctx \\+ ab_ctx"):
        GlocalCLIP(**TINY, n_ctx=40, ab_ctx=40)
