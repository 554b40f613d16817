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

import contextlib
import sys
import time

import official_run as orun
import torch
from narrow_clip import clip_cfg, narrow_config, write_narrow_clip

COMMIT = "45ed4dd35c05797d854294b5e8d585c545920089"
DATASET = "colon"  # a single-class name the official dataset.py knows
DESIGN = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9, "learnabel_text_embedding_length": 4}
FEATURES = [6, 12, 18, 24]
NARROW = narrow_config(32, 64, 64)  # width 64 = one head, embed 32 (README section 1)
HASHED = ["test.py", "train.py", "prompt_ensemble.py", "loss.py", "utils.py", "dataset.py", "metrics.py",
          "AnomalyCLIP_lib/AnomalyCLIP.py", "AnomalyCLIP_lib/model_load.py", "AnomalyCLIP_lib/build_model.py",
          "AnomalyCLIP_lib/transform.py", "AnomalyCLIP_lib/constants.py", "AnomalyCLIP_lib/simple_tokenizer.py"]


def main() -> None:  # noqa: C901
    args = orun.generator_parser(__doc__, "anomalyclip", COMMIT).parse_args()
    out, timings, start = orun.start_set(args, "anomalyclip")

    work, src = orun.work_dir("anomalyclip", args.src, ("__pycache__", "checkpoints", "assets"))
    file_hashes = {name: orun.sha256(src / name) for name in HASHED}
    data_root = work / "data"

    # 1. CLIP, data
    with orun.timed(timings, "build_clip_state_dict"):
        clip_state, archive = write_narrow_clip(args.seed, NARROW, out, work)
    images, masks = orun.make_images(args.seed + 2, 2)
    paths = orun.write_single_class_test_set(data_root, images, masks, DATASET)

    # 2. run-time patches (README section 7)
    patches: list[str] = []
    orun.pkg_resources_stub(patches, "provides only .packaging; the installed setuptools ships no pkg_resources")
    orun.stub_module("thop", patches, "AnomalyCLIP.py:393 imports thop.profile, never used", profile=None)
    orun.stub_module("tabulate", patches, "only formats the final log table of test.py",
                tabulate=lambda rows, **_: "\n".join(map(str, rows)))
    sys.path.insert(0, str(src))
    import AnomalyCLIP_lib
    import dataset as dataset_module
    import metrics as metrics_module
    import prompt_ensemble
    from AnomalyCLIP_lib import model_load
    from AnomalyCLIP_lib.AnomalyCLIP import AnomalyCLIP
    from loss import BinaryDiceLoss, FocalLoss

    model_load._download = lambda _url, cache_dir=None: str(archive)  # noqa: ARG005
    patches.append("AnomalyCLIP_lib.model_load._download -> local TorchScript archive of the narrow random CLIP")
    dataset_module.Image = orun.LegacyImage(dataset_module.Image)
    patches.append("dataset.Image -> proxy emulating legacy Pillow Image.fromarray(float64 zeros, mode='L') "
                   "(dataset.py:65)")
    cuda_patch = "train.py only: torch.Tensor.cuda -> identity on a CUDA-less host (train.py:84 label.long().cuda())"
    cpu_only = orun.cpu_only_patches(patches)

    # 3. the prompt learner: official __init__ on the official model, then N(0, 0.02) from seed S + 1
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr), contextlib.ExitStack() as stack:
        orun.patch_all(stack, cpu_only)
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

    def wrap_learner_init(orig):
        def init(self, *a, **k):
            orig(self, *a, **k)  # same RNG use as the official run
            if state["phase"].startswith("train"):
                self.load_state_dict(torch.load(learner_path, weights_only=True)["prompt_learner"])
            bucket()["learners"].append(self)
        return init

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

    observe = orun.bucket_observers(bucket, state)

    def cuda_identity(orig):
        return lambda self, *a, **k: self if not torch.cuda.is_available() else orig(self, *a, **k)

    common = [
        *cpu_only,
        (AnomalyCLIP_lib, "load", observe["load"]),
        (prompt_ensemble.AnomalyCLIP_PromptLearner, "__init__", wrap_learner_init),
        (dataset_module.Dataset, "__getitem__", observe["getitem"]),
        (AnomalyCLIP, "encode_image", observe["encode_image"]),
        (AnomalyCLIP, "encode_text_learn", wrap_encode_text_learn),
        (AnomalyCLIP_lib, "compute_similarity", wrap_similarity),
        (AnomalyCLIP_lib, "get_similarity_map", observe["similarity_map"]),
        *orun.lineage_loss_patches(observe, metrics_module, FocalLoss, BinaryDiceLoss),
    ]
    runs = {"test": ("test.py", []), "test24": ("test.py", ["--features_list", "24"]),
            "train": ("train.py", ["--epoch", "1", "--batch_size", "2"]),
            "train24": ("train.py", ["--epoch", "1", "--batch_size", "2", "--features_list", "24"])}
    with orun.observed(common, work / "official_stdout.txt"):
        for phase, (script, extra) in runs.items():
            t0 = time.time()
            state["phase"] = phase
            save = work / "save" / phase
            argv = orun.lineage_argv(script, DATASET, data_root, save, learner_path)
            with contextlib.ExitStack() as inner:
                if script == "train.py":
                    inner.enter_context(orun.patched(torch.Tensor, "cuda", cuda_identity))
                orun.run_main(src / script, [*argv, *extra])
            bucket()["save"] = save
            name = {"test": "official_test_py", "test24": "official_test_py_features_list_24",
                    "train": "official_train_py_1_step", "train24": "official_train_py_1_step_features_list_24"}[phase]
            timings[name] = round(time.time() - t0, 2)
        state["phase"] = None
    patches.append(cuda_patch)

    # 5. the set
    test = rec["test"]
    n_images = len(test["items"])
    if n_images != 2 or len(test["image"]) != 2:
        raise SystemExit(f"expected 2 test images, got {n_images}")
    model = test["models"][0]
    tok, up = orun.TOKEN_INDEX, orun.UPSAMPLED_INDEX
    inputs, single = orun.lineage_test_images(test, model, FEATURES, images, masks, {
        "defect_box_raw": (96, 160, 64, 144), "data_seed": args.seed + 2, "raw_size": 256,
        "dataset_name": DATASET, **paths})
    pooled1, tokens1 = single["pooled1"], single["tokens1"]

    gauss = test["gauss"]
    test24 = rec["test24"]
    outputs = {
        "text_features_unnormalized": test["text"][0],
        "text_features": test["sim"][0][2][None],
        "image_features_unnormalized": pooled1,
        "image_scores": orun.image_scores(test),
        "patch_token_index": tok,
        "patch_features_unnormalized_sub": torch.stack([t[:, tok] for t in tokens1]),
        "similarity": orun.per_layer(test["sim"], n_images, 0),
        "similarity_cls_prob_1": orun.per_layer(test["sim"], n_images, 1),
        "upsampled_sub_index": up,
        "similarity_map_upsampled_sub": orun.per_layer(test["up"], n_images),
        "anomaly_map": torch.stack([torch.from_numpy(g[0]) for g in gauss]),
        "anomaly_map_gaussian": torch.stack([torch.from_numpy(g[1]) for g in gauss]),
        "visual_positional_embedding_interpolated_sub": model.visual.positional_embedding.detach()[tok].clone(),
        "metrics": dict(test["metrics"]),
        "variant_features_list_24": {
            "image_scores": orun.image_scores(test24),
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
            "batch2_vs_batch1_maxabsdiff": single["batch_vs_single"],
            "clip_cfg": clip_cfg(NARROW, args.seed), "prompt_seed": args.seed + 1, "prompt_std": 0.02,
            "randomised_prompt_parameters": randomised, "upsampled_stride": 9, "token_stride": 8,
            "env": orun.environment(), "patches": patches[:-1], "generator": "tools/parity/make_anomalyclip_set.py",
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
    timings["total"] = round(time.time() - start, 2)
    info = {"timings_s": timings, "seed": args.seed, "generator": "tools/parity/make_anomalyclip_set.py",
            "patches": patches, "src": "export of the official repository at the commit above",
            "official_commit": COMMIT, "official_file_sha256": file_hashes, "env": orun.environment()}
    orun.write_set(out, {"inputs.pt": inputs, "outputs.pt": outputs, "train_step.pt": train_step}, info, indent=2)
    orun.finish(out, work, timings["total"])


if __name__ == "__main__":
    main()
