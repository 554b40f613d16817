r"""Make a GlocalCLIP parity set with the official code (YUL-git/GlocalCLIP, commit b58563a), any seed.

The set has the format of ``../shared/parity/glocalclip`` (see its README.md): the official ``test.py``
(argparse defaults, then the ``train.sh`` "train on MVTec" options ``--n_ctx 12 --ab_ctx 13 --depth 10
--t_n_ctx 2 --sigma 8``) and ``train.py`` (one step, ``--epoch 1 --batch_size 2``: defaults, the variant
options with ``--alpha 0.1``, and ``--margin 2.0``) run unmodified, as ``__main__``, importing the official
code from ``--src`` (an export of the official repository; nothing of it is copied here). The run-time
patches are those the shared set's ``run_info.json`` lists; intermediate tensors are caught by wrappers
that only observe.

    git --git-dir /work/.mirror/YUL-git+GlocalCLIP/repo archive b58563ab29a4f0b4a69ef8091611358f9f8a86ed \\
        | tar x -C /tmp/gc_off
    python tools/parity/make_glocalclip_set.py --src /tmp/gc_off --out /tmp/gc_parity_seeds/seed7 --seed 7

``--seed S`` draws the narrow CLIP from ``torch.manual_seed(S)``, the default prompt learner from ``S + 1``,
the images from ``numpy.random.default_rng(S + 2)`` and the variant prompt learner from ``S + 3``;
``--seed 100`` remakes the shared set (its README names seeds 100, 101, 102, 103). The set goes to
``<out>/glocalclip``.
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
    write_single_class_test_set,
)

COMMIT = "b58563ab29a4f0b4a69ef8091611358f9f8a86ed"
DATASET, CLS_NAME = "colondb", "colon"  # dataset.py maps 'colondb' to the class list ['colon']
FEATURES = [6, 12, 18, 24]
DEFAULT = {"n_ctx": 12, "ab_ctx": 12, "depth": 9, "t_n_ctx": 4}
VARIANT = {"n_ctx": 12, "ab_ctx": 13, "depth": 10, "t_n_ctx": 2}  # train.sh, "train on MVTec"
VARIANT_SIGMA, VARIANT_ALPHA, MARGIN = 8, 0.1, 2.0
HASHED = ["test.py", "train.py", "train.sh", "glocal_prompt_generator.py", "loss.py", "utils.py", "dataset.py",
          "metrics.py", "visualization.py", "logger.py", "GlocalCLIP_lib/__init__.py", "GlocalCLIP_lib/GlocalCLIP.py",
          "GlocalCLIP_lib/model_load.py", "GlocalCLIP_lib/build_model.py", "GlocalCLIP_lib/transform.py",
          "GlocalCLIP_lib/constants.py", "GlocalCLIP_lib/simple_tokenizer.py", "GlocalCLIP_lib/CLIP.py"]


def design(opts: dict) -> dict:
    """test.py:58 / train.py:33."""
    return {"Normal_Prompt_Length": opts["n_ctx"], "Anomaly_Prompt_Length": opts["ab_ctx"],
            "Deep_Text_Prompt_Depth": opts["depth"], "Deep_Text_Prompt_Length": opts["t_n_ctx"]}


def option_argv(opts: dict) -> list[str]:
    return [item for key, value in opts.items() for item in (f"--{key}", str(value))]


def main() -> None:  # noqa: C901
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help=f"export of the official repository (commit {COMMIT[:7]})")
    parser.add_argument("--out", type=Path, required=True, help="set root: the files go to <out>/glocalclip")
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    start = time.time()
    out = args.out.resolve() / "glocalclip"
    out.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix="glocalclip_parity_"))
    src = work / "src"
    shutil.copytree(args.src, src, ignore=shutil.ignore_patterns("__pycache__", "asset", "generate_dataset_json"))
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
    paths = write_single_class_test_set(data_root, images, masks, CLS_NAME)

    # 2. run-time patches (README section 8)
    patches: list[str] = []
    pkg_resources_stub(patches, "provides only .packaging; the installed setuptools ships no pkg_resources")
    stub_module("thop", patches, "GlocalCLIP_lib/GlocalCLIP.py:392 imports thop.profile, never used", profile=None)
    stub_module("seaborn", patches, "visualization.py:9 imports it; the visualizer() that test.py calls never uses it")
    sys.path.insert(0, str(src))
    import dataset as dataset_module
    import glocal_prompt_generator
    import GlocalCLIP_lib
    import metrics as metrics_module
    import scipy.ndimage
    from GlocalCLIP_lib import model_load
    from GlocalCLIP_lib.GlocalCLIP import GlocalCLIP, Transformer
    from loss import BinaryDiceLoss, FocalLoss

    model_load._download = lambda _url, cache_dir=None: str(archive)  # noqa: ARG005
    patches.append("GlocalCLIP_lib.model_load._download -> local TorchScript archive of the narrow random CLIP")
    dataset_module.Image = LegacyImage(dataset_module.Image)
    patches.append("dataset.Image -> proxy emulating legacy Pillow Image.fromarray(float64 zeros, mode='L') "
                   "(dataset.py:86)")
    cpu_only = cpu_only_patches(patches)

    # 3. the prompt learners: official __init__ on the official model, then N(0, 0.02) from seed S + 1 / S + 3
    t0 = time.time()
    learner_paths = {"default": out / "prompt_learner.pt", "variant": out / "prompt_learner_variant.pt"}
    randomised: dict[str, list[str]] = {}
    for run, opts, seed in (("default", DEFAULT, args.seed + 1), ("variant", VARIANT, args.seed + 3)):
        with contextlib.redirect_stdout(sys.stderr), contextlib.ExitStack() as stack:
            for obj, name, make in cpu_only:
                stack.enter_context(patched(obj, name, make))
            model, _ = GlocalCLIP_lib.load("ViT-L/14@336px", device="cpu", design_details=design(opts))
            learner = glocal_prompt_generator.GlocalCLIP_PromptLearner(model.to("cpu"), design(opts))
        torch.manual_seed(seed)
        with torch.no_grad():
            randomised[run] = []
            for name, param in learner.named_parameters():
                torch.nn.init.normal_(param, std=0.02)
                randomised[run].append(name)
        torch.save({"prompt_learner": learner.state_dict()}, learner_paths[run])
        # every loaded parameter is the fp16 value, exactly (README section 1)
        loaded = dict(model.state_dict())
        assert all(torch.equal(loaded[k], v.float()) for k, v in clip_state.items() if k in loaded), "fp32 load"
        del model, learner
    timings["build_prompt_learners"] = round(time.time() - t0, 2)

    # 4. observation wrappers (they return what they get)
    state: dict = {"phase": None}
    rec: dict = {}

    def bucket() -> dict:
        return rec.setdefault(state["phase"], {"items": [], "image": [], "text": [], "sim": [], "up": [], "gauss": [],
                                              "metrics": {}, "ce": [], "focal": [], "dice": [], "triplet": [],
                                              "models": [], "learners": [], "steps": [], "backward": [],
                                              "aliased": []})

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
                run = "variant" if state["phase"] == "train_variant" else "default"
                self.load_state_dict(torch.load(learner_paths[run], weights_only=True)["prompt_learner"])
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

    def wrap_transformer_forward(orig):
        def forward(self, *a, **k):
            result = orig(self, *a, **k)
            if not self.text_layer and k.get("DPAM_layer") is not None and state["phase"] is not None:
                tokens = result[1]
                bucket()["aliased"].append(all(t is tokens[0] for t in tokens))
            return result
        return forward

    def wrap_encode_text_learn(orig):
        def encode_text_learn(self, prompts, tokenized, *a, **k):
            result = orig(self, prompts, tokenized, *a, **k)
            bucket()["text"].append((result.detach().clone(), prompts.detach().clone(), tokenized.clone()))
            return result
        return encode_text_learn

    def wrap_similarity(orig):
        def compute_similarity(image_features, text_features, *a, **k):
            sim, raw = orig(image_features, text_features, *a, **k)
            bucket()["sim"].append((sim.detach().clone(), text_features.detach().clone()))
            return sim, raw
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

    def wrap_triplet(orig):
        def forward(self, anchor, positive, negative):
            value = orig(self, anchor, positive, negative)
            with torch.no_grad():  # the distances the official forward computes (diagnostic)
                pos = torch.pairwise_distance(anchor, positive, keepdim=True)
                neg = torch.pairwise_distance(anchor, negative, keepdim=True)
            bucket()["triplet"].append((value.detach().clone(), pos.reshape(-1), neg.reshape(-1), self.margin))
            return value
        return forward

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

    common = [
        *cpu_only,
        (GlocalCLIP_lib, "load", wrap_load),
        (glocal_prompt_generator.GlocalCLIP_PromptLearner, "__init__", wrap_learner_init),
        (dataset_module.Dataset, "__getitem__", wrap_getitem),
        (GlocalCLIP, "encode_image", wrap_encode_image),
        (GlocalCLIP, "encode_text_learn", wrap_encode_text_learn),
        (Transformer, "forward", wrap_transformer_forward),
        (GlocalCLIP_lib, "compute_similarity", wrap_similarity),
        (GlocalCLIP_lib, "get_similarity_map", wrap_similarity_map),
        (scipy.ndimage, "gaussian_filter", wrap_gaussian),
        (metrics_module, "image_level_metrics", wrap_metric),
        (metrics_module, "pixel_level_metrics", wrap_metric),
        (F, "cross_entropy", wrap_cross_entropy),
        (FocalLoss, "forward", wrap_loss("focal")),
        (BinaryDiceLoss, "forward", wrap_loss("dice")),
        (glocal_prompt_generator.TripletLoss, "forward", wrap_triplet),
        (torch.Tensor, "backward", wrap_backward),
        (torch.optim.Adam, "step", wrap_step),
    ]
    train_base = ["--epoch", "1", "--batch_size", "2"]
    runs = {"test": ("test.py", [], "default", "official_test_py"),
            "test_variant": ("test.py", [*option_argv(VARIANT), "--sigma", str(VARIANT_SIGMA)], "variant",
                             "official_test_py_variant"),
            "train": ("train.py", train_base, "default", "official_train_py_1_step"),
            "train_variant": ("train.py", [*train_base, *option_argv(VARIANT), "--alpha", str(VARIANT_ALPHA)],
                              "variant", "official_train_py_1_step_variant"),
            "train_margin": ("train.py", [*train_base, "--margin", str(MARGIN)], "default",
                             "official_train_py_1_step_margin")}
    log = (work / "official_stdout.txt").open("w")
    with contextlib.ExitStack() as stack:
        for obj, name, make in common:
            stack.enter_context(patched(obj, name, make))
        stack.enter_context(contextlib.redirect_stdout(log))
        for phase, (script, extra, prompts, timing) in runs.items():
            t0 = time.time()
            state["phase"] = phase
            save = work / "save" / phase
            if script == "test.py":
                argv = ["--dataset", DATASET, "--data_path", str(data_root), "--save_path", str(save),
                        "--checkpoint_path", str(learner_paths[prompts])]
            else:
                argv = ["--dataset", DATASET, "--train_data_path", str(data_root), "--save_path", str(save)]
            sys.argv = [script, *argv, *extra]
            runpy.run_path(str(src / script), run_name="__main__")
            bucket()["save"] = save
            timings[timing] = round(time.time() - t0, 2)
        state["phase"] = None
    log.close()

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
                 "dataset_name": DATASET, "cls_name": CLS_NAME, **paths},
    }

    def text_record(b: dict) -> dict:
        """test.py:72-81: the prompts, the text features and their normalised [1, 4, E] stack (replayed)."""
        result, prompts, tokenized = b["text"][0]
        text = torch.stack(torch.chunk(result.float(), dim=0, chunks=4), dim=1)
        text = text / text.norm(dim=-1, keepdim=True)
        if not torch.equal(text[0, 2:], b["sim"][0][1]):
            raise SystemExit("replayed local text features differ from those compute_similarity got")
        return {"tokenized_prompts": tokenized, "prompt_embeddings": prompts, "text_features_unnormalized": result,
                "text_features": text}

    def sim_per_layer(b: dict) -> torch.Tensor:  # [L, B, ...]: calls are image-major
        layers = len(b["sim"]) // n_images
        return torch.stack([torch.cat([b["sim"][i * layers + layer][0] for i in range(n_images)])
                            for layer in range(layers)])

    def up_per_layer(b: dict) -> torch.Tensor:
        layers = len(b["up"]) // n_images
        return torch.stack([torch.cat([b["up"][i * layers + layer] for i in range(n_images)]) for layer in range(layers)])

    def scores(b: dict) -> torch.Tensor:
        return torch.stack([torch.as_tensor(s) for s in b["results"]["pr_sp"]])

    def gauss_maps(b: dict, index: int) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.asarray(g[index])) for g in b["gauss"]])

    gauss, variant = test["gauss"], rec["test_variant"]
    identical = all(torch.equal(t[layer], t[0]) for _, t in test["image"] for layer in range(n_layers))
    outputs = {
        **text_record(test),
        "image_features_unnormalized": pooled1,
        "image_scores": scores(test),
        "patch_token_index": tok,
        "patch_features_unnormalized_sub": torch.stack([t[:, tok] for t in tokens1]),
        "similarity": sim_per_layer(test),
        "upsampled_sub_index": up,
        "similarity_map_upsampled_sub": up_per_layer(test),
        "anomaly_map_sub": gauss_maps(test, 0)[:, up][:, :, up],
        "anomaly_map_gaussian": gauss_maps(test, 1),
        "visual_positional_embedding_interpolated_sub": model.visual.positional_embedding.detach()[tok].clone(),
        "metrics": dict(test["metrics"]),
        "variant": {
            "options": {**VARIANT, "sigma": VARIANT_SIGMA},
            **text_record(variant),
            "image_scores": scores(variant),
            "similarity": sim_per_layer(variant),
            "anomaly_map_sub": gauss_maps(variant, 0)[:, up][:, :, up],
            "anomaly_map_gaussian_sub": gauss_maps(variant, 1)[:, up][:, :, up],
            "metrics": dict(variant["metrics"]),
        },
        "meta": {
            "official_commit": COMMIT, "official_file_sha256": file_hashes,
            "test_argv": f"test.py --dataset {DATASET} (+ data/save/checkpoint paths); every other option = "
                         "argparse default",
            "variant_test_argv": f"test.py --dataset {DATASET} {' '.join(option_argv(VARIANT))} --sigma "
                                 f"{VARIANT_SIGMA} (+ paths; checkpoint prompt_learner_variant.pt)",
            "features_list": FEATURES, "feature_map_layer": [0, 1, 2, 3], "image_size": 518, "sigma": 4,
            "options": dict(DEFAULT), "dpam": 20, "DPAM_layer": 20, "seed": 111, "temperature": 0.07,
            "metrics_mode": "image-pixel-level", "gaussian_filter_kwargs": gauss[0][2],
            "vision_block_attention_types": [type(b.attn).__name__ for b in model.visual.transformer.resblocks],
            "patch_feature_layers_identical": identical,
            "collected_vv_tokens_are_one_tensor": bool(test["aliased"]) and all(test["aliased"]),
            "batch2_vs_batch1_maxabsdiff": {
                "image_features": (pooled2 - pooled1).abs().max().item(),
                "patch_features": max((a - b).abs().max().item() for a, b in zip(tokens2, tokens1, strict=True))},
            "clip_cfg": clip_cfg(args.seed), "prompt_seed": args.seed + 1, "variant_prompt_seed": args.seed + 3,
            "prompt_std": 0.02, "randomised_prompt_parameters": randomised["default"],
            "randomised_prompt_parameters_variant": randomised["variant"], "upsampled_stride": 9, "token_stride": 8,
            "env": environment(("sklearn", "skimage", "cv2")), "patches": patches,
        },
    }

    def train_record(phase: str, alpha: float) -> dict:
        """The one step of the official run ``phase``; the seg sum and the total are replayed and checked."""
        b = rec[phase]
        if len(b["steps"]) != 1 or len(b["ce"]) != 1:
            raise SystemExit(f"{phase}: expected 1 training step, got {len(b['steps'])}")
        logits, target, image_loss = b["ce"][0]
        focal_terms, dice_terms = b["focal"], b["dice"]
        loss = 0  # train.py:105-109, in this order, no lam
        for i in range(len(focal_terms)):
            loss += focal_terms[i]
            loss += dice_terms[2 * i]
            loss += dice_terms[2 * i + 1]
        (normal, pos_n, neg_n, margin), (anomalous, pos_a, neg_a, _) = b["triplet"]
        contrastive = normal + anomalous
        total = loss + image_loss + alpha * contrastive
        if not torch.equal(total, b["backward"][0]):
            raise SystemExit(f"{phase}: replayed total {total} != official {b['backward'][0]}")
        grads, without, _ = b["steps"][0]
        saved = torch.load(b["save"] / "epoch_1.pth", weights_only=True)["prompt_learner"]
        items = b["items"]
        return {"batch_order": torch.tensor([item[0] for item in items]), "image_logits": logits,
                "image_target": target, "image_loss": image_loss, "focal": torch.stack(focal_terms),
                "dice_anomalous": torch.stack(dice_terms[0::2]), "dice_normal": torch.stack(dice_terms[1::2]),
                "loss": loss, "triplet_normal": normal, "triplet_anomalous": anomalous,
                "triplet_pos_dist": torch.cat([pos_n, pos_a]), "triplet_neg_dist": torch.cat([neg_n, neg_a]),
                "contrastive": contrastive, "alpha": alpha, "margin": float(margin), "total": total, "grads": grads,
                "params_without_grad": without, "params_after_step": {name: saved[name].clone() for name in grads},
                "labels": torch.tensor([item[3] for item in items])}

    train_step = train_record("train", 1.0)
    variant_step = train_record("train_variant", VARIANT_ALPHA)
    del variant_step["params_without_grad"]
    variant_step["options"] = {**VARIANT, "alpha": VARIANT_ALPHA}
    train_step["variant"] = variant_step
    margin_step = train_record("train_margin", 1.0)
    train_step["variant_margin"] = {key: margin_step[key] for key in (
        "triplet_normal", "triplet_anomalous", "contrastive", "margin", "total", "grads", "params_after_step")}
    train_step["meta"] = {
        "train_argv": f"train.py --dataset {DATASET} {' '.join(train_base)} (+ data/save paths); every other "
                      "option = argparse default",
        "variant_train_argv": f"train.py --dataset {DATASET} {' '.join(train_base)} {' '.join(option_argv(VARIANT))} "
                              f"--alpha {VARIANT_ALPHA} (starts from prompt_learner_variant.pt)",
        "margin_train_argv": f"train.py --dataset {DATASET} {' '.join(train_base)} --margin {MARGIN} "
                             "(starts from prompt_learner.pt)",
        "optimizer": "torch.optim.Adam(prompt_learner.parameters(), lr=1e-3, betas=(0.5, 0.999))", "seed": 111,
        "features_list": FEATURES, "image_size": 518, "alpha": 1.0, "margin": 0.0,
        "batch_order_note": "DataLoader(shuffle=True) after setup_seed(111): the batch is inputs.images[batch_order], "
                            "labels[batch_order], gt_masks[batch_order]",
        "patches": patches, "official_commit": COMMIT,
    }
    torch.save(inputs, out / "inputs.pt")
    torch.save(outputs, out / "outputs.pt")
    torch.save(train_step, out / "train_step.pt")
    timings["total"] = round(time.time() - start, 2)
    info = {"timings_s": timings, "seed": args.seed, "generator": "tools/parity/make_glocalclip_set.py",
            "patches": patches, "src": "export of the official repository at the commit above",
            "official_commit": COMMIT, "official_file_sha256": file_hashes,
            "env": environment(("sklearn", "skimage", "cv2"))}
    (out / "run_info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out} in {timings['total']} s")


if __name__ == "__main__":
    main()
