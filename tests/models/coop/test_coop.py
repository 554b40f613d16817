"""CoOp as AnomalyCLIP's baseline (Appendix A.2) against computations written out by hand on the
tiny random CLIP: no official code exists for it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib import LearningType
from anomalib.data import ImageBatch

from anomalib_zsad.clip import tokenize
from anomalib_zsad.models import CoOp
from anomalib_zsad.models.anomalyclip.prompt_learner import AnomalyCLIPPromptLearner
from anomalib_zsad.models.coop.lightning_model import warmup_cosine

TINY = {"backbone": "zsad-tiny", "pretrained": None, "image_size": 64}
PATHS = ["/d/metal_nut/test/scratch/000.png", "/d/bottle/test/good/001.png"]


def images(count: int = 2) -> torch.Tensor:
    return torch.rand(count, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_prompts_keep_the_class_name_after_the_learnt_context() -> None:
    learner = CoOp(**TINY, n_ctx=4).model.prompt_learner
    assert isinstance(learner, AnomalyCLIPPromptLearner)  # AnomalyCLIP's learner, reused
    assert learner.sentences("metal nut") == ["X X X X normal metal nut.", "X X X X anomalous metal nut."]
    assert len(learner.compound_prompts_text) == 0  # no deep prompts: CoOp learns the input context only


def test_text_features_by_hand() -> None:
    """Token embeddings of "X X X X normal bottle." with X replaced by the context, through the text tower."""
    model = CoOp(**TINY, n_ctx=4).model
    clip, learner = model.clip, model.prompt_learner
    ids = tokenize(["X X X X normal bottle.", "X X X X anomalous bottle."])
    with torch.no_grad():
        embedded = clip.text.token_embedding(ids)
        embedded[0, 1:5] = learner.ctx_pos[0, 0]
        embedded[1, 1:5] = learner.ctx_neg[0, 0]
        expected = F.normalize(clip.text(embedded, ids.argmax(-1)), dim=-1)
        torch.testing.assert_close(model.text_features("bottle"), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model.text_features("screw"), expected)


def test_class_name_per_image_from_the_batch_paths() -> None:
    lightning = CoOp(**TINY)
    batch = ImageBatch(image=images(), image_path=PATHS)
    assert lightning.inference_class_names(batch) == ["metal nut", "bottle"]
    model = lightning.model
    text = model.batch_text_features(["metal nut", "bottle"])
    torch.testing.assert_close(text[1], model.text_features("bottle"))
    with torch.no_grad():
        both = model(batch.image, ["metal nut", "bottle"])
        alone = model(batch.image[1:], ["bottle"])
    torch.testing.assert_close(both.pred_score[1:], alone.pred_score)


def test_score_and_map_by_hand() -> None:
    """AnomalyCLIP's way: softmax(cos / 0.07), the anomalous probability of the quarter blocks summed."""
    model = CoOp(**TINY).model.eval()
    clip, x = model.clip, images()
    text = model.text_features("object").detach()
    with torch.no_grad():
        out = model(x)
        score = (F.normalize(clip.encode_image(x), dim=-1) @ text.t() / 0.07).softmax(-1)[:, 1]
        depth = len(clip.visual.blocks)
        layers = sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3, 4)})
        tokens = clip.visual(x, layers).layers
        side = 64 // clip.arch.patch_size
        grid = sum((F.normalize(clip.visual.project(tokens[n][:, 1:]), dim=-1) @ text.t() / 0.07).softmax(-1)[..., 1]
                   for n in layers).reshape(2, 1, side, side)
        expected = model.blur(F.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=False)[:, 0])
    torch.testing.assert_close(out.pred_score, score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.anomaly_map, expected, atol=1e-5, rtol=1e-5)


def test_shared_context_is_one_tensor_separate_is_two() -> None:
    shared = CoOp(**TINY).model.prompt_learner
    assert shared.ctx_pos is shared.ctx_neg
    assert len(list(shared.parameters())) == 1
    separate = CoOp(**TINY, shared_context=False).model.prompt_learner
    assert separate.ctx_pos is not separate.ctx_neg
    assert not torch.equal(separate.ctx_pos, separate.ctx_neg)
    assert len(list(separate.parameters())) == 2


@pytest.mark.parametrize("shared_context", [True, False])
def test_one_training_step_moves_only_the_context(shared_context: bool) -> None:
    model = CoOp(**TINY, shared_context=shared_context)
    frozen = {n: p.detach().clone() for n, p in model.model.named_parameters() if n.startswith("clip.")}
    learnt = {n: p.detach().clone() for n, p in model.model.named_parameters() if not n.startswith("clip.")}
    optimizer = model.configure_optimizers()["optimizer"]
    batch = ImageBatch(image=images(), gt_label=torch.tensor([1, 0]), image_path=PATHS)
    loss = model.training_step(batch, 0)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = dict(model.model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert all(not torch.equal(after[n], v) for n, v in learnt.items())


def test_loss_is_the_image_cross_entropy_by_default() -> None:
    """CoOp trains the image-level cross-entropy only; ``lam`` adds AnomalyCLIP's focal + Dice terms."""
    model = CoOp(**TINY)
    x, labels = images(), torch.tensor([1, 0])
    batch = ImageBatch(image=x, gt_label=labels, image_path=PATHS, gt_mask=torch.zeros(2, 64, 64, dtype=torch.bool))
    loss = model.training_step(batch, 0)
    clip = model.model.clip
    text = torch.stack([model.model.text_features("metal nut"), model.model.text_features("bottle")])
    with torch.no_grad():
        image = F.normalize(clip.encode_image(x), dim=-1)
    logits = torch.einsum("be,bke->bk", image, text) / 0.07
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels), atol=1e-5, rtol=1e-5)
    with_maps = CoOp(**TINY, lam=1.0).training_step(batch, 0)
    assert with_maps > loss


def test_coops_schedule_warm_up_then_cosine() -> None:
    factor = 1e-5 / 0.002
    assert warmup_cosine(0, 15, 1, factor) == factor
    assert warmup_cosine(1, 15, 1, factor) == 1.0
    assert warmup_cosine(8, 15, 1, factor) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 15)))
    model = CoOp(**TINY)
    config = model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD)
    assert config["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-5)  # the warm-up epoch
    assert config["optimizer"].param_groups[0]["momentum"] == 0.9


def test_prompt_learner_file_makes_it_zero_shot(tmp_path: Path) -> None:
    source = CoOp(**TINY)  # same CLIP (the seed also draws a random CLIP), other contexts
    with torch.no_grad():
        source.model.prompt_learner.ctx_pos.add_(0.5)
    torch.save({"prompt_learner": source.model.prompt_learner.state_dict()}, tmp_path / "coop.pth")
    model = CoOp(**TINY, official_checkpoint=tmp_path / "coop.pth")
    assert model.learning_type == LearningType.ZERO_SHOT
    torch.testing.assert_close(model.model.prompt_learner.ctx_pos, source.model.prompt_learner.ctx_pos)
    assert model.model.prompt_learner.ctx_neg is model.model.prompt_learner.ctx_pos  # still one tensor
    with torch.no_grad():
        torch.testing.assert_close(model.model(images()).anomaly_map, source.model(images()).anomaly_map)


def test_training_never_takes_the_target_category() -> None:
    """In training the datamodule's category is the target's (CrossDataset): auxiliary images whose
    paths name no category get "object", evaluation images get the evaluated category."""
    from types import SimpleNamespace

    model = CoOp(**TINY)
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(category="pcb1"))
    batch = ImageBatch(image=images(1), gt_label=torch.tensor([1]), image_path=["/aux/img_000.png"])
    assert model._class_names(batch) == ["object"]  # what training_step uses
    assert model.inference_class_names(batch) == ["pcb1"]
