"""CLIP and CLIP-AC (AnomalyCLIP's Appendix A.2) against computations written out by hand on the
tiny random CLIP: no official code exists for these baselines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib import LearningType
from anomalib.data import ImageBatch

from anomalib_zsad.clip import tokenize
from anomalib_zsad.clip.prompts import CLIP_IMAGENET_TEMPLATES
from anomalib_zsad.models import CLIPBaseline
from anomalib_zsad.models.clip_baseline.torch_model import prompt_sentences

TINY = {"backbone": "zsad-tiny", "pretrained": None, "image_size": 64}


def images(count: int = 2) -> torch.Tensor:
    return torch.rand(count, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def encode(clip, sentences: list[str]) -> torch.Tensor:
    """The sentences through CLIP's plain text tower (full 77 tokens), normalised [n, E]."""
    with torch.no_grad():
        return F.normalize(clip.encode_text(tokenize(sentences)), dim=-1)


def test_clip_prompts_are_the_papers_word_for_word() -> None:
    """"A photo of a normal [cls]" and "A photo of an anomalous [cls]" (Appendix A.2), token for token."""
    normal, anomalous = prompt_sentences("clip", "bottle")
    assert (normal, anomalous) == (["A photo of a normal bottle"], ["A photo of an anomalous bottle"])
    ids = tokenize(normal + anomalous)
    words = [[t for t in row.tolist() if t][1:-1] for row in ids]  # no start/end token, no padding
    from open_clip.tokenizer import SimpleTokenizer

    decoded = [SimpleTokenizer().decode(w).strip() for w in words]
    assert decoded == ["a photo of a normal bottle", "a photo of an anomalous bottle"]


def test_clip_ac_is_every_imagenet_template_with_each_class() -> None:
    normal, anomalous = prompt_sentences("clip_ac", "metal nut")
    assert len(CLIP_IMAGENET_TEMPLATES) == len(normal) == len(anomalous) == 80
    assert normal[0] == "a bad photo of a normal metal nut."
    assert anomalous[-1] == "a tattoo of the anomalous metal nut."
    assert normal == [t.format("normal metal nut") for t in CLIP_IMAGENET_TEMPLATES]


@pytest.mark.parametrize("prompts", ["clip", "clip_ac"])
def test_text_embedding_is_the_mean_of_the_normalised_prompt_embeddings(prompts: str) -> None:
    model = CLIPBaseline(**TINY, prompts=prompts).model
    normal, anomalous = prompt_sentences(prompts, "bottle")
    expected = torch.stack([F.normalize(encode(model.clip, side).mean(0), dim=0) for side in (normal, anomalous)])
    torch.testing.assert_close(model.class_text_features("bottle"), expected, atol=1e-5, rtol=1e-5)


def test_score_and_map_by_hand() -> None:
    """Eq. 1 with CLIP's temperature on the class token; the same on the last block's patch tokens,
    anomalous probability, bilinear to the image, Gaussian sigma 4."""
    model = CLIPBaseline(**TINY).model.eval()
    clip, x = model.clip, images()
    text = model.class_text_features("object")
    scale = clip.logit_scale.exp().clamp(max=100)
    with torch.no_grad():
        out = model(x)
        image = F.normalize(clip.encode_image(x), dim=-1)
        score = (scale * image @ text.t()).softmax(-1)[:, 1]
        depth = len(clip.visual.blocks)
        patches = clip.visual.project(clip.visual(x, [depth]).layers[depth][:, 1:])
        probs = (scale * F.normalize(patches, dim=-1) @ text.t()).softmax(-1)[..., 1]
        grid = probs.reshape(2, 1, 64 // clip.arch.patch_size, 64 // clip.arch.patch_size)
        expected = model.blur(F.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=False)[:, 0])
    torch.testing.assert_close(out.pred_score, score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.anomaly_map, expected, atol=1e-5, rtol=1e-5)


def test_class_name_per_image_from_the_paths() -> None:
    lightning = CLIPBaseline(**TINY)
    batch = ImageBatch(image=images(), image_path=["/d/metal_nut/test/scratch/000.png", "/d/bottle/test/good/001.png"])
    assert lightning.inference_class_names(batch) == ["metal nut", "bottle"]
    model = lightning.model.eval()
    with torch.no_grad():
        both = model(batch.image, ["metal nut", "bottle"])
        alone = model(batch.image[1:], ["bottle"])
        other = model(batch.image[1:], ["metal nut"])
    torch.testing.assert_close(both.pred_score[1:], alone.pred_score)
    assert not torch.allclose(alone.pred_score, other.pred_score)
    assert CLIPBaseline(**TINY, class_name="screw").inference_class_names(batch) is None  # fixed name


def test_export_freezes_the_text_features_of_the_fixed_class() -> None:
    lightning = CLIPBaseline(**TINY, class_name="screw")
    model = lightning.model.eval()
    with torch.no_grad():
        before = model(images())
    lightning._freeze_for_export()
    assert model.text_cache.is_frozen
    torch.testing.assert_close(model.text_cache.frozen, model.class_text_features("screw"))
    with torch.no_grad():
        torch.testing.assert_close(model(images()).anomaly_map, before.anomaly_map)


def test_zero_shot_until_thresholds_nothing_to_train() -> None:
    model = CLIPBaseline(**TINY)
    assert model.learning_type == LearningType.ZERO_SHOT  # Engine.fit only validates it
    assert model.configure_optimizers() is None
    assert not [p for n, p in model.model.named_parameters() if p.requires_grad]
    assert model.default_max_epochs() is None


def test_temperature_can_be_given() -> None:
    model = CLIPBaseline(**TINY, temperature=0.5).model.eval()
    text = model.class_text_features("object")
    with torch.no_grad():
        score = model(images()).pred_score
        image = F.normalize(model.clip.encode_image(images()), dim=-1)
    torch.testing.assert_close(score, (image @ text.t() / 0.5).softmax(-1)[:, 1], atol=1e-5, rtol=1e-5)


def test_auto_class_name_falls_back_to_the_evaluated_category() -> None:
    """Paths outside the MVTec AD / VisA layout: the evaluated datamodule's single category, else "object"."""
    from types import SimpleNamespace

    model = CLIPBaseline(**TINY)
    batch = ImageBatch(image=images(1), image_path=["/folder/img_000.png"])
    assert model.inference_class_names(batch) == ["object"]
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(category="metal_nut"))
    assert model.inference_class_names(batch) == ["metal nut"]
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(category="bottle+screw"))  # pooled: no one name
    assert model.inference_class_names(batch) == ["object"]
