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

import contextlib
import sys
import time

import numpy as np
import official_run as orun
import torch
from narrow_clip import clip_cfg, narrow_config, write_narrow_clip

COMMIT = "b58563ab29a4f0b4a69ef8091611358f9f8a86ed"
DATASET, CLS_NAME = "colondb", "colon"  # dataset.py maps 'colondb' to the class list ['colon']
FEATURES = [6, 12, 18, 24]
NARROW = narrow_config(32, 64, 64)  # the AnomalyCLIP set's CLIP: width 64 = one head, embed 32
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
    args = orun.generator_parser(__doc__, "glocalclip", COMMIT).parse_args()
    out, timings, start = orun.start_set(args, "glocalclip")

    work, src = orun.work_dir("glocalclip", args.src, ("__pycache__", "asset", "generate_dataset_json"))
    file_hashes = {name: orun.sha256(src / name) for name in HASHED}
    data_root = work / "data"

    # 1. CLIP, data
    with orun.timed(timings, "build_clip_state_dict"):
        clip_state, archive = write_narrow_clip(args.seed, NARROW, out, work)
    images, masks = orun.make_images(args.seed + 2, 2)
    paths = orun.write_single_class_test_set(data_root, images, masks, CLS_NAME)

    # 2. run-time patches (README section 8)
    patches: list[str] = []
    orun.pkg_resources_stub(patches, "provides only .packaging; the installed setuptools ships no pkg_resources")
    orun.stub_module("thop", patches, "GlocalCLIP_lib/GlocalCLIP.py:392 imports thop.profile, never used", profile=None)
    orun.stub_module("seaborn", patches,
                     "visualization.py:9 imports it; the visualizer() that test.py calls never uses it")
    sys.path.insert(0, str(src))
    import dataset as dataset_module
    import glocal_prompt_generator
    import GlocalCLIP_lib
    import metrics as metrics_module
    from GlocalCLIP_lib import model_load
    from GlocalCLIP_lib.GlocalCLIP import GlocalCLIP, Transformer
    from loss import BinaryDiceLoss, FocalLoss

    model_load._download = lambda _url, cache_dir=None: str(archive)  # noqa: ARG005
    patches.append("GlocalCLIP_lib.model_load._download -> local TorchScript archive of the narrow random CLIP")
    dataset_module.Image = orun.LegacyImage(dataset_module.Image)
    patches.append("dataset.Image -> proxy emulating legacy Pillow Image.fromarray(float64 zeros, mode='L') "
                   "(dataset.py:86)")
    cpu_only = orun.cpu_only_patches(patches)

    # 3. the prompt learners: official __init__ on the official model, then N(0, 0.02) from seed S + 1 / S + 3
    t0 = time.time()
    learner_paths = {"default": out / "prompt_learner.pt", "variant": out / "prompt_learner_variant.pt"}
    randomised: dict[str, list[str]] = {}
    for run, opts, seed in (("default", DEFAULT, args.seed + 1), ("variant", VARIANT, args.seed + 3)):
        with contextlib.redirect_stdout(sys.stderr), contextlib.ExitStack() as stack:
            orun.patch_all(stack, cpu_only)
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

    def wrap_learner_init(orig):
        def init(self, *a, **k):
            orig(self, *a, **k)  # same RNG use as the official run
            if state["phase"].startswith("train"):
                run = "variant" if state["phase"] == "train_variant" else "default"
                self.load_state_dict(torch.load(learner_paths[run], weights_only=True)["prompt_learner"])
            bucket()["learners"].append(self)
        return init

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

    observe = orun.bucket_observers(bucket, state)

    def wrap_triplet(orig):
        def forward(self, anchor, positive, negative):
            value = orig(self, anchor, positive, negative)
            with torch.no_grad():  # the distances the official forward computes (diagnostic)
                pos = torch.pairwise_distance(anchor, positive, keepdim=True)
                neg = torch.pairwise_distance(anchor, negative, keepdim=True)
            bucket()["triplet"].append((value.detach().clone(), pos.reshape(-1), neg.reshape(-1), self.margin))
            return value
        return forward

    common = [
        *cpu_only,
        (GlocalCLIP_lib, "load", observe["load"]),
        (glocal_prompt_generator.GlocalCLIP_PromptLearner, "__init__", wrap_learner_init),
        (dataset_module.Dataset, "__getitem__", observe["getitem"]),
        (GlocalCLIP, "encode_image", observe["encode_image"]),
        (GlocalCLIP, "encode_text_learn", wrap_encode_text_learn),
        (Transformer, "forward", wrap_transformer_forward),
        (GlocalCLIP_lib, "compute_similarity", wrap_similarity),
        (GlocalCLIP_lib, "get_similarity_map", observe["similarity_map"]),
        (glocal_prompt_generator.TripletLoss, "forward", wrap_triplet),
        *orun.lineage_loss_patches(observe, metrics_module, FocalLoss, BinaryDiceLoss),
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
    with orun.observed(common, work / "official_stdout.txt"):
        for phase, (script, extra, prompts, timing) in runs.items():
            t0 = time.time()
            state["phase"] = phase
            save = work / "save" / phase
            argv = orun.lineage_argv(script, DATASET, data_root, save, learner_paths[prompts])
            orun.run_main(src / script, [*argv, *extra])
            bucket()["save"] = save
            timings[timing] = round(time.time() - t0, 2)
        state["phase"] = None

    # 5. the set
    test = rec["test"]
    n_images = len(test["items"])
    if n_images != 2 or len(test["image"]) != 2:
        raise SystemExit(f"expected 2 test images, got {n_images}")
    model = test["models"][0]
    tok, up = orun.TOKEN_INDEX, orun.UPSAMPLED_INDEX
    n_layers = len(FEATURES)
    inputs, single = orun.lineage_test_images(test, model, FEATURES, images, masks, {
        "defect_box_raw": (96, 160, 64, 144), "data_seed": args.seed + 2, "raw_size": 256,
        "dataset_name": DATASET, "cls_name": CLS_NAME, **paths})
    pooled1, tokens1 = single["pooled1"], single["tokens1"]

    def text_record(b: dict) -> dict:
        """test.py:72-81: the prompts, the text features and their normalised [1, 4, E] stack (replayed)."""
        result, prompts, tokenized = b["text"][0]
        text = torch.stack(torch.chunk(result.float(), dim=0, chunks=4), dim=1)
        text = text / text.norm(dim=-1, keepdim=True)
        if not torch.equal(text[0, 2:], b["sim"][0][1]):
            raise SystemExit("replayed local text features differ from those compute_similarity got")
        return {"tokenized_prompts": tokenized, "prompt_embeddings": prompts, "text_features_unnormalized": result,
                "text_features": text}

    def gauss_maps(b: dict, index: int) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.asarray(g[index])) for g in b["gauss"]])

    gauss, variant = test["gauss"], rec["test_variant"]
    identical = all(torch.equal(t[layer], t[0]) for _, t in test["image"] for layer in range(n_layers))
    outputs = {
        **text_record(test),
        "image_features_unnormalized": pooled1,
        "image_scores": orun.image_scores(test),
        "patch_token_index": tok,
        "patch_features_unnormalized_sub": torch.stack([t[:, tok] for t in tokens1]),
        "similarity": orun.per_layer(test["sim"], n_images, 0),
        "upsampled_sub_index": up,
        "similarity_map_upsampled_sub": orun.per_layer(test["up"], n_images),
        "anomaly_map_sub": gauss_maps(test, 0)[:, up][:, :, up],
        "anomaly_map_gaussian": gauss_maps(test, 1),
        "visual_positional_embedding_interpolated_sub": model.visual.positional_embedding.detach()[tok].clone(),
        "metrics": dict(test["metrics"]),
        "variant": {
            "options": {**VARIANT, "sigma": VARIANT_SIGMA},
            **text_record(variant),
            "image_scores": orun.image_scores(variant),
            "similarity": orun.per_layer(variant["sim"], n_images, 0),
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
            "batch2_vs_batch1_maxabsdiff": single["batch_vs_single"],
            "clip_cfg": clip_cfg(NARROW, args.seed), "prompt_seed": args.seed + 1, "variant_prompt_seed": args.seed + 3,
            "prompt_std": 0.02, "randomised_prompt_parameters": randomised["default"],
            "randomised_prompt_parameters_variant": randomised["variant"], "upsampled_stride": 9, "token_stride": 8,
            "env": orun.environment(("sklearn", "skimage", "cv2")), "patches": patches,
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
    timings["total"] = round(time.time() - start, 2)
    info = {"timings_s": timings, "seed": args.seed, "generator": "tools/parity/make_glocalclip_set.py",
            "patches": patches, "src": "export of the official repository at the commit above",
            "official_commit": COMMIT, "official_file_sha256": file_hashes,
            "env": orun.environment(("sklearn", "skimage", "cv2"))}
    orun.write_set(out, {"inputs.pt": inputs, "outputs.pt": outputs, "train_step.pt": train_step}, info, indent=2)
    orun.finish(out, work, timings["total"])


if __name__ == "__main__":
    main()
