"""AA-CLIP against the official code's outputs (``$ZSAD_PARITY_DIR/aa_clip``, see its README).

Every number comes from the parity files (sets with other seeds pass the same tests); the
tolerances are the README's (§8). Official quirks are switched on here: batch-axis surgery V-V
and last-level stage-1 loss, the hand-written class descriptions, the per-class min-max.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anomalib.models.components.filters import GaussianBlur2d

from anomalib_zsad.clip import load_clip, tokenize
from anomalib_zsad.models.aa_clip.checkpoint import load_official_checkpoint
from anomalib_zsad.models.aa_clip.evaluation import official_image_scores, official_metrics, official_normalize
from anomalib_zsad.models.aa_clip.loss import AACLIPLoss
from anomalib_zsad.models.aa_clip.prompts import OFFICIAL_REAL_NAMES, describe_class, state_sentences
from anomalib_zsad.models.aa_clip.torch_model import AACLIPModel
from conftest import load_parity_tensors, require_parity_set

pytestmark = pytest.mark.parity

FILES = ("clip_state_dict.pt", "text_adapter.pth", "image_adapter_1.pth", "inputs.pt", "outputs.pt", "train_step.pt")
MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073))
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711))


def unpack(packed: dict) -> torch.Tensor:
    shape = list(packed["shape"])
    bits = np.unpackbits(packed["bits"].numpy())[: int(np.prod(shape))]
    return torch.from_numpy(bits.reshape(shape).copy())


def decode(images_u8: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
    x = images_u8.float().div(255).sub(MEAN[:, None, None]).div(STD[:, None, None])
    return x if fill is None else x.masked_fill(fill.bool()[:, None], 0.0)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_diff(a, b) / b.double().abs().max().item()


@pytest.fixture(scope="module")
def parity() -> dict:
    folder = require_parity_set("aa_clip", *FILES)
    return {"folder": folder, **{name.removesuffix(".pt"): load_parity_tensors(folder, name)
                                 for name in ("inputs.pt", "outputs.pt", "train_step.pt")}}


def build_model(folder, real_names: dict, **kwargs) -> AACLIPModel:
    clip = load_clip("ViT-L-14-336", folder / "clip_state_dict.pt", head_width=32, activation="gelu",
                     pos_embed_mode="bicubic_antialias")
    model = AACLIPModel(clip, real_names=real_names, surgery_vv_across_batch=True, **kwargs)
    load_official_checkpoint(model, folder / "text_adapter.pth", folder / "image_adapter_1.pth")
    return model


@pytest.fixture(scope="module")
def test_run(parity: dict) -> dict:
    """The official test.py run: the model, its inputs and the image features (computed once)."""
    inputs, outputs = parity["inputs"], parity["outputs"]
    model = build_model(parity["folder"], OFFICIAL_REAL_NAMES[inputs["meta"]["test_dataset"]])
    images = decode(inputs["test_images_resized_uint8"])
    with torch.no_grad():
        seg, det = model.encode_image(images)
        text = torch.stack([model.anchors(name) for name in inputs["test_class"]])
    return {"model": model, "images": images, "seg": seg, "det": det, "text": text, "inputs": inputs,
            "outputs": outputs, "masks": unpack(inputs["test_masks_packed"])[:, 0]}


def test_parity_aa_clip_pos_embed(test_run: dict) -> None:
    expected = test_run["outputs"]["visual_positional_embedding_resized"]
    grid = round((expected.shape[0] - 1) ** 0.5)
    resized = test_run["model"].clip.visual.positional_embedding_for((grid, grid))
    assert max_diff(resized, expected) <= 1e-6


def test_parity_aa_clip_text(test_run: dict) -> None:
    model, outputs = test_run["model"], test_run["outputs"]
    first = test_run["inputs"]["test_class"][0]
    normal, anomalous = state_sentences(describe_class(first, model.real_names))
    for sentences, tokens, features in zip((normal, anomalous), outputs["sentence_tokens_class01"],
                                           outputs["sentence_features_class01"], strict=True):
        ids = tokenize(sentences)
        assert torch.equal(ids, tokens.long())
        with torch.no_grad():
            assert max_diff(model.encode_text(ids), features) <= 2e-5
    for name, expected in outputs["text_embeddings"].items():
        assert max_diff(model.anchors(name), expected) <= 2e-6


def test_parity_aa_clip_image_features(test_run: dict) -> None:
    outputs = test_run["outputs"]
    tok = outputs["patch_token_index"]
    assert max_diff(test_run["det"], outputs["det_feature"]) <= 2e-6
    assert max_diff(torch.stack(test_run["seg"])[:, :, tok], outputs["seg_tokens_sub"]) <= 2e-6


def test_parity_aa_clip_maps(test_run: dict) -> None:
    model, outputs, text = test_run["model"], test_run["outputs"], test_run["text"]
    idx = outputs["upsampled_sub_index"]
    size = test_run["images"].shape[-2:]
    grid = model.grid_size(test_run["images"])
    raw = torch.stack([model.raw_map(model.patch_logits(f, text, grid)) for f in test_run["seg"]])
    blurred = torch.stack([model.blur(level[:, None])[:, 0] for level in raw])
    up = torch.nn.functional.interpolate(blurred, size=size, mode="bilinear", align_corners=True)
    assert max_diff(raw, outputs["patch_map_raw"]) <= 1e-4
    assert max_diff(blurred, outputs["patch_map_blurred"]) <= 1e-4
    assert max_diff(up[:, :, idx][:, :, :, idx], outputs["patch_map_upsampled_sub"]) <= 1e-4
    # The model's own head (levels summed on the grid, smoothed and upsampled once).
    result = model.head(test_run["seg"], test_run["det"], text, size)
    assert max_diff(result.anomaly_map[:, idx][:, :, idx], outputs["preds_sub"]) <= 1e-4
    assert max_diff(result.anomaly_map[1], outputs["preds_full_image1"]) <= 1e-4
    assert max_diff(result.pred_score, outputs["image_pred_raw"]) <= 1e-6


def test_parity_aa_clip_forward_matches_head(test_run: dict) -> None:
    """``forward`` on one image equals the stored full map (same path, end to end)."""
    model, outputs, inputs = test_run["model"], test_run["outputs"], test_run["inputs"]
    result = model(test_run["images"][1:2], class_names=[inputs["test_class"][1]])
    assert max_diff(result.anomaly_map[0], outputs["preds_full_image1"]) <= 1e-4
    assert max_diff(result.pred_score, outputs["image_pred_raw"][1:2]) <= 1e-6


def _check_official_evaluation(preds: torch.Tensor, scores: torch.Tensor, masks: torch.Tensor,
                               labels: torch.Tensor, classes: list[str], expected: dict, domain: str,
                               idx: torch.Tensor) -> None:
    normalised = torch.empty_like(preds)
    for position, name in enumerate(dict.fromkeys(classes)):
        members = torch.tensor([i for i, c in enumerate(classes) if c == name])
        norm_preds, norm_scores = official_normalize(preds[members], scores[members])
        normalised[members] = norm_preds
        final = expected["image_scores_final"][position]
        if final is not None:
            assert max_diff(official_image_scores(norm_preds, norm_scores, domain), final) <= 1e-5
        row = official_metrics(preds[members], scores[members], masks[members], labels[members], domain)
        for key, value in row.items():
            assert abs(value - expected["metrics"][position][key]) <= 0.011, (name, key)
    assert max_diff(normalised[:, idx][:, :, idx], expected["pixel_preds_normalized_sub"]) <= 2e-5


def test_parity_aa_clip_official_evaluation(test_run: dict) -> None:
    model, outputs, inputs = test_run["model"], test_run["outputs"], test_run["inputs"]
    result = model.head(test_run["seg"], test_run["det"], test_run["text"], test_run["images"].shape[-2:])
    labels = inputs["raw_labels"][inputs["test_raw_index"]]
    _check_official_evaluation(result.anomaly_map, result.pred_score, test_run["masks"], labels,
                               list(inputs["test_class"]), outputs, "Industrial", outputs["upsampled_sub_index"])


def test_parity_aa_clip_medical_variant(test_run: dict) -> None:
    """The Brain run: other class description, 9/1.5 blur, image score = max of the map."""
    model, outputs, inputs = test_run["model"], test_run["outputs"], test_run["inputs"]
    brain = outputs["variant_medical_brain"]
    positions = [int((inputs["test_raw_index"] == r).nonzero()[0]) for r in inputs["medical_raw_index"]]
    name = next(iter(brain["text_embeddings"]))
    kernel, sigma = brain["blur_kwargs"]["kernel_size"][0], brain["blur_kwargs"]["sigma"][0]
    medical = AACLIPModel(model.clip, real_names=OFFICIAL_REAL_NAMES[inputs["meta"]["medical_dataset"]],
                          blur_kernel_size=kernel, blur_sigma=sigma, image_score="text")
    medical.text_adapter.load_state_dict(model.text_adapter.state_dict())
    medical.image_adapter.load_state_dict(model.image_adapter.state_dict())
    text = medical.anchors(name)
    assert max_diff(text, brain["text_embeddings"][name]) <= 2e-6
    seg = [f[positions] for f in test_run["seg"]]
    det = test_run["det"][positions]
    assert max_diff(det, brain["det_feature"]) <= 2e-6
    result = medical.head(seg, det, text, test_run["images"].shape[-2:])
    assert max_diff(result.pred_score, brain["image_pred_raw"]) <= 1e-6
    grid = medical.grid_size(test_run["images"])
    raw = torch.stack([medical.raw_map(medical.patch_logits(f, text, grid)) for f in seg])
    blurred = torch.stack([medical.blur(level[:, None])[:, 0] for level in raw])
    assert max_diff(blurred, brain["patch_map_blurred"]) <= 1e-4
    idx = outputs["upsampled_sub_index"]
    assert max_diff(result.anomaly_map[:, idx][:, :, idx], brain["preds_sub"]) <= 1e-4
    labels = inputs["raw_labels"][inputs["medical_raw_index"]]
    _check_official_evaluation(result.anomaly_map, result.pred_score, test_run["masks"][positions], labels,
                               [name] * len(positions), brain, "Medical", idx)
    # As an anomalib model, the official medical score is the image_score="map_max" option.
    medical.image_score = "map_max"
    pmax = medical.head(seg, det, text, test_run["images"].shape[-2:]).pred_score
    assert torch.equal(pmax, result.anomaly_map.amax(dim=(-2, -1)))


def test_parity_aa_clip_blur_is_kornia() -> None:
    kornia = pytest.importorskip("kornia")
    maps = torch.rand(3, 1, 37, 37, generator=torch.Generator().manual_seed(0))
    for kernel, sigma in ((7, 1.0), (9, 1.5)):
        expected = kornia.filters.gaussian_blur2d(maps, (kernel, kernel), (sigma, sigma), border_type="reflect")
        assert max_diff(GaussianBlur2d(sigma=sigma, channels=1, kernel_size=kernel)(maps), expected) <= 1e-6


# ----------------------------------------------------------------------------- training
def _adam(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lr: float) -> dict[str, torch.Tensor]:
    """One step of the official optimiser, Adam(betas=(0.5, 0.999)), on given gradients."""
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    optimiser = torch.optim.Adam(tensors.values(), lr=lr, betas=(0.5, 0.999))
    for key, tensor in tensors.items():
        tensor.grad = grads[key].clone()
    optimiser.step()
    return {k: v.detach() for k, v in tensors.items()}


@pytest.mark.parametrize(("stage", "part", "checkpoint", "after"), [
    ("stage1_text", "text_adapter", "text_adapter.pth", "checkpoint_text_adapter_after"),
    ("stage2_image", "image_adapter", "image_adapter_1.pth", "checkpoint_image_adapter_after"),
])
def test_parity_aa_clip_optimizer_on_stored_grads(parity: dict, stage: str, part: str, checkpoint: str,
                                                  after: str) -> None:
    step = parity["train_step"][stage]
    initial = torch.load(parity["folder"] / checkpoint, weights_only=True)[part]
    grads = {k.removeprefix(part + "."): v for k, v in step["grads"].items()}
    updated = _adam(initial, grads, step["lr"][0])
    for key, value in updated.items():
        assert max_diff(value, step["params_after_step"][f"{part}.{key}"]) <= 3e-8
        assert max_diff(value, parity["train_step"][after][key]) <= 3e-8


def _train_batch(step: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return decode(step["images_uint8"], unpack(step["images_fill_packed"])), unpack(step["masks_packed"])[:, 0].float()


def _check_terms(terms: dict, step: dict, names: tuple[str, ...], idx: torch.Tensor) -> None:
    probs = torch.stack(terms["probs"])[:, :, :, idx][..., idx]
    assert max_diff(probs, step["seg_probs_upsampled_sub"]) <= 5e-5
    for name in names:
        assert rel_diff(terms[name], step[name]) <= 1e-5, name


def _check_grads_and_step(module: torch.nn.Module, part: str, step: dict, lr: float, atol_after: float) -> None:
    optimiser = torch.optim.Adam(module.parameters(), lr=lr, betas=(0.5, 0.999))
    for name, param in module.named_parameters():
        assert rel_diff(param.grad, step["grads"][f"{part}.{name}"]) <= 2e-5, name
    optimiser.step()
    for name, param in module.named_parameters():
        assert max_diff(param, step["params_after_step"][f"{part}.{name}"]) <= atol_after, name


@pytest.mark.slow
def test_parity_aa_clip_stage1_text_step(parity: dict) -> None:
    step, tok = parity["train_step"]["stage1_text"], parity["train_step"]["patch_token_index"]
    model = build_model(parity["folder"], OFFICIAL_REAL_NAMES[parity["inputs"]["meta"]["train_dataset"]])
    images, masks = _train_batch(step)
    out = model.stage1_outputs(images, step["class_names"])
    surgery = torch.stack([out["surgery_tokens"][level][:, tok] for level in model.levels])
    assert max_diff(surgery, step["surgery_tokens_sub"]) <= 2e-5
    assert max_diff(out["cls"], step["cls_token_normalized"]) <= 2e-6
    assert max_diff(torch.stack(out["patch_features"])[:, :, tok], step["patch_features"]) <= 2e-6
    assert max_diff(out["text"], step["epoch_text_feature"]) <= 2e-6
    loss = AACLIPLoss(orthogonal_weight=step["text_norm_weight"], stage1_levels="last")
    terms = loss.stage1(out["level_logits"], out["text"], masks)
    _check_terms(terms, step, ("focal", "dice_normal", "dice_anomalous", "loss"), parity["train_step"]["upsampled_sub_index"])
    assert rel_diff(terms["orthogonal_loss"], step["orthogonal_loss"]) <= 2e-6
    terms["loss"].backward()
    assert all(p.grad is None for p in model.image_adapter.parameters())
    _check_grads_and_step(model.text_adapter, "text_adapter", step, step["lr"][0], 3e-8)


@pytest.mark.slow
def test_parity_aa_clip_stage2_image_step(parity: dict) -> None:
    train_step = parity["train_step"]
    step, tok = train_step["stage2_image"], train_step["patch_token_index"]
    model = build_model(parity["folder"], OFFICIAL_REAL_NAMES[parity["inputs"]["meta"]["train_dataset"]])
    # Stage 2 starts from the text adapter stage 1 wrote.
    model.text_adapter.load_state_dict(train_step["checkpoint_text_adapter_after"])
    for name, expected in step["text_embeddings"].items():
        assert max_diff(model.anchors(name), expected) <= 2e-6
    images, masks = _train_batch(step)
    out = model.stage2_outputs(images, step["class_names"])
    assert max_diff(out["text"], step["epoch_text_feature"]) <= 2e-6
    assert max_diff(out["det"], step["det_feature"]) <= 2e-6
    assert max_diff(torch.stack(out["seg"])[:, :, tok], step["seg_tokens_sub"]) <= 2e-6
    assert max_diff(out["cls_logits"], step["cls_logits"]) <= 2e-7
    terms = AACLIPLoss().stage2(out["level_logits"], out["cls_logits"], step["labels"], masks)
    assert max_diff(terms["cls_loss"], step["cls_loss"]) <= 1e-6
    _check_terms(terms, step, ("focal", "dice_normal", "dice_anomalous", "loss"), train_step["upsampled_sub_index"])
    terms["loss"].backward()
    assert all(p.grad is None for p in model.text_adapter.parameters())
    _check_grads_and_step(model.image_adapter, "image_adapter", step, step["lr"][0], 2e-5)
