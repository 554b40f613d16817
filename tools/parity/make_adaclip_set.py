"""Make an AdaCLIP parity set with the official code (caoyunkang/AdaCLIP, commit e27ee32), any seed.

The set has the format of ``../shared/parity/adaclip`` (see its README.md): the official ``test.py``
and ``train.py`` run unmodified, as ``__main__``, importing the official code from ``--src`` (an export
of the official repository; nothing of it is copied here). The run-time patches are those the shared
set's ``run_info.json`` lists; intermediate tensors are caught by wrappers that only observe.

    git --git-dir <mirror> archive e27ee32bf19be149795c8c8972d4c3c88cd5a496 | tar x -C /tmp/adaclip_off
    python tools/parity/make_adaclip_set.py --src /tmp/adaclip_off --out /tmp/parity_seeds/seed7 --seed 7

``--seed S`` draws the narrow CLIP from ``torch.manual_seed(S)``, the learnable tensors from ``S + 1``
and the images from ``numpy.random.default_rng(S + 2)``; ``--seed 100`` remakes the shared set
(its README names seeds 100, 101, 102). The set goes to ``<out>/adaclip``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
import types
from pathlib import Path

import numpy as np
import official_run as orun
import torch
import torch.nn.functional as F  # noqa: N812
from narrow_clip import BPE_SHA256, narrow_config, write_narrow_clip

COMMIT = "e27ee32bf19be149795c8c8972d4c3c88cd5a496"
CLASS = "candle"
VISA_CLASSES = ["candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
                "pcb3", "pcb4", "pipe_fryum"]
NARROW = narrow_config(64, 64, 64)  # width 64 = one head, embed 64 (README section 1)


def write_visa(root: Path, images: np.ndarray, masks: np.ndarray) -> None:
    from PIL import Image

    visa = root / "VisA_20220922"
    entries = []
    for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
        anomalous = index == 1
        kind = "Anomaly" if anomalous else "Normal"
        img_rel = f"{CLASS}/Data/Images/{kind}/{index:03d}.png"  # as the shared set's meta
        (visa / img_rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(visa / img_rel)
        mask_rel = ""
        if anomalous:
            mask_rel = f"{CLASS}/Data/Masks/{kind}/{index:03d}.png"
            (visa / mask_rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask, mode="L").save(visa / mask_rel)
        entries.append({"img_path": img_rel, "mask_path": mask_rel, "cls_name": CLASS,
                        "specie_name": "bad" if anomalous else "good", "anomaly": int(anomalous)})
    meta = {split: {c: (entries if c == CLASS else []) for c in VISA_CLASSES} for split in ("train", "test")}
    (visa / "meta.json").write_text(json.dumps(meta))


# ----------------------------------------------------------------------------- patches
def install_stubs(record: dict) -> None:
    """Modules the official code imports but this environment lacks (README section 8, item 2)."""
    from packaging import version

    pkg = types.ModuleType("pkg_resources")
    pkg.packaging = types.SimpleNamespace(version=version)
    sys.modules["pkg_resources"] = pkg
    sys.modules["seaborn"] = types.ModuleType("seaborn")

    class SummaryWriter:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def add_scalar(self, tag, value, step=None) -> None:
            record.setdefault("tensorboard", []).append((tag, float(value), step))

    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = SummaryWriter
    sys.modules["torch.utils.tensorboard"] = tb


# ----------------------------------------------------------------------------- the run
def main() -> None:  # noqa: C901
    parser = orun.generator_parser(__doc__, "adaclip", COMMIT)
    parser.add_argument("--bpe", type=Path, default=None, help="CLIP BPE vocab (default: open_clip's copy)")
    args = parser.parse_args()
    out, timings, start = orun.start_set(args, "adaclip")
    record: dict = {}

    work, src = orun.work_dir("adaclip", args.src)
    bpe = args.bpe
    if bpe is None:
        import open_clip

        bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if orun.sha256(bpe) != BPE_SHA256:
        raise SystemExit(f"{bpe} is not the CLIP BPE vocabulary (SHA-256 {BPE_SHA256})")
    shutil.copyfile(bpe, src / "method" / "bpe_simple_vocab_16e6.txt.gz")
    file_hashes = {str(p.relative_to(src)): orun.sha256(p) for p in sorted(src.rglob("*.py"))
                   if p.parent.name in ("", "method", "dataset", "tools") or p.parent == src}
    run_dir = work / "run"
    (run_dir / "model_configs").mkdir(parents=True)
    config_path = run_dir / "model_configs" / "ViT-L-14-336.json"
    config_path.write_text(json.dumps(NARROW))

    # 1. CLIP, learnable tensors, data
    with orun.timed(timings, "build_clip"):
        _, archive = write_narrow_clip(args.seed, NARROW, out, work)
    images, masks = orun.make_images(args.seed + 2, 2)
    write_visa(work / "datasets", images, masks)

    install_stubs(record)
    sys.path.insert(0, str(src))
    os.chdir(run_dir)
    import method.trainer as trainer_module
    import sklearn.cluster
    from dataset import base_dataset
    from loss import BinaryDiceLoss, FocalLoss
    from method import (
        adaclip,
        custom_clip,
    )

    custom_clip.add_model_config(config_path)
    custom_clip.download_pretrained_from_url = lambda _url, cache_dir=None: str(archive)  # noqa: ARG005
    base_dataset.Image = orun.LegacyImage(base_dataset.Image)

    features_list = [6, 12, 18, 24]
    hyper = {"prompting_depth": 4, "prompting_length": 5, "prompting_branch": "VL", "prompting_type": "SD",
             "use_hsf": True, "k_clusters": 20}
    t0 = time.time()
    trainer = trainer_module.AdaCLIP_Trainer(backbone="ViT-L-14-336", feat_list=features_list, input_dim=64,
                                             output_dim=64, learning_rate=0.0, device="cpu", image_size=518, **hyper)
    torch.manual_seed(args.seed + 1)
    with torch.no_grad():
        for name, param in trainer.clip_model.named_parameters():
            if not any(tag in name for tag in trainer.learnable_paramter_list):
                continue
            if "static_prompts" in name:
                param.normal_(std=0.02)
            elif name.endswith("weight"):
                param.normal_(std=param.shape[1] ** -0.5)
            else:
                param.normal_(std=0.02)
    learnable_path = out / "adaclip_learnable.pt"
    trainer.save(str(learnable_path))
    del trainer
    timings["build_learnable"] = round(time.time() - t0, 2)

    # 2. observation wrappers (they return what they get)
    state = {"phase": None, "trainers": []}
    cur: dict = {}

    def new_item() -> None:
        cur.clear()
        cur.update(text=[], hsf=[], kmeans=[], upsampled=[], focal=[], dice=[])

    def wrap_init(orig):
        def init(self, *a, **k):
            orig(self, *a, **k)
            state["trainers"].append(self)
            if state["phase"] == "train":
                self.load(str(learnable_path))
        return init

    def wrap_getitem(orig):
        def getitem(self, index):
            item = orig(self, index)
            record.setdefault(f"{state['phase']}_items", []).append(
                (index, item["img"].clone(), item["img_mask"].clone(), item["anomaly"], item["cls_name"]))
            return item
        return getitem

    def wrap_dynamic(orig):
        def dynamic(self, image):
            visual_forward = self.visual.forward

            def observe(*a, **k):
                result = visual_forward(*a, **k)
                cur["frozen"] = result[0].detach().clone()
                return result
            self.visual.forward = observe
            try:
                orig(self, image)
            finally:
                del self.visual.forward
            cur["dyn_v"] = self.visual_prompter.dynamic_prompts.detach().clone()
            cur["dyn_t"] = self.text_prompter.dynamic_prompts.detach().clone()
        return dynamic

    def wrap_encode_image(orig):
        def encode_image(self, image):
            pooled, tokens, embedding = orig(self, image)
            cur["pooled"] = pooled.detach().clone()
            cur["tokens"] = [t.detach().clone() for t in tokens]
            cur["patch_embedding"] = embedding.detach().clone()
            return pooled, tokens, embedding
        return encode_image

    def wrap_encode_text(orig):
        def encode_text(self, text):
            result = orig(self, text)
            cur["text"].append((text.clone(), result.detach().clone()))
            return result
        return encode_text

    def wrap_proj(orig):
        def proj(self, image_features, patch_tokens):
            cls, patches = orig(self, image_features, patch_tokens)
            cur["cls_proj"] = cls.detach().clone()
            cur["patch_proj"] = [p.detach().clone() for p in patches]
            return cls, patches
        return proj

    def wrap_similarity(orig):
        def similarity(self, image_feature, patch_token, text_feature, aggregation):
            cur["text_features"] = text_feature.detach().clone()
            cur["in_similarity"] = True
            try:
                result = orig(self, image_feature, patch_token, text_feature, aggregation)
            finally:
                cur["in_similarity"] = False
            cur["similarity_out"] = (result[0].detach().clone() if not isinstance(result[0], list)
                                     else [m.detach().clone() for m in result[0]], result[1].detach().clone())
            return result
        return similarity

    def wrap_hsf(orig):
        def hsf(self, patch_tokens, anomaly_maps):
            cur["logits"] = [m.detach().clone() for m in anomaly_maps]
            result = orig(self, patch_tokens, anomaly_maps)
            cur["hsf"].append(result.detach().clone())
            return result
        return hsf

    def wrap_fit_predict(orig):
        def fit_predict(self, X, *a, **k):  # noqa: N803
            labels = orig(self, X, *a, **k)
            cur["kmeans"].append((torch.from_numpy(np.array(X, copy=True)), torch.from_numpy(np.asarray(labels)).long()))
            return labels
        return fit_predict

    def wrap_interpolate(orig):
        def interpolate(*a, **k):
            result = orig(*a, **k)
            if cur.get("in_similarity"):
                cur["upsampled"].append(result.detach().clone())
            return result
        return interpolate

    def wrap_gaussian(orig):
        def gaussian(array, *a, **k):
            result = orig(array, *a, **k)
            record.setdefault("gaussian", []).append((np.array(array, copy=True), np.array(result, copy=True), k))
            return result
        return gaussian

    def wrap_forward_model(orig):
        """``AdaCLIP.forward``: one image; stores everything caught for it."""
        def forward(self, image, cls_name, aggregation=True):
            new_item()
            result = orig(self, image, cls_name, aggregation)
            record.setdefault(f"{state['phase']}_runs", []).append(dict(cur))
            return result
        return forward

    def wrap_focal(orig):
        def focal(self, logit, target):
            value = orig(self, logit, target)
            runs = record.get("train_runs")
            if state["phase"] == "train" and runs:
                runs[-1]["focal"].append(value.detach().clone())
            return value
        return focal

    def wrap_dice(orig):
        def dice(self, inputs, targets):
            value = orig(self, inputs, targets)
            runs = record.get("train_runs")
            if state["phase"] == "train" and runs:
                runs[-1]["dice"].append(value.detach().clone())
                runs[-1]["dice_N"] = int(targets.size()[0])
            return value
        return dice

    def wrap_train_one_batch(orig):
        def train_one_batch(self, items):
            loss = orig(self, items)
            record["train_runs"][-1]["loss"] = loss.detach().clone()
            return loss
        return train_one_batch

    def trainer_names() -> dict:
        return {id(p): n.removeprefix("clip_model.") for n, p in state["trainers"][-1].named_parameters()}

    def store_step(optimizer, grads, without, after) -> None:
        hyper = {k2: v for k2, v in optimizer.defaults.items() if isinstance(v, (int, float, tuple, bool))}
        record["train_runs"][-1].update(grads=grads, params_without_grad=without, params_after_step=after,
                                        optimizer_hyper=hyper)

    def wrap_step(orig):
        observed = orun.optimizer_step(trainer_names, store_step)(orig)

        def step(self, *a, **k):
            return observed(self, *a, **k) if state["phase"] == "train" else orig(self, *a, **k)
        return step

    def wrap_evaluation(orig):
        def evaluation(self, *a, **k):
            metrics = orig(self, *a, **k)
            record.setdefault(f"{state['phase']}_metrics", []).append(metrics)
            return metrics
        return evaluation

    common = [
        (trainer_module.AdaCLIP_Trainer, "__init__", wrap_init),
        (base_dataset.BaseDataset, "__getitem__", wrap_getitem),
        (adaclip.AdaCLIP, "generate_and_set_dynamic_promtps", wrap_dynamic),
        (adaclip.AdaCLIP, "encode_image", wrap_encode_image),
        (adaclip.AdaCLIP, "encode_text", wrap_encode_text),
        (adaclip.AdaCLIP, "proj_visual_tokens", wrap_proj),
        (adaclip.AdaCLIP, "visual_text_similarity", wrap_similarity),
        (adaclip.AdaCLIP, "forward", wrap_forward_model),
        (adaclip.HybridSemanticFusion, "forward", wrap_hsf),
        (sklearn.cluster.KMeans, "fit_predict", wrap_fit_predict),
        (F, "interpolate", wrap_interpolate),
        (trainer_module, "gaussian_filter", wrap_gaussian),
        (trainer_module.AdaCLIP_Trainer, "evaluation", wrap_evaluation),
        (trainer_module.AdaCLIP_Trainer, "train_one_batch", wrap_train_one_batch),
        (FocalLoss, "forward", wrap_focal),
        (BinaryDiceLoss, "forward", wrap_dice),
        (torch.optim.AdamW, "step", wrap_step),
    ]
    with contextlib.ExitStack() as stack:
        orun.patch_all(stack, common)
        # 3. official test.py (inference) then train.py (two steps, evaluation, save)
        t0 = time.time()
        state["phase"] = "test"
        (run_dir / "workspaces" / "csvs").mkdir(parents=True)
        with contextlib.redirect_stdout(io.StringIO()):
            orun.run_main(src / "test.py", ["--ckt_path", str(learnable_path), "--testing_model", "dataset",
                                       "--testing_data", "visa"])
        timings["official_test_py"] = round(time.time() - t0, 2)
        t0 = time.time()
        state["phase"] = "train"
        with orun.patched(torch.Tensor, "norm", orun.norm_on_clone), contextlib.redirect_stdout(io.StringIO()):
            orun.run_main(src / "train.py", ["--training_data", "visa", "--testing_data", "visa", "--epoch", "1"])
        timings["official_train_py_epoch1"] = round(time.time() - t0, 2)

    # 4. write the set
    runs = record["test_runs"]
    n_images = len(runs)
    if n_images != 2:
        raise SystemExit(f"expected 2 test images, got {n_images}")
    token_index, up_index = orun.TOKEN_INDEX, orun.UPSAMPLED_INDEX
    items = record["test_items"]
    labels = torch.tensor([it[3] for it in items])
    inputs = {"raw_images_uint8": torch.from_numpy(images), "raw_masks_uint8": torch.from_numpy(masks),
              "labels": labels, "images": torch.stack([it[1] for it in items]),
              "gt_masks": torch.stack([(it[2][0] > 0.5).to(torch.uint8) for it in items]),
              "meta": {"cls_name": CLASS, "seed": args.seed + 2}}
    first = runs[0]
    trainer = state["trainers"][0]
    gauss = record["gaussian"][:n_images]
    outputs = {
        "frozen_image_features": torch.cat([r["frozen"] for r in runs]),
        "dynamic_visual_prompts": torch.cat([r["dyn_v"] for r in runs]),
        "dynamic_text_prompts": torch.cat([r["dyn_t"] for r in runs]),
        "text_tokens_normal": first["text"][0][0], "text_tokens_abnormal": first["text"][1][0],
        "text_embeddings_normal": torch.stack([r["text"][0][1] for r in runs]),
        "text_embeddings_abnormal": torch.stack([r["text"][1][1] for r in runs]),
        "text_features": torch.cat([r["text_features"] for r in runs]),
        "image_features_unnormalized": torch.cat([r["pooled"] for r in runs]),
        "patch_embedding_sub": torch.cat([r["patch_embedding"][:, token_index] for r in runs]),
        "patch_tokens_raw_sub": torch.stack([torch.cat([r["tokens"][layer][:, token_index] for r in runs])
                                             for layer in range(4)]),
        "cls_token_projected": torch.cat([r["cls_proj"] for r in runs]),
        "patch_tokens_projected_sub": torch.stack([torch.cat([r["patch_proj"][layer][:, token_index[1:] - 1] for r in runs])
                                                   for layer in range(4)]),
        "patch_logits": torch.stack([torch.cat([r["logits"][layer] for r in runs]) for layer in range(4)]),
        "hsf_kmeans_input": torch.stack([r["kmeans"][0][0] for r in runs]),
        "hsf_kmeans_labels": torch.stack([r["kmeans"][0][1] for r in runs]),
        "hsf_clustered_feature": torch.cat([r["hsf"][0] for r in runs]),
        "anomaly_score": torch.cat([r["similarity_out"][1] for r in runs]),
        "patch_logits_upsampled_sub": torch.stack([torch.cat([r["upsampled"][layer][:, :, up_index][:, :, :, up_index]
                                                              for r in runs]) for layer in range(4)]),
        "anomaly_map": torch.stack([torch.from_numpy(g[0]) for g in gauss]),
        "anomaly_map_gaussian": torch.stack([torch.from_numpy(g[1]) for g in gauss]),
        "gauss_kwargs": dict(gauss[0][2]),
        "visual_positional_embedding_sub": trainer.clip_model.visual.positional_embedding.detach()[token_index].clone(),
        "token_index": token_index, "upsampled_sub_index": up_index,
        "metrics": record["test_metrics"][0],
        "meta": {"argv": ["test.py", "--testing_model", "dataset", "--testing_data", "visa"], "hyper": hyper,
                 "features_list": features_list, "model_config": NARROW, "seed": args.seed,
                 "cls_name": CLASS, "official_file_sha256": file_hashes,
                 "activation_types": sorted({type(m).__name__ for m in trainer.clip_model.modules()
                                             if type(m).__name__ in ("GELU", "QuickGELU")})},
    }
    steps = []
    train_items = record["train_items"][:2]
    for run, item in zip(record["train_runs"][:2], train_items, strict=True):
        focal, dice = run["focal"], run["dice"]
        steps.append({"image_index": item[0], "label": int(item[3]), "classification_focal": focal[0],
                      "seg_focal": torch.stack(focal[1:5]), "seg_dice_anomalous": torch.stack(dice[0::2]),
                      "seg_dice_normal": torch.stack(dice[1::2]), "dice_N": run["dice_N"], "loss": run["loss"],
                      "grads": run["grads"], "params_without_grad": run["params_without_grad"],
                      "params_after_step": run["params_after_step"], "kmeans_labels": run["kmeans"][0][1],
                      "kmeans_input": run["kmeans"][0][0], "anomaly_score": run["similarity_out"][1]})
    ckpt = sorted((run_dir / "workspaces" / "models").glob("*_best.pth"))
    train_step = {"steps": steps, "checkpoint_after": torch.load(ckpt[-1], weights_only=True),
                  "metrics_after": record["train_metrics"][0], "tensorboard": record.get("tensorboard", []),
                  "meta": {"argv": sys.argv, "optimizer": "AdamW",
                           "optimizer_hyper": record["train_runs"][0]["optimizer_hyper"], "seed": 111,
                           "batch_order": [it[0] for it in train_items]}}
    timings["total"] = round(time.time() - start, 2)
    info = {"timings_s": timings, "seed": args.seed, "generator": "tools/parity/make_adaclip_set.py",
            "patches": ["BPE vocab from open_clip", "stubs: pkg_resources, seaborn, torch.utils.tensorboard",
                        "add_model_config(narrow ViT-L-14-336)", "download_pretrained_from_url -> local archive",
                        "dataset.base_dataset.Image -> legacy fromarray proxy", "test.py: csvs dir created",
                        "train.py only: Tensor.norm on a clone when it requires grad"],
            "official_file_sha256": file_hashes}
    orun.write_set(out, {"inputs.pt": inputs, "outputs.pt": outputs, "train_step.pt": train_step}, info)
    orun.finish(out, work, timings["total"])


if __name__ == "__main__":
    main()
