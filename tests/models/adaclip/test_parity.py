"""Parity with the official AdaCLIP code (commit e27ee32) on the narrow random CLIP of the parity set.

Reads ``$ZSAD_PARITY_DIR/adaclip`` (see its README): the OpenAI-format CLIP, the learnt tensors in
the official checkpoint format, inputs and the official outputs. The k-means labels of the official
run are fed to the HSF (the official call has no random_state). Tolerances are the README's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_parity_tensors, require_parity_set

from anomalib_zsad.clip import load_clip
from anomalib_zsad.models.adaclip import AdaCLIPLoss, AdaCLIPModel, load_official_checkpoint
from anomalib_zsad.models.adaclip.hsf import sklearn_kmeans_labels

pytestmark = [pytest.mark.parity, pytest.mark.slow]
FILES = ("clip_state_dict.pt", "adaclip_learnable.pt", "inputs.pt", "outputs.pt", "train_step.pt")
ATOL_IMAGE = 1e-5  # image-side features, tokens, dynamic prompts, HSF feature, anomaly score
ATOL_TEXT_EMBEDDING, ATOL_TEXT_FEATURE = 2e-4, 2e-5
ATOL_LOGITS, ATOL_MAP = 2e-3, 5e-5


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    diff = (actual.detach().float() - expected.float()).abs().max().item()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert diff <= atol, f"{what}: max abs diff {diff:.3e} > {atol:.1e}"


def build_model(folder, class_name: str) -> AdaCLIPModel:
    clip = load_clip("ViT-L-14-336", folder / "clip_state_dict.pt", activation="gelu", pos_embed_mode="bicubic")
    model = AdaCLIPModel(clip, class_name=class_name)
    load_official_checkpoint(model, folder / "adaclip_learnable.pt")
    return model


@pytest.fixture(scope="module")
def parity():
    folder = require_parity_set("adaclip", *FILES)
    torch.set_num_threads(2)
    inputs = load_parity_tensors(folder, "inputs.pt")
    outputs = load_parity_tensors(folder, "outputs.pt")
    model = build_model(folder, inputs["meta"]["cls_name"]).eval()
    with torch.no_grad():
        runs = [model.compute(inputs["images"][b:b + 1], hsf_labels=outputs["hsf_kmeans_labels"][b:b + 1])
                for b in range(inputs["images"].shape[0])]
    return {"folder": folder, "model": model, "inputs": inputs, "outputs": outputs, "runs": runs}


def test_parity_adaclip_text_tokens(parity) -> None:
    model, ref = parity["model"], parity["outputs"]
    n_normal = ref["text_tokens_normal"].shape[0]
    assert torch.equal(model.token_ids[:n_normal].int(), ref["text_tokens_normal"])
    assert torch.equal(model.token_ids[n_normal:].int(), ref["text_tokens_abnormal"])


def test_parity_adaclip_position_embedding_and_patch_embedding(parity) -> None:
    visual, ref, index = parity["model"].clip.visual, parity["outputs"], parity["outputs"]["token_index"]
    images = parity["inputs"]["images"]
    grid = (images.shape[-2] // visual.patch_size, images.shape[-1] // visual.patch_size)
    close(visual.positional_embedding_for(grid)[index], ref["visual_positional_embedding_sub"], 1e-6, "pos-embed")
    with torch.no_grad():
        close(visual.embed(images)[:, index], ref["patch_embedding_sub"], 1e-6, "ln_pre output")


def test_parity_adaclip_dynamic_prompts(parity) -> None:
    ref = parity["outputs"]
    for b, run in enumerate(parity["runs"]):
        close(run.frozen_image_features[0], ref["frozen_image_features"][b], ATOL_IMAGE, "frozen image features")
        close(run.dynamic_visual_prompts[0], ref["dynamic_visual_prompts"][b], ATOL_IMAGE, "dynamic visual prompts")
        close(run.dynamic_text_prompts[0], ref["dynamic_text_prompts"][b], ATOL_IMAGE, "dynamic text prompts")


def test_parity_adaclip_text_features(parity) -> None:
    ref = parity["outputs"]
    n_normal = ref["text_tokens_normal"].shape[0]
    for b, run in enumerate(parity["runs"]):
        close(run.text_embeddings[0, :n_normal], ref["text_embeddings_normal"][b], ATOL_TEXT_EMBEDDING, "normal text")
        close(run.text_embeddings[0, n_normal:], ref["text_embeddings_abnormal"][b], ATOL_TEXT_EMBEDDING,
              "anomalous text")
        close(run.text_features[0].t(), ref["text_features"][b], ATOL_TEXT_FEATURE, "text features")


def test_parity_adaclip_vision_tokens(parity) -> None:
    ref, index = parity["outputs"], parity["outputs"]["token_index"]
    for b, run in enumerate(parity["runs"]):
        close(run.image_features[0], ref["image_features_unnormalized"][b], ATOL_IMAGE, "pooled image feature")
        for layer, tokens in enumerate(run.layer_tokens):
            close(tokens[0, index], ref["patch_tokens_raw_sub"][layer, b], ATOL_IMAGE, f"raw tokens {layer}")


def test_parity_adaclip_projections_and_logits(parity) -> None:
    ref, index = parity["outputs"], parity["outputs"]["token_index"][1:] - 1
    for b, run in enumerate(parity["runs"]):
        close(run.cls_feature[0], ref["cls_token_projected"][b], ATOL_IMAGE, "projected class token")
        for layer in range(len(run.patch_features)):
            close(run.patch_features[layer][0, index], ref["patch_tokens_projected_sub"][layer, b], ATOL_IMAGE,
                  f"projected patches {layer}")
            close(run.patch_logits[layer][0], ref["patch_logits"][layer, b], ATOL_LOGITS, f"patch logits {layer}")


def test_parity_adaclip_hsf_and_score(parity) -> None:
    ref = parity["outputs"]
    for b, run in enumerate(parity["runs"]):
        close(run.hsf_input[0], ref["hsf_kmeans_input"][b], ATOL_IMAGE, "HSF k-means input")
        close(run.hsf_feature[0], ref["hsf_clustered_feature"][b], ATOL_IMAGE, "HSF clustered feature")
        close(run.image_probs[0, 1], ref["anomaly_score"][b], ATOL_IMAGE, "anomaly score")


def test_parity_adaclip_sklearn_kmeans_backend(parity) -> None:
    """The ``sklearn`` backend is the official call: numpy seeded as the official run, it finds the same
    partition (labels can differ on another CPU where two tokens are nearly equidistant)."""
    from sklearn.metrics import adjusted_rand_score  # noqa: PLC0415

    ref = parity["outputs"]
    state = np.random.get_state()
    try:
        np.random.seed(111)
        labels = [sklearn_kmeans_labels(ref["hsf_kmeans_input"][b], 20, seed=None) for b in range(2)]
    finally:
        np.random.set_state(state)
    for b, found in enumerate(labels):
        assert adjusted_rand_score(ref["hsf_kmeans_labels"][b].numpy(), found.numpy()) > 0.8


def test_parity_adaclip_anomaly_maps(parity) -> None:
    model, ref, sub = parity["model"], parity["outputs"], parity["outputs"]["upsampled_sub_index"]
    size = tuple(parity["inputs"]["images"].shape[-2:])
    with torch.no_grad():
        for b, run in enumerate(parity["runs"]):
            for layer, up in enumerate(model.upsampled_logits(run, size)):
                close(up[0][:, sub][:, :, sub], ref["patch_logits_upsampled_sub"][layer, b], ATOL_LOGITS,
                      f"upsampled logits {layer}")
            raw = model.unsmoothed_map(run, size)
            close(raw[0], ref["anomaly_map"][b], ATOL_MAP, "anomaly map")
            close(model.blur(raw)[0], ref["anomaly_map_gaussian"][b], ATOL_MAP, "smoothed anomaly map")


def test_parity_adaclip_forward_matches_pieces(parity) -> None:
    """``forward`` (what anomalib and exports call) gives the same score and map as the pieces."""
    model, ref = parity["model"], parity["outputs"]
    with torch.no_grad():
        out = model(parity["inputs"]["images"][:1])
    # The labels come from the torch k-means here: the score moves a little, the map does not.
    close(out.anomaly_map[0], ref["anomaly_map_gaussian"][0], ATOL_MAP, "forward map")
    assert abs(out.pred_score[0].item() - ref["anomaly_score"][0].item()) < 5e-3


def _restart_optimizer(params: dict[str, torch.nn.Parameter], step0: dict, lr: float) -> torch.optim.AdamW:
    """AdamW as after the official step 0 (README section 13): exp_avg = 0.5 g0, exp_avg_sq = 0.001 g0^2."""
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(step0["params_after_step"][name])
    optimizer = torch.optim.AdamW(params.values(), lr=lr, betas=(0.5, 0.999), weight_decay=0.01)
    for name, p in params.items():
        if name in step0["grads"]:
            g0 = step0["grads"][name]
            optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": 0.5 * g0, "exp_avg_sq": 0.001 * g0 * g0}
    return optimizer


@pytest.fixture(scope="module")
def training(parity):
    """The two official train.py steps, step 1 restarted from the golden step-0 state."""
    folder, inputs = parity["folder"], parity["inputs"]
    golden = load_parity_tensors(folder, "train_step.pt")
    lr = golden["meta"]["optimizer_hyper"]["lr"]
    model = build_model(folder, inputs["meta"]["cls_name"]).train()
    params = {n: p for n, p in model.named_parameters() if not n.startswith("clip.")}
    optimizer = torch.optim.AdamW(params.values(), lr=lr, betas=(0.5, 0.999), weight_decay=0.01)
    loss_fn, results = AdaCLIPLoss(), []
    for index, step in enumerate(golden["steps"]):
        if index == 1:
            optimizer = _restart_optimizer(params, golden["steps"][0], lr)
        i = step["image_index"]
        probs, maps, out = model.training_outputs(inputs["images"][i:i + 1], hsf_labels=step["kmeans_labels"][None])
        terms = loss_fn(probs, torch.tensor([step["label"]]), maps, inputs["gt_masks"][i:i + 1].float())
        optimizer.zero_grad()
        terms["loss"].backward()
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}
        optimizer.step()
        after = {n: p.detach().clone() for n, p in params.items()}
        results.append({"probs": probs.detach(), "hsf_input": out.hsf_input.detach(), "terms": terms,
                        "grads": grads, "after": after})
    return golden, results


def _check_step(golden: dict, result: dict, loss_rtol: float, loss_atol: float, grad_rel: float) -> None:
    close(result["probs"], golden["anomaly_score"], ATOL_IMAGE, "training score")
    close(result["hsf_input"][0], golden["kmeans_input"], ATOL_IMAGE, "training HSF input")
    for key in ("classification_focal", "seg_focal", "seg_dice_anomalous", "seg_dice_normal", "loss"):
        expected = golden[key]
        atol = loss_atol + loss_rtol * expected.abs().max().item()
        close(result["terms"][key], expected, atol, key)
    assert sorted(n for n, g in result["grads"].items() if g is None) == sorted(golden["params_without_grad"])
    g_max = max(g.abs().max().item() for g in golden["grads"].values())
    for name, expected in golden["grads"].items():
        close(result["grads"][name], expected, grad_rel * g_max, f"gradient {name}")


def test_parity_adaclip_train_step_0(training) -> None:
    golden, results = training
    step, result = golden["steps"][0], results[0]
    assert step["dice_N"] == golden["steps"][0]["dice_N"]  # the per-row Dice the loss reproduces
    _check_step(step, result, 0.0, 1e-5, 1e-3)
    for name, expected in step["params_after_step"].items():
        close(result["after"][name], expected, 1e-4, f"parameter {name} after AdamW")


def test_parity_adaclip_train_step_1(training) -> None:
    golden, results = training
    step, result = golden["steps"][1], results[1]
    _check_step(step, result, 1e-4, 0.0, 3e-2)
    diffs = torch.cat([(result["after"][n] - v).abs().flatten() for n, v in step["params_after_step"].items()])
    assert (diffs <= 1e-3).float().mean().item() >= 0.99
    assert diffs.max().item() <= 0.02


def test_parity_adaclip_checkpoint_after_training(parity, tmp_path) -> None:
    """The official ``_best.pth`` that train.py wrote imports with its trained values."""
    golden = load_parity_tensors(parity["folder"], "train_step.pt")
    path = tmp_path / "adaclip_best.pth"
    torch.save(golden["checkpoint_after"], path)
    model = build_model(parity["folder"], "candle")
    load_official_checkpoint(model, path)
    own = dict(model.named_parameters())
    for key, value in golden["checkpoint_after"].items():
        assert torch.equal(own[key.removeprefix("clip_model.")], value), key
