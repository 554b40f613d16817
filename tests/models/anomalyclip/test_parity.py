"""AnomalyCLIP against the unmodified official code (``$ZSAD_PARITY_DIR/anomalyclip``).

The set holds a narrow random CLIP with ViT-L/14@336 depth and grid, official prompt weights,
inputs and the official outputs; tolerances are those of its README (section 12).
"""

from __future__ import annotations

import pytest
import torch

from anomalib_zsad.clip import load_clip
from anomalib_zsad.models.anomalyclip.checkpoint import load_official_checkpoint
from anomalib_zsad.models.anomalyclip.loss import AnomalyCLIPLoss
from anomalib_zsad.models.anomalyclip.torch_model import AnomalyCLIPModel
from conftest import load_parity_tensors, require_parity_set

FILES = ("clip_state_dict.pt", "prompt_learner.pt", "inputs.pt", "outputs.pt", "train_step.pt")
VARIANTS = {"paper_layers": None, "features_list_24": [24]}


@pytest.fixture(scope="module")
def parity():
    folder = require_parity_set("anomalyclip", *FILES)
    return folder, {name: load_parity_tensors(folder, name) for name in ("inputs.pt", "outputs.pt", "train_step.pt")}


def build(folder, feature_layers) -> AnomalyCLIPModel:
    clip = load_clip("ViT-L-14-336", folder / "clip_state_dict.pt", pos_embed_mode="bilinear")
    model = AnomalyCLIPModel(clip, feature_layers=feature_layers)
    load_official_checkpoint(model, folder / "prompt_learner.pt")
    return model.eval()


def test_parity_anomalyclip_clip_loads_as_official(parity) -> None:
    """QuickGELU follows the OpenAI weights; the pos-embed resize is bilinear and exact."""
    folder, ref = parity
    model = build(folder, None)
    assert model.clip.arch.activation == "quick_gelu"
    state = torch.load(folder / "clip_state_dict.pt", weights_only=True)
    assert torch.equal(model.clip.visual.conv1.weight, state["visual.conv1.weight"].float())
    grid = (ref["inputs.pt"]["images"].shape[-1] // 14,) * 2
    resized = model.clip.visual.positional_embedding_for(grid)
    torch.testing.assert_close(resized[ref["outputs.pt"]["patch_token_index"]],
                               ref["outputs.pt"]["visual_positional_embedding_interpolated_sub"], atol=0, rtol=0)


def test_parity_anomalyclip_text_and_image_features(parity) -> None:
    folder, ref = parity
    out, images = ref["outputs.pt"], ref["inputs.pt"]["images"]
    model = build(folder, None)
    with torch.no_grad():
        text = model.text_features()
        global_feature, patches = model.encode_image(images)
    torch.testing.assert_close(text, out["text_features"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(global_feature, out["image_features_unnormalized"], atol=1e-5, rtol=0)
    tokens = out["patch_token_index"]
    for layer, patch in enumerate(patches):
        torch.testing.assert_close(patch[:, tokens], out["patch_features_unnormalized_sub"][layer], atol=1e-5, rtol=0)
    grid = model.grid_size(images)
    for layer, probs in enumerate(model.patch_probabilities(patches, text, grid)):
        reference = out["similarity"][layer][:, 1:].transpose(1, 2).reshape(probs.shape)
        torch.testing.assert_close(probs, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_anomalyclip_scores_and_maps(parity, variant: str) -> None:
    folder, ref = parity
    out, images = ref["outputs.pt"], ref["inputs.pt"]["images"]
    model = build(folder, VARIANTS[variant])
    with torch.no_grad():
        result = model(images)
    if variant == "paper_layers":
        torch.testing.assert_close(result.pred_score, out["image_scores"], atol=1e-5, rtol=0)
        torch.testing.assert_close(result.anomaly_map, out["anomaly_map_gaussian"], atol=2e-5, rtol=0)
    else:
        sub = out["upsampled_sub_index"]
        expected = out["variant_features_list_24"]
        torch.testing.assert_close(result.pred_score, expected["image_scores"], atol=1e-5, rtol=0)
        torch.testing.assert_close(result.anomaly_map[:, sub][:, :, sub], expected["anomaly_map_gaussian_sub"],
                                   atol=2e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_anomalyclip_training_step(parity, variant: str) -> None:
    """Loss terms, gradients and the parameters after one official Adam step."""
    folder, ref = parity
    step = ref["train_step.pt"] if variant == "paper_layers" else ref["train_step.pt"]["variant_features_list_24"]
    inputs = ref["inputs.pt"]
    model = build(folder, VARIANTS[variant]).train()
    order = step["batch_order"]
    logits, probs = model.training_outputs(inputs["images"][order])
    terms = AnomalyCLIPLoss(lam=step["lam"])(logits, inputs["labels"][order], probs,
                                             inputs["gt_masks"][order][:, 0].float())
    torch.testing.assert_close(logits, step["image_logits"], atol=1e-5, rtol=0)
    for name in ("image_loss", "focal", "dice_anomalous", "dice_normal"):
        torch.testing.assert_close(terms[name], step[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(terms["loss"], step["total"], atol=2e-5, rtol=0)

    optimizer = torch.optim.Adam(model.prompt_learner.parameters(), lr=1e-3, betas=(0.5, 0.999))
    terms["loss"].backward()
    params = dict(model.prompt_learner.named_parameters())
    for name, grad in step["grads"].items():
        scale = grad.abs().max()
        # ctx_* are plain fp32; the deep prompts' gradients pass the official fp16 cast (1-ulp flips).
        tolerance = 1e-5 if name.startswith("ctx") else 1e-3
        assert ((params[name].grad - grad).abs().max() / scale).item() < tolerance, name
    optimizer.step()
    for name, value in step["params_after_step"].items():
        torch.testing.assert_close(params[name].detach(), value, atol=1e-6, rtol=0)
