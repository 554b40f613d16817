"""Bayes-PFL against the official code's reference outputs (``$ZSAD_PARITY_DIR/bayes_pfl``).

The set's README (§8) gives the tolerances used here. The same CLIP state dict and official
checkpoint are loaded through this project's loaders, the stored Monte-Carlo draws are injected
(so the flows see the official noise), and every stored quantity of test.py and of one train.py
step is compared. Nothing here hard-codes a number of the set: other seeds must pass too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_zsad.clip import load_clip
from anomalib_zsad.models.bayes_pfl import BayesPFLModel, PromptNoise, load_official_checkpoint, official_final_scores
from anomalib_zsad.models.bayes_pfl.optim import make_adam, stage1_param_groups
from conftest import load_parity_tensors, require_parity_set

pytestmark = [pytest.mark.parity, pytest.mark.slow]

FILES = ("clip_state_dict.pt", "checkpoint.pth", "checkpoint_after_step.pth", "inputs.pt", "outputs.pt",
         "train_step.pt")
MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073))
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711))
#: official per-class top-k of calcuate_metric_pixel (20 for these, 2000 otherwise)
SMALL_TOPK = {"capsules", "macaroni1", "macaroni2", "pipe_fryum", "screw", "cashew", "chewinggum"}


def decode(u8: torch.Tensor) -> torch.Tensor:
    return u8.float().div(255).sub(MEAN[:, None, None]).div(STD[:, None, None])


def unpack(packed: dict) -> torch.Tensor:
    shape = tuple(packed["shape"])
    return torch.from_numpy(np.unpackbits(packed["bits"].numpy())[: int(np.prod(shape))].reshape(shape).copy())


def rel(actual: torch.Tensor, golden: torch.Tensor, floor: float = 0.0) -> float:
    return float((actual.detach().float() - golden.float()).abs().max() / max(golden.abs().max().item(), floor))


def absdiff(actual: torch.Tensor, golden: torch.Tensor) -> float:
    return float((actual.detach().double() - golden.double()).abs().max())


def build(folder: Path) -> BayesPFLModel:
    clip = load_clip("bayes-pfl-parity", folder / "clip_state_dict.pt", activation="gelu")  # official: exact GELU
    model = BayesPFLModel(clip, num_samples=10)
    return load_official_checkpoint(model, folder / "checkpoint.pth")


@pytest.fixture(scope="module")
def folder() -> Path:
    return require_parity_set("bayes_pfl", *FILES)


@pytest.fixture(scope="module")
def inference(folder: Path) -> dict:
    """Everything of test.py, computed once: the building blocks and the chunked predict."""
    torch.set_num_threads(2)
    model = build(folder).eval()
    inputs, golden = load_parity_tensors(folder, "inputs.pt"), load_parity_tensors(folder, "outputs.pt")
    images = decode(inputs["test_images_resized_uint8"])
    names = [name for name, _ in inputs["test_set"]]
    eps = golden["mc_eps"]  # [n, source, draw, 1, E]
    # image n's own context draws; the state draws of the FIRST image serve every image (official caching)
    noise = PromptNoise(eps[:, 0, :, 0], eps[0, 1, :, 0], eps[0, 2, :, 0])
    with torch.no_grad():
        features, tokens = model.encode_image(images)
        z_context = model.sample_context(features, noise.context_for(len(names))).zk.transpose(0, 1)
        normal, abnormal = model.sample_states(noise.normal, noise.abnormal)
        ids = model.token_ids(names, len(names))
        raw = model.text_embeddings(ids, z_context, normal.zk[:, 0], abnormal.zk[:, 0], normalize=False)
        text = F.normalize(raw, dim=-1)
        pro = model.image_logits(text, model.global_embedding(features, tokens, 2))
        layers = [model.pixel_logits(text, p) for p in model.patch_features(tokens)]
        predicted = model.predict_from_features(features, tokens, tuple(images.shape[-2:]), names, noise)
    return {"model": model, "golden": golden, "names": names, "features": features, "tokens": tokens,
            "z_context": z_context, "z_normal": normal.zk[:, 0], "z_abnormal": abnormal.zk[:, 0], "ids": ids,
            "raw_text": raw, "text": text, "pro": pro, "layers": layers, "predicted": predicted}


def test_parity_bayes_pfl_vision(inference: dict) -> None:
    model, golden = inference["model"], inference["golden"]
    grid = golden["maps_37"].shape[-2:]
    pos = model.clip.visual.positional_embedding_for(tuple(grid))
    assert rel(pos, golden["visual_positional_embedding_resized"]) < 2e-5
    assert rel(inference["features"], golden["image_features"]) < 1e-5
    index = golden["patch_token_index"]
    for ours, theirs in zip(inference["tokens"], golden["patch_tokens_sub"], strict=True):
        assert rel(ours[:, index], theirs) < 1e-5


def test_parity_bayes_pfl_flow_samples(inference: dict) -> None:
    golden = inference["golden"]
    assert rel(inference["z_context"], golden["z_context"], floor=1) < 2e-5
    assert rel(inference["z_normal"], golden["z_state_normal"][0], floor=1) < 2e-5
    assert rel(inference["z_abnormal"], golden["z_state_abnormal"][0], floor=1) < 2e-5


def test_parity_bayes_pfl_prompts_and_vocabulary(inference: dict) -> None:
    """Same token ids; the official extra (zero) token-embedding row is never read, so the
    model does not need it (no id reaches the appended index)."""
    model, golden = inference["model"], inference["golden"]
    assert torch.equal(inference["ids"][0], golden["prompt_tokens"][0].long())
    assert torch.count_nonzero(golden["token_embedding_extra_row"]) == 0
    assert int(inference["ids"].max()) < model.clip.text.token_embedding.num_embeddings


def test_parity_bayes_pfl_text(inference: dict) -> None:
    golden = inference["golden"]
    raw, half = inference["raw_text"], inference["raw_text"].shape[1] // 2
    assert rel(raw[:, :half], golden["text_normal"][:, 0]) < 2e-5
    assert rel(raw[:, half:], golden["text_abnormal"][:, 0]) < 2e-5
    assert rel(inference["text"], golden["text_embeddings"][:, 0]) < 2e-5


def test_parity_bayes_pfl_logits_and_maps(inference: dict) -> None:
    golden = inference["golden"]
    assert rel(inference["pro"], golden["pro_img"][:, 0, :, 0]) < 1e-5
    for layer, (updated, maps) in enumerate(inference["layers"]):
        assert rel(updated, golden["rca_text_update"][:, layer, 0]) < 2e-5, layer
        assert rel(maps, golden["maps_37"][:, layer, 0]) < 1e-5, layer


def test_parity_bayes_pfl_scores_and_anomaly_maps(inference: dict) -> None:
    golden, predicted = inference["golden"], inference["predicted"]
    index = golden["upsampled_sub_index"]
    assert absdiff(predicted["image_prob"], golden["image_scores"]) < 1e-6
    assert absdiff(predicted["raw_map"][:, index][:, :, index], golden["anomaly_map_sub"]) < 5e-6
    assert absdiff(predicted["anomaly_map"][:, index][:, :, index], golden["anomaly_map_smoothed_sub"]) < 2e-6


def test_parity_bayes_pfl_final_image_scores(inference: dict) -> None:
    """test.py's class-level fusion, top-k of the unsmoothed map (per-class k as the official code)."""
    golden, predicted = inference["golden"], inference["predicted"]
    raw = predicted["raw_map"].flatten(1)
    k = 20 if inference["names"][0] in SMALL_TOPK else 2000
    topk = raw.topk(k, dim=1).values.mean(1)
    final = official_final_scores(predicted["image_prob"], topk, golden["metric_kwargs"]["alpha"])
    assert absdiff(final, golden["final_image_scores"]) < 1e-6


# ---------------------------------------------------------------------------------- train.py step
@pytest.fixture(scope="module")
def training(folder: Path) -> dict:
    torch.set_num_threads(2)
    model = build(folder).train()
    golden = load_parity_tensors(folder, "train_step.pt")
    images = decode(golden["images_uint8"])
    masks = (unpack(golden["masks_packed"]).float().reshape(images.shape[0], *images.shape[-2:]) > 0.5).float()
    noise = PromptNoise(*golden["mc_eps"])
    out = model.training_outputs(images, golden["anomaly"], masks, golden["class_names"], stage=1, noise=noise,
                                 prompt_index=int(golden["index_prompt"].reshape(-1)[0]))
    optimizer = make_adam(stage1_param_groups(model))
    optimizer.zero_grad()
    out["loss"].backward()
    pixel_index = load_parity_tensors(folder, "outputs.pt")["upsampled_sub_index"]
    return {"model": model, "golden": golden, "out": out, "optimizer": optimizer, "folder": folder,
            "pixel_index": pixel_index}


def test_parity_bayes_pfl_train_forward(training: dict) -> None:
    model, golden, out = training["model"], training["golden"], training["out"]
    assert rel(out["image_features"], golden["image_features"]) < 1e-5
    names = ("mu", "var", "log_det", "z0", "zk")
    for flow, key in zip(out["flows"], ("pfl_context_out", "pfl_normal_out", "pfl_abnormal_out"), strict=True):
        ours = [flow.mu, flow.var, flow.log_det[0], flow.z0[0], flow.zk[0]]
        for name, value, reference in zip(names, ours, golden[key][1:], strict=True):
            assert rel(value, reference, floor=1) < 3e-5, (key, name)
    recon = model.PFL_context.reconstruct(out["flows"][0].zk[0], model.context_decoder)
    assert rel(recon, golden["pfl_context_out"][0], floor=1) < 3e-5
    for index in range(3):
        assert rel(out["kl"][index], golden["binary_loss_function"][index][2]) < 2e-5
    assert rel(out["rec"], golden["binary_loss_function"][0][1]) < 1e-6
    reg = golden["reg_terms"]
    assert rel(out["rec"], reg[0]) < 1e-6
    for index in range(3):
        assert rel(0.01 * out["kl"][index], reg[index + 1]) < 2e-5
    assert rel(out["text"], golden["text_embeddings"]) < 2e-5
    assert rel(out["logits"], golden["pro_img"][..., 0]) < 1e-5
    # strided subsets as in outputs.pt: patch tokens 0, 8, 16, ...; map pixels at test.py's index
    token_index = torch.arange(0, out["maps"][0].shape[-1] ** 2, 8)
    for ours, theirs in zip(out["tokens"], golden["patch_tokens_sub"], strict=True):
        assert rel(ours[:, token_index], theirs) < 1e-5
    index = training["pixel_index"]
    size = golden["images_uint8"].shape[-1]
    for layer in range(len(out["maps"])):
        assert rel(out["rca_text"][layer], golden["rca_text_update"][layer]) < 2e-5
        assert rel(out["maps"][layer], golden["maps_37"][layer]) < 1e-5
        up = F.interpolate(out["maps"][layer].detach(), size=size, mode="bilinear", align_corners=True)
        assert rel(up[..., index, :][..., index], golden["maps_upsampled_sub"][layer]) < 2e-5


def test_parity_bayes_pfl_train_losses(training: dict) -> None:
    golden, out = training["golden"], training["out"]
    assert int(out["prompt_index"]) == int(golden["index_prompt"].reshape(-1)[0])
    assert rel(out["loss_class"], golden["loss_class"]) < 5e-6
    assert rel(out["loss_focal"], golden["loss_focal"]) < 3e-5
    assert rel(out["loss_dice"], golden["loss_dice"]) < 5e-6
    assert rel(out["loss_orthogonal"], golden["loss_orthogonal"]) < 2e-6
    assert rel(out["loss"], golden["loss"]) < 1e-5


def test_parity_bayes_pfl_train_gradients(training: dict) -> None:
    model, golden = training["model"], training["golden"]
    for name, param in model.named_parameters():
        if name.startswith("clip."):
            continue
        reference = golden["grads"][name]
        if reference is None:
            assert param.grad is None, f"{name} should get no gradient (unused by the official loss)"
        else:
            assert rel(param.grad, reference) < 3e-4, name


def test_parity_bayes_pfl_optimizer_groups(training: dict) -> None:
    """Same learning rate for every parameter as the official four Adam groups."""
    model, golden, optimizer = training["model"], training["golden"], training["optimizer"]
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        if not name.startswith("clip."):
            assert lr_of[id(param)] == pytest.approx(golden["lr"][name][1]), name
    assert optimizer.defaults["betas"] == (0.5, 0.999)


def test_parity_bayes_pfl_adam_step(training: dict) -> None:
    """Post-step parameters: from the stored gradients (every element) and from our own
    gradients (elements with |g| > 1e-3 max|g|: the first Adam step is ~ -lr sign(g))."""
    model, golden, folder = training["model"], training["golden"], training["folder"]
    after = torch.load(folder / "checkpoint_after_step.pth", map_location="cpu", weights_only=True)["MyModel"]
    own = {n: p for n, p in model.named_parameters() if not n.startswith("clip.")}
    start = {n: p.detach().clone() for n, p in own.items()}
    own_grads = {n: p.grad for n, p in own.items()}

    def step(grads: dict) -> dict:
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(start[name])
                param.grad = None if grads[name] is None else grads[name].clone()
        optimizer = make_adam(stage1_param_groups(model))
        optimizer.step()
        return {n: p.detach().clone() for n, p in own.items()}

    from_stored = step(golden["grads"])
    for name, value in from_stored.items():
        assert absdiff(value, after[name]) < 1e-6, name
    from_own = step(own_grads)
    for name, value in from_own.items():
        reference = golden["grads"][name]
        if reference is None:
            assert torch.equal(value, after[name]), name
            continue
        mask = reference.abs() > 1e-3 * reference.abs().max()
        if mask.any():
            assert absdiff(value[mask], after[name][mask]) < 1e-6, name
