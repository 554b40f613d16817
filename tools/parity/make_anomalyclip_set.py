r"""Make an AnomalyCLIP parity set with the official code (zqhang/AnomalyCLIP, commit 45ed4dd), any seed.

The set has the format of ``../shared/parity/anomalyclip`` (see its README.md): the official ``test.py``
(with its argparse defaults, then with ``--features_list 24`` as test.sh passes) and ``train.py`` (one step,
``--epoch 1 --batch_size 2``, both feature lists) run unmodified, as ``__main__``, importing the official
code from ``--src`` (an export of the official repository; nothing of it is copied here). The run-time
patches are those the shared set's ``run_info.json`` lists; intermediate tensors are caught by wrappers
that only observe.

    git --git-dir /work/.mirror/zqhang+AnomalyCLIP/repo archive 45ed4dd35c05797d854294b5e8d585c545920089 \\
        -- . ':!checkpoints' | tar x -C /tmp/anomalyclip_off
    python tools/parity/make_anomalyclip_set.py --src /tmp/anomalyclip_off --out /tmp/parity_seeds/seed7 --seed 7

``--seed S`` draws the narrow CLIP from ``torch.manual_seed(S)``, the prompt learner from ``S + 1`` and the
images from ``numpy.random.default_rng(S + 2)``; ``--seed 100`` remakes the shared set (its README names
seeds 100, 101, 102). The set goes to ``<out>/anomalyclip``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import runpy
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from anomalyclip_vand_common import (
    NARROW,
    TOKEN_INDEX,
    UPSAMPLED_INDEX,
    LegacyImage,
    clip_cfg,
    cpu_only_patches,
    environment,
    make_images,
    narrow_clip_state_dict,
    patched,
    pkg_resources_stub,
    sha256,
    stub_module,
    torchscript_archive,
)

COMMIT = "45ed4dd35c05797d854294b5e8d585c545920089"
DATASET = "colon"  # a single-class name the official dataset.py knows
DESIGN = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9, "learnabel_text_embedding_length": 4}
FEATURES = [6, 12, 18, 24]
HASHED = ["test.py", "train.py", "prompt_ensemble.py", "loss.py", "utils.py", "dataset.py", "metrics.py",
          "AnomalyCLIP_lib/AnomalyCLIP.py", "AnomalyCLIP_lib/model_load.py", "AnomalyCLIP_lib/build_model.py",
          "AnomalyCLIP_lib/transform.py", "AnomalyCLIP_lib/constants.py", "AnomalyCLIP_lib/simple_tokenizer.py"]


def write_dataset(root: Path, images: np.ndarray, masks: np.ndarray) -> dict:
    """The two test images as PNGs plus the official ``meta.json`` (``meta['test'][cls]``)."""
    from PIL import Image

    entries, image_paths, mask_paths = [], [], []
    for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
        anomalous = bool(mask.any())
        kind = "defect" if anomalous else "good"
        img_rel = f"{DATASET}/test/{kind}/{index:03d}.png"
        (root / img_rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / img_rel)
        mask_rel = ""
        if anomalous:
            mask_rel = f"{DATASET}/ground_truth/{kind}/{index:03d}_mask.png"
            (root / mask_rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask, mode="L").save(root / mask_rel)
        entries.append({"img_path": img_rel, "mask_path": mask_rel, "cls_name": DATASET, "specie_name": kind,
                        "anomaly": int(anomalous)})
        image_paths.append(img_rel)
        mask_paths.append(mask_rel)
    (root / "meta.json").write_text(json.dumps({"train": {DATASET: []}, "test": {DATASET: entries}}))
    return {"image_paths": image_paths, "mask_paths": mask_paths}


def main() -> None:  # noqa: C901
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help=f"export of the official repository (commit {COMMIT[:7]})")
    parser.add_argument("--out", type=Path, required=True, help="set root: the files go to <out>/anomalyclip")
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    start = time.time()
    out = args.out.resolve() / "anomalyclip"
    out.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix="anomalyclip_parity_"))
    src = work / "src"
    shutil.copytree(args.src, src, ignore=shutil.ignore_patterns("__pycache__", "checkpoints", "assets"))
    file_hashes = {name: sha256(src / name) for name in HASHED}
    data_root = work / "data"

    # 1. CLIP, data
    t0 = time.time()
    clip_state = narrow_clip_state_dict(args.seed)
    torch.save(clip_state, out / "clip_state_dict.pt")
    archive = work / "ViT-L-14-336px.pt"
    torchscript_archive(clip_state, archive)
    timings["build_clip_state_dict"] = round(time.time() - t0, 2)
    images, masks = make_images(np.random.default_rng(args.seed + 2), 2, defect_index=1)
    paths = write_dataset(data_root, images, masks)

    # 2. run-time patches (README section 7)
    patches: list[str] = []
    pkg_resources_stub(patches, "provides only .packaging; the installed setuptools ships no pkg_resources")
    stub_module("thop", patches, "AnomalyCLIP.py:393 imports thop.profile, never used", profile=None)
    stub_module("tabulate", patches, "only formats the final log table of test.py",
                tabulate=lambda rows, **_: "\n".join(map(str, rows)))
    sys.path.insert(0, str(src))
    import AnomalyCLIP_lib
    import dataset as dataset_module
    import metrics as metrics_module
    import prompt_ensemble
    import scipy.ndimage
    from AnomalyCLIP_lib import model_load
    from AnomalyCLIP_lib.AnomalyCLIP import AnomalyCLIP
    from loss import BinaryDiceLoss, FocalLoss

    model_load._download = lambda _url, cache_dir=None: str(archive)  # noqa: ARG005
    patches.append("AnomalyCLIP_lib.model_load._download -> local TorchScript archive of the narrow random CLIP")
    dataset_module.Image = LegacyImage(dataset_module.Image)
    patches.append("dataset.Image -> proxy emulating legacy Pillow Image.fromarray(float64 zeros, mode='L') "
                   "(dataset.py:65)")
    cuda_patch = "train.py only: torch.Tensor.cuda -> identity on a CUDA-less host (train.py:84 label.long().cuda())"
    cpu_only = cpu_only_patches(patches)

    # 3. the prompt learner: official __init__ on the official model, then N(0, 0.02) from seed S + 1
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr), contextlib.ExitStack() as stack:
        for obj, name, make in cpu_only:
            stack.enter_context(patched(obj, name, make))
        model, _ = AnomalyCLIP_lib.load("ViT-L/14@336px", device="cpu", design_details=DESIGN)
        learner = prompt_ensemble.AnomalyCLIP_PromptLearner(model.to("cpu"), DESIGN)
    torch.manual_seed(args.seed + 1)
    with torch.no_grad():
        randomised = []
        for name, param in learner.named_parameters():
            torch.nn.init.normal_(param, std=0.02)
            randomised.append(name)
    learner_path = out / "prompt_learner.pt"
    torch.save({"prompt_learner": learner.state_dict()}, learner_path)
    # every loaded parameter is the fp16 value, exactly (README section 1)
    loaded = dict(model.state_dict())
    assert all(torch.equal(loaded[k], v.float()) for k, v in clip_state.items() if k in loaded), "fp32 load"
    del model, learner
    timings["build_prompt_learner"] = round(time.time() - t0, 2)

    # 4. observation wrappers (they return what they get)
    state: dict = {"phase": None}
    rec: dict = {}

    def bucket() -> dict:
        return rec.setdefault(state["phase"], {"items": [], "image": [], "text": [], "sim": [], "up": [], "gauss": [],
                                              "metrics": {}, "ce": [], "focal": [], "dice": [], "models": [],
                                              "learners": [], "steps": [], "backward": []})

    def wrap_load(orig):
        def load(*a, **k):
            result = orig(*a, **k)
            bucket()["models"].append(result[0])
            return result
        return load

    def wrap_learner_init(orig):
        def init(self, *a, **k):
            orig(self, *a, **k)  # same RNG use as the official run
            if state["phase"].startswith("train"):
                self.load_state_dict(torch.load(learner_path, weights_only=True)["prompt_learner"])
            bucket()["learners"].append(self)
        return init

    def wrap_getitem(orig):
        def getitem(self, index):
            item = orig(self, index)
            bucket()["items"].append((index, item["img"].clone(), item["img_mask"].clone(), int(item["anomaly"])))
            return item
        return getitem

    def wrap_encode_image(orig):
        def encode_image(self, image, *a, **k):
            pooled, tokens = orig(self, image, *a, **k)
            if state["phase"] is not None:
                bucket()["image"].append((pooled.detach().clone(), [t.detach().clone() for t in tokens]))
            return pooled, tokens
        return encode_image

    def wrap_encode_text_learn(orig):
        def encode_text_learn(self, *a, **k):
            result = orig(self, *a, **k)
            bucket()["text"].append(result.detach().clone())
            return result
        return encode_text_learn

    def wrap_similarity(orig):
        def compute_similarity(image_features, text_features, *a, **k):
            sim, prob_1 = orig(image_features, text_features, *a, **k)
            bucket()["sim"].append((sim.detach().clone(), prob_1.detach().clone(), text_features.detach().clone()))
            return sim, prob_1
        return compute_similarity

    def wrap_similarity_map(orig):
        def get_similarity_map(sm, shape):
            result = orig(sm, shape)
            bucket()["up"].append(result.detach()[:, UPSAMPLED_INDEX][:, :, UPSAMPLED_INDEX].clone())
            return result
        return get_similarity_map

    def wrap_gaussian(orig):
        def gaussian_filter(array, *a, **k):
            result = orig(array, *a, **k)
            bucket()["gauss"].append((np.array(array, copy=True), np.array(result, copy=True), dict(k)))
            return result
        return gaussian_filter

    def wrap_metric(orig):
        def metric(results, obj, name):
            value = orig(results, obj, name)
            bucket()["metrics"][name] = float(value)
            bucket()["results"] = results[obj]
            return value
        return metric

    def wrap_cross_entropy(orig):
        def cross_entropy(logits, target, *a, **k):
            value = orig(logits, target, *a, **k)
            bucket()["ce"].append((logits.detach().clone(), target.clone(), value.detach().clone()))
            return value
        return cross_entropy

    def wrap_loss(key):
        def make(orig):
            def forward(self, *a, **k):
                value = orig(self, *a, **k)
                bucket()[key].append(value.detach().clone())
                return value
            return forward
        return make

    def wrap_backward(orig):
        def backward(self, *a, **k):
            if state["phase"] and state["phase"].startswith("train"):
                bucket()["backward"].append(self.detach().clone())
            return orig(self, *a, **k)
        return backward

    def wrap_step(orig):
        def step(self, *a, **k):
            learner = bucket()["learners"][-1]
            names = {id(p): n for n, p in learner.named_parameters()}
            params = [p for group in self.param_groups for p in group["params"]]
            grads = {names[id(p)]: p.grad.detach().clone() for p in params if p.grad is not None}
            without = [names[id(p)] for p in params if p.grad is None]
            result = orig(self, *a, **k)
            after = {names[id(p)]: p.detach().clone() for p in params}
            bucket()["steps"].append((grads, without, after))
            return result
        return step

    def cuda_identity(orig):
        return lambda self, *a, **k: self if not torch.cuda.is_available() else orig(self, *a, **k)

    common = [
        *cpu_only,
        (AnomalyCLIP_lib, "load", wrap_load),
        (prompt_ensemble.AnomalyCLIP_PromptLearner, "__init__", wrap_learner_init),
        (dataset_module.Dataset, "__getitem__", wrap_getitem),
        (AnomalyCLIP, "encode_image", wrap_encode_image),
        (AnomalyCLIP, "encode_text_learn", wrap_encode_text_learn),
        (AnomalyCLIP_lib, "compute_similarity", wrap_similarity),
        (AnomalyCLIP_lib, "get_similarity_map", wrap_similarity_map),
        (scipy.ndimage, "gaussian_filter", wrap_gaussian),
        (metrics_module, "image_level_metrics", wrap_metric),
        (metrics_module, "pixel_level_metrics", wrap_metric),
        (F, "cross_entropy", wrap_cross_entropy),
        (FocalLoss, "forward", wrap_loss("focal")),
        (BinaryDiceLoss, "forward", wrap_loss("dice")),
        (torch.Tensor, "backward", wrap_backward),
        (torch.optim.Adam, "step", wrap_step),
    ]
    runs = {"test": ("test.py", []), "test24": ("test.py", ["--features_list", "24"]),
            "train": ("train.py", ["--epoch", "1", "--batch_size", "2"]),
            "train24": ("train.py", ["--epoch", "1", "--batch_size", "2", "--features_list", "24"])}
    log = (work / "official_stdout.txt").open("w")
    with contextlib.ExitStack() as stack:
        for obj, name, make in common:
            stack.enter_context(patched(obj, name, make))
        stack.enter_context(contextlib.redirect_stdout(log))
        for phase, (script, extra) in runs.items():
            t0 = time.time()
            state["phase"] = phase
            save = work / "save" / phase
            if script == "test.py":
                argv = ["--dataset", DATASET, "--data_path", str(data_root), "--save_path", str(save),
                        "--checkpoint_path", str(learner_path)]
            else:
                argv = ["--dataset", DATASET, "--train_data_path", str(data_root), "--save_path", str(save)]
            sys.argv = [script, *argv, *extra]
            with contextlib.ExitStack() as inner:
                if script == "train.py":
                    inner.enter_context(patched(torch.Tensor, "cuda", cuda_identity))
                runpy.run_path(str(src / script), run_name="__main__")
            bucket()["save"] = save
            name = {"test": "official_test_py", "test24": "official_test_py_features_list_24",
                    "train": "official_train_py_1_step", "train24": "official_train_py_1_step_features_list_24"}[phase]
            timings[name] = round(time.time() - t0, 2)
        state["phase"] = None
    log.close()
    patches.append(cuda_patch)

    # 5. the set
    test = rec["test"]
    n_images = len(test["items"])
    if n_images != 2 or len(test["image"]) != 2:
        raise SystemExit(f"expected 2 test images, got {n_images}")
    model = test["models"][0]
    tok, up = TOKEN_INDEX, UPSAMPLED_INDEX
    n_layers = len(FEATURES)
    with torch.no_grad():  # the same images as one batch of 2 (meta only)
        batch = torch.cat([item[1][None] for item in test["items"]])
        pooled2, tokens2 = model.encode_image(batch, FEATURES, DPAM_layer=20)
    pooled1 = torch.cat([p for p, _ in test["image"]])
    tokens1 = [torch.cat([t[layer] for _, t in test["image"]]) for layer in range(n_layers)]
    inputs = {
        "raw_images_uint8": torch.from_numpy(images), "raw_masks_uint8": torch.from_numpy(masks),
        "labels": torch.tensor([item[3] for item in test["items"]]),
        "images": torch.stack([item[1] for item in test["items"]]),
        "gt_masks": torch.stack([(item[2] > 0.5).to(torch.uint8) for item in test["items"]]),
        "meta": {"defect_box_raw": (96, 160, 64, 144), "data_seed": args.seed + 2, "raw_size": 256,
                 "dataset_name": DATASET, **paths},
    }

    def sim_per_layer(b: dict, index: int) -> torch.Tensor:  # [L, B, ...]: calls are image-major
        layers = len(b["sim"]) // n_images
        return torch.stack([torch.cat([b["sim"][i * layers + layer][index] for i in range(n_images)])
                            for layer in range(layers)])

    def up_per_layer(b: dict) -> torch.Tensor:
        layers = len(b["up"]) // n_images
        return torch.stack([torch.cat([b["up"][i * layers + layer] for i in range(n_images)]) for layer in range(layers)])

    def scores(b: dict) -> torch.Tensor:
        return torch.stack([torch.as_tensor(s) for s in b["results"]["pr_sp"]])

    gauss = test["gauss"]
    test24 = rec["test24"]
    outputs = {
        "text_features_unnormalized": test["text"][0],
        "text_features": test["sim"][0][2][None],
        "image_features_unnormalized": pooled1,
        "image_scores": scores(test),
        "patch_token_index": tok,
        "patch_features_unnormalized_sub": torch.stack([t[:, tok] for t in tokens1]),
        "similarity": sim_per_layer(test, 0),
        "similarity_cls_prob_1": sim_per_layer(test, 1),
        "upsampled_sub_index": up,
        "similarity_map_upsampled_sub": up_per_layer(test),
        "anomaly_map": torch.stack([torch.from_numpy(g[0]) for g in gauss]),
        "anomaly_map_gaussian": torch.stack([torch.from_numpy(g[1]) for g in gauss]),
        "visual_positional_embedding_interpolated_sub": model.visual.positional_embedding.detach()[tok].clone(),
        "metrics": dict(test["metrics"]),
        "variant_features_list_24": {
            "image_scores": scores(test24),
            "anomaly_map_sub": torch.stack([torch.from_numpy(g[0]) for g in test24["gauss"]])[:, up][:, :, up],
            "anomaly_map_gaussian_sub": torch.stack([torch.from_numpy(g[1]) for g in test24["gauss"]])[:, up][:, :, up],
            "metrics": dict(test24["metrics"]),
        },
        "meta": {
            "official_commit": COMMIT, "official_file_sha256": file_hashes,
            "test_argv": f"test.py --dataset {DATASET} (+ data/save/checkpoint paths); every other option = "
                         "argparse default",
            "features_list": FEATURES, "feature_map_layer": [0, 1, 2, 3], "image_size": 518, "sigma": 4,
            "depth": 9, "n_ctx": 12, "t_n_ctx": 4, "DPAM_layer": 20, "seed": 111, "temperature": 0.07,
            "gaussian_filter_kwargs": gauss[0][2],
            "vision_block_attention_types": [type(b.attn).__name__ for b in model.visual.transformer.resblocks],
            "batch2_vs_batch1_maxabsdiff": {
                "image_features": (pooled2 - pooled1).abs().max().item(),
                "patch_features": max((a - b).abs().max().item() for a, b in zip(tokens2, tokens1, strict=True))},
            "clip_cfg": clip_cfg(args.seed), "prompt_seed": args.seed + 1, "prompt_std": 0.02,
            "randomised_prompt_parameters": randomised, "upsampled_stride": 9, "token_stride": 8,
            "env": environment(), "patches": patches[:-1], "generator": "tools/parity/make_anomalyclip_set.py",
            "model_config": NARROW,
        },
    }

    def train_record(phase: str, features: list[int], step: int = 0, steps: int = 1) -> dict:
        """Step ``step`` of the official run ``phase`` (of ``steps``, one batch each)."""
        b = rec[phase]
        if len(b["steps"]) != steps or len(b["ce"]) != steps:
            raise SystemExit(f"{phase}: expected {steps} training steps, got {len(b['steps'])}")
        logits, target, image_loss = b["ce"][step]
        n = len(features)
        focal_terms, dice_terms = b["focal"][step * n:(step + 1) * n], b["dice"][2 * step * n:2 * (step + 1) * n]
        loss = 0  # train.py:97-102, in this order
        for i in range(n):
            loss += focal_terms[i]
            loss += dice_terms[2 * i]
            loss += dice_terms[2 * i + 1]
        loss = 4 * loss
        total = loss + image_loss
        if not torch.equal(total, b["backward"][step]):
            raise SystemExit(f"{phase}: replayed total {total} != official {b['backward'][step]}")
        grads, without, after = b["steps"][step]
        if steps == 1:  # what train.py saved after its one step (equal to ``after``)
            saved = torch.load(b["save"] / "epoch_1.pth", weights_only=True)["prompt_learner"]
            after = {name: saved[name].clone() for name in after}
        batch = len(b["items"]) // steps
        items = b["items"][step * batch:(step + 1) * batch]
        return {"batch_order": torch.tensor([item[0] for item in items]), "image_logits": logits,
                "image_target": target, "image_loss": image_loss, "focal": torch.stack(focal_terms),
                "dice_anomalous": torch.stack(dice_terms[0::2]), "dice_normal": torch.stack(dice_terms[1::2]),
                "lam": 4.0, "loss": loss, "total": total, "grads": grads,
                "params_after_step": {name: after[name] for name in grads}, "params_without_grad": without,
                "labels": torch.tensor([item[3] for item in items])}

    train_step = train_record("train", FEATURES)
    train_step["variant_features_list_24"] = train_record("train24", [24])
    train_step["meta"] = {
        "train_argv": f"train.py --dataset {DATASET} --epoch 1 --batch_size 2 (+ data/save paths); every other "
                      "option = argparse default",
        "optimizer": "torch.optim.Adam(prompt_learner.parameters(), lr=1e-3, betas=(0.5, 0.999))", "seed": 111,
        "features_list": FEATURES, "image_size": 518, "lam": 4,
        "batch_order_note": "DataLoader(shuffle=True) after setup_seed(111): the batch is inputs.images[batch_order], "
                            "labels[batch_order], gt_masks[batch_order]",
        "patches": patches, "official_commit": COMMIT,
    }
    torch.save(inputs, out / "inputs.pt")
    torch.save(outputs, out / "outputs.pt")
    torch.save(train_step, out / "train_step.pt")
    timings["total"] = round(time.time() - start, 2)
    info = {"timings_s": timings, "seed": args.seed, "generator": "tools/parity/make_anomalyclip_set.py",
            "patches": patches, "src": "export of the official repository at the commit above",
            "official_commit": COMMIT, "official_file_sha256": file_hashes, "env": environment()}
    (out / "run_info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out} in {timings['total']} s")


if __name__ == "__main__":
    main()
