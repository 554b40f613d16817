"""Make a Bayes-PFL parity set with the official code (xiaozhen228/Bayes-PFL, commit 8f155a0), any seed.

The set has the format of ``../shared/parity/bayes_pfl`` (see its README.md): the official ``test.py``
and one step of ``train.py`` run unmodified, as ``__main__``, with the working directory at a copy of
``--src`` (an export of the official repository; nothing of it is copied into this project). The
run-time patches are those the shared set's ``run_info.json`` lists; intermediate tensors, including
every Monte-Carlo draw, are caught by wrappers that only observe.

    git --git-dir <mirror> archive 8f155a07e734913e021c33c469f16a1f75c60e5d -- . ':(exclude)figures' \
        | tar x -C /tmp/bpfl_off
    PYTHONPATH=<dir with albumentations==1.3.1, qudida, transformers> \
        python tools/parity/make_bayes_pfl_set.py --src /tmp/bpfl_off --out /tmp/parity_seeds/seed7 --seed 7

train.py imports albumentations (the pinned 1.3.1; its augmentation draws from ``np.random``/``random``)
and ``transformers.get_cosine_schedule_with_warmup``; both can live in a ``pip install --target`` folder.
``--seed S`` draws the narrow CLIP from ``torch.manual_seed(S)``, the official parameters (plus a
0.02 perturbation) from ``S + 1`` and the images from ``numpy.random.default_rng(S + 2)``; the official
scripts get ``--seed 111 + S`` (``--run-seed``), so ``--seed 100`` remakes the shared set (CLIP seed 100,
parameter seed 101, data seed 102, official ``--seed 211``). The set goes to ``<out>/bayes_pfl``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official_run as orun
from narrow_clip import clip_cfg, narrow_config, write_narrow_clip

COMMIT = "8f155a07e734913e021c33c469f16a1f75c60e5d"
VISION_WIDTH, TEXT_WIDTH, EMBED = 96, 64, 64
MODEL_CONFIG = narrow_config(EMBED, VISION_WIDTH, TEXT_WIDTH)
MEAN, STD = torch.tensor(orun.CLIP_MEAN), torch.tensor(orun.CLIP_STD)
OFFICIAL_FILES = ["test.py", "train.py", "datasets.py", "loss.py", "models/VPB.py", "models/PFL.py", "models/flows.py",
                  "models/model_CLIP.py", "models/transformer.py", "models/utils.py", "models/simple_tokenizer.py",
                  "models/evaluate.py", "models/metric_and_visualization.py", "models/EMA.py",
                  "open_clip_local/model_configs/ViT-L-14-336.json"]
TEST_SET = [("metal_nut", 0), ("metal_nut", 1)]  # mvtec, (class, raw image)
TRAIN_SET = [("pcb1", 2), ("candle", 0)]  # visa
PARAM_NOISE = 0.02
UP_INDEX = orun.UPSAMPLED_INDEX
PATCHES = [
    "stub module pkg_resources (models/model_CLIP.py uses only pkg_resources.packaging.version)",
    ("stub module imgaug (datasets.py builds imgaug augmenters in MyDataset.__init__ for the DRAEM-style anomaly "
     "synthesis, which is disabled: generate_anomaly = False; imgaug does not import with numpy 2)"),
    ("datasets.Image -> proxy emulating legacy Pillow Image.fromarray(float64 zeros, mode='L') (datasets.py:292, "
     "mask of normal images)"),
    ("torch.Tensor.cuda -> identity on a CUDA-less host (models/PFL.py:150,215 `torch.zeros(...).cuda()` because "
     "PFL.is_cuda = True is hard-coded; loss.py:81 logvar.cuda())"),
    ("torch.Tensor.to('cuda...') -> 'cpu' on a CUDA-less host (models/transformer.py:599 `out_attn = "
     "torch.zeros([H, H]).to('cuda')`, an unused attention summary)"),
    "torch.cuda.set_device -> no-op on a CUDA-less host (test.py/train.py __main__)",
]


class StopAfterStep(Exception):  # noqa: N818
    """Raised by the patched ``evaluate_pre``: train.py has finished its first step."""


class _Anything:
    """Stand-in for every imgaug augmenter (built, never used)."""

    def __init__(self, *a, **k) -> None:
        pass

    def __call__(self, *a, **k):
        return _Anything()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


def install_stubs() -> None:
    from packaging import version

    pkg = types.ModuleType("pkg_resources")
    pkg.packaging = types.SimpleNamespace(version=version)
    sys.modules["pkg_resources"] = pkg
    imgaug = types.ModuleType("imgaug")
    augmenters = types.ModuleType("imgaug.augmenters")

    def anything(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything

    augmenters.__getattr__ = anything
    augmenters.pillike = _Anything()
    imgaug.augmenters = augmenters
    sys.modules["imgaug"] = imgaug
    sys.modules["imgaug.augmenters"] = augmenters


def write_data(root: Path, images: np.ndarray, masks: np.ndarray) -> None:
    """``meta_mvtec.json`` (test) and ``meta_visa.json`` (train) in the official format, with the images."""
    from PIL import Image

    for dataset, entries in (("mvtec", TEST_SET), ("visa", TRAIN_SET)):
        meta: dict[str, list] = {}
        for name, raw in entries:
            anomalous = orun.DEFECTS[raw] is not None
            kind = "bad" if anomalous else "good"
            img_rel = f"{dataset}/{name}/test/{kind}/{raw:03d}.png"
            (root / img_rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[raw]).save(root / img_rel)
            mask_rel = ""
            if anomalous:
                mask_rel = f"{dataset}/{name}/ground_truth/{kind}/{raw:03d}.png"
                (root / mask_rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(masks[raw], mode="L").save(root / mask_rel)
            meta.setdefault(name, []).append({"img_path": img_rel, "mask_path": mask_rel, "cls_name": name,
                                              "specie_name": kind, "anomaly": int(anomalous)})
        (root / f"meta_{dataset}.json").write_text(json.dumps({"train": {}, "test": meta}))


def decode(u8: torch.Tensor) -> torch.Tensor:
    return u8.float().div(255).sub(MEAN[:, None, None]).div(STD[:, None, None])


def encode(x: torch.Tensor) -> torch.Tensor:
    """Model input [B,3,H,W] (normalised uint8 pixels) -> uint8, checked to decode bitwise."""
    table = decode(torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256))[:, 0]
    u8 = torch.empty(x.shape, dtype=torch.uint8)
    for c in range(3):
        u8[:, c] = torch.searchsorted(table[c].contiguous(), x[:, c].contiguous()).clamp(0, 255).to(torch.uint8)
    if not torch.equal(decode(u8), x):
        raise SystemExit("an image is not a normalised uint8 image")
    return u8


def official_args(**extra) -> argparse.Namespace:
    return argparse.Namespace(vision_width=VISION_WIDTH, text_width=TEXT_WIDTH, embed_dim=EMBED, prompt_num=3,
                              prompt_context_len=5, prompt_state_len=5, num_flows=10, sample_num=10,
                              features_list=[6, 12, 18, 24], image_size=518, **extra)


def sub(maps: torch.Tensor) -> torch.Tensor:
    """Maps on the stored strided grid (rows/columns 0, 9, ..., 513, 517 of 518)."""
    return maps[..., UP_INDEX, :][..., UP_INDEX]


def train_step_outputs(rec: dict) -> dict:
    """``train_step.pt`` from the records of the train.py step."""
    tok8 = torch.arange(0, 1369, 8)
    train_items = rec["train:items"]
    ensemble = rec["train:ensemble"][0]
    forward = rec["train:forward"][0]
    interps = rec["train:interpolate"]
    grads, lrs = rec["train:adam"][0]
    focal = rec["train:focal"]
    encode_train = rec["train:encode_image"][0]
    train_eps = rec["train:randn_like"]
    randint = rec["train:randint"]
    gt = focal[0][1][1]
    return {
        "batch_order": torch.tensor([it[0] for it in train_items]),
        "class_names": [it[3] for it in train_items],
        "anomaly": torch.tensor([it[4] for it in train_items]),
        "images_uint8": encode(torch.stack([it[1] for it in train_items])),
        "masks_packed": orun.pack_bits(gt.reshape(gt.shape[0], 1, *gt.shape[1:])),
        "image_features": encode_train[0],
        "patch_tokens_sub": [t[:, tok8] for t in encode_train[1]],
        "mc_eps": train_eps[:3],
        "pfl_context_out": rec["train:pfl_context"][0], "pfl_normal_out": rec["train:pfl_normal"][0],
        "pfl_abnormal_out": rec["train:pfl_abnormal"][0],
        "binary_loss_function": list(rec["train:binary_loss"]),
        "reg_terms": ensemble[1],
        "text_normal": rec["train:text_encoder"][0][1], "text_abnormal": rec["train:text_encoder"][1][1],
        "text_embeddings": ensemble[0], "pro_img": forward[0],
        "rca_text_update": torch.stack(rec["train:rca"]),
        "maps_37": torch.stack([i[0] for i in interps]),
        "maps_upsampled_sub": sub(torch.stack([i[1] for i in interps])),
        "index_prompt": randint[0][1],
        "randint_calls": [(a[0], a[1], tuple(a[2])) for a, _ in randint],
        "loss_class": rec["train:cross_entropy"][0][0],
        "loss_focal": torch.stack([f[0] for f in focal]),
        "loss_dice": torch.stack([d[0] for d in rec["train:dice"]]),
        "loss_orthogonal": rec["train:orthogonal"][0][0],
        "loss": rec["train:loss"][0],
        "grads": grads, "lr": lrs,
        "meta": {"train_argv": "train.py --epochs 1 --batch_size 2 --seed <111+offset> (+ data/save/config/pretrained "
                               "paths); every other option = argparse default; stopped when it enters evaluate_pre",
                 "image_decode": "x = (uint8/255 - mean)/std per channel (torch float32 ops), bitwise"},
    }


def main() -> None:  # noqa: C901
    parser = orun.generator_parser(__doc__, "bayes_pfl", COMMIT)
    parser.add_argument("--run-seed", type=int, default=None, help="official --seed (default 111 + seed)")
    parser.add_argument("--test-only", action="store_true",
                        help="run test.py only (no train_step.pt / checkpoint_after_step.pth): e.g. to sample the "
                             "Monte-Carlo spread with several --run-seed values")
    args = parser.parse_args()
    run_seed = 111 + args.seed if args.run_seed is None else args.run_seed
    out, timings, start = orun.start_set(args, "bayes_pfl")
    work, src = orun.work_dir("bayes_pfl", args.src)
    file_hashes = {name: orun.sha256(src / name) for name in OFFICIAL_FILES}

    with orun.timed(timings, "build_clip"):
        _, archive = write_narrow_clip(args.seed, MODEL_CONFIG, out, work)
        config_path = out / "model_config.json"
        config_path.write_text(json.dumps(MODEL_CONFIG, indent=2))
    images, masks = orun.make_images(args.seed + 2, 3)
    data_root = work / "data"
    write_data(data_root, images, masks)

    install_stubs()
    sys.path.insert(0, str(src))
    os.chdir(src)
    import datasets as datasets_module
    import loss as loss_module
    import models.evaluate as evaluate_module
    import models.metric_and_visualization as metric_module
    import models.model_CLIP as clip_module
    pfl_module = importlib.import_module("models.PFL")
    vpb_module = importlib.import_module("models.VPB")

    datasets_module.Image = orun.LegacyImage(datasets_module.Image)
    official_prompting = vpb_module.Context_Prompting

    # 1. the learnable parameters (official init, then p += 0.02 randn_like(p) in named_parameters order)
    t0 = time.time()
    torch.manual_seed(args.seed + 1)
    golden = official_prompting(official_args())
    perturbed = []
    with torch.no_grad():
        for name, param in golden.named_parameters():
            param += PARAM_NOISE * torch.randn_like(param)
            perturbed.append(name)
    checkpoint_path = out / "checkpoint.pth"
    # aliased (shared) modules stored once per name, as in the shared set
    torch.save({"MyModel": {k: v.clone() for k, v in golden.state_dict().items()}}, checkpoint_path)
    del golden
    timings["build_params"] = round(time.time() - t0, 2)

    # 2. observation wrappers (they return what they get)
    state: dict = {"phase": None, "model": None, "clip": [], "in_forward": False}
    rec: dict = {}

    def log(key: str, value) -> None:
        rec.setdefault(f"{state['phase']}:{key}", []).append(value)

    def det(t):
        return t.detach().clone() if isinstance(t, torch.Tensor) else t

    class ObservedPrompting(official_prompting):
        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            state["model"] = self
            if state["phase"] == "train":
                self.load_state_dict(torch.load(checkpoint_path, map_location="cpu")["MyModel"], strict=True)

        def forward_ensemble(self, *a, **k):
            text, reg = super().forward_ensemble(*a, **k)
            log("ensemble", (det(text), [det(r) for r in reg]))
            return text, reg

        def forward(self, *a, **k):
            state["in_forward"] = True
            try:
                pro, maps = super().forward(*a, **k)
            finally:
                state["in_forward"] = False
            log("forward", (det(pro), [det(m) for m in maps]))
            return pro, maps

    def wrap_load_clip(orig):
        def load_clip(*a, **k):
            result = orig(*a, **k)
            state["clip"].append(result[0])
            return result
        return load_clip

    def wrap_encode_image(orig):
        def encode_image(self, image, out_layers):
            x, proj_tokens, tokens = orig(self, image, out_layers)
            log("encode_image", (det(x), [det(t) for t in tokens]))
            return x, proj_tokens, tokens
        return encode_image

    def wrap_text_encoder(orig):
        def forward(self, text, visual_feature, prompt_bias_list, mode):
            result = orig(self, text, visual_feature, prompt_bias_list, mode)
            log("text_encoder", (text.clone(), det(result)))
            return result
        return forward

    def wrap_rca(orig):
        def forward(self, F_t, F_s, layer):  # noqa: N803
            result = orig(self, F_t, F_s, layer)
            log("rca", det(result[0]))
            return result
        return forward

    def wrap_pfl(kind):
        def make(orig):
            def forward(self, x, mode=None):
                result = orig(self, x, mode=mode)
                model = state["model"]
                name = kind if kind == "context" else ("normal" if self is model.PFL_normal else "abnormal")
                log(f"pfl_{name}", tuple(det(r) for r in result))
                return result
            return forward
        return make

    def wrap_randn_like(orig):
        def randn_like(*a, **k):
            result = orig(*a, **k)
            log("randn_like", det(result))
            return result
        return randn_like

    def wrap_randint(orig):
        def randint(*a, **k):
            result = orig(*a, **k)
            log("randint", (a, det(result)))
            return result
        return randint

    def wrap_interpolate(orig):
        def interpolate(x, *a, **k):
            result = orig(x, *a, **k)
            if state["in_forward"]:
                log("interpolate", (det(x), det(result)))
            return result
        return interpolate

    def wrap_metric(orig):
        def calcuate_metric_pixel(results, obj_list, logger, alpha=0.9, sigm=4, args=None):
            log("metric_in", ({key: list(value) for key, value in results.items()}, list(obj_list),
                              {"alpha": alpha, "sigm": sigm}))
            return orig(results, obj_list, logger, alpha=alpha, sigm=sigm, args=args)
        return calcuate_metric_pixel

    def wrap_gaussian(orig):
        def gaussian_filter(array, *a, **k):
            result = orig(array, *a, **k)
            log("gaussian", (np.array(array, copy=True), np.array(result, copy=True), dict(k)))
            return result
        return gaussian_filter

    def wrap_roc(orig):
        def roc_auc_score(y_true, y_score, *a, **k):
            log("roc", np.array(y_score, copy=True))
            return orig(y_true, y_score, *a, **k)
        return roc_auc_score

    def wrap_getitem(orig):
        def getitem(self, index):
            item = orig(self, index)
            log("items", (index, det(item["img"]), det(item["img_mask"]), item["cls_name"], item["anomaly"]))
            return item
        return getitem

    def wrap_value(key):
        def make(orig):
            def forward(self, *a, **k):
                value = orig(self, *a, **k)
                if state["phase"] == "train":
                    log(key, (det(value), [det(x) for x in a if isinstance(x, torch.Tensor)]))
                return value
            return forward
        return make

    def wrap_binary_loss(orig):
        def binary_loss_function(*a, **k):
            result = orig(*a, **k)
            log("binary_loss", tuple(det(r) for r in result))
            return result
        return binary_loss_function

    def wrap_backward(orig):
        def backward(self, *a, **k):
            if state["phase"] == "train":
                log("loss", det(self))
            return orig(self, *a, **k)
        return backward

    def wrap_step(orig):
        def step(self, *a, **k):
            if state["phase"] == "train":
                model = state["model"]
                group_of = {id(p): (i, g["lr"]) for i, g in enumerate(self.param_groups) for p in g["params"]}
                named = list(model.named_parameters())
                log("adam", ({n: det(p.grad) for n, p in named}, {n: group_of[id(p)] for n, p in named}))
            return orig(self, *a, **k)
        return step

    def stop(*_a, **_k):
        raise StopAfterStep

    def identity_cuda(_orig):
        def cuda(self, *_a, **_k):
            return self
        return cuda

    def cpu_to(orig):
        def to(self, *a, **k):
            if a and isinstance(a[0], (str, torch.device)) and str(a[0]).startswith("cuda"):
                a = ("cpu", *a[1:])
            if "device" in k and str(k["device"]).startswith("cuda"):
                k["device"] = "cpu"
            return orig(self, *a, **k)
        return to

    wrappers = [
        (torch.Tensor, "cuda", identity_cuda),
        (torch.Tensor, "to", cpu_to),
        (torch.cuda, "set_device", lambda _orig: lambda *_a, **_k: None),
        (vpb_module, "Context_Prompting", lambda _orig: ObservedPrompting),
        (clip_module, "Load_CLIP", wrap_load_clip),
        (clip_module.CLIP, "encode_image", wrap_encode_image),
        (vpb_module.TextEncoder, "forward", wrap_text_encoder),
        (vpb_module.Zero_Parameter, "forward", wrap_rca),
        (pfl_module.PlanarPFL, "forward", wrap_pfl("context")),
        (pfl_module.PlanarPFL_state, "forward", wrap_pfl("state")),
        (torch, "randn_like", wrap_randn_like),
        (torch, "randint", wrap_randint),
        (torch.nn.functional, "interpolate", wrap_interpolate),
        (metric_module, "calcuate_metric_pixel", wrap_metric),
        (metric_module, "gaussian_filter", wrap_gaussian),
        (metric_module, "roc_auc_score", wrap_roc),
        (datasets_module.MyDataset, "__getitem__", wrap_getitem),
        (loss_module.FocalLoss, "forward", wrap_value("focal")),
        (loss_module.DiceLoss, "forward", wrap_value("dice")),
        (loss_module.Orthogonal_Loss, "forward", wrap_value("orthogonal")),
        (torch.nn.CrossEntropyLoss, "forward", wrap_value("cross_entropy")),
        (vpb_module, "binary_loss_function", wrap_binary_loss),
        (torch.Tensor, "backward", wrap_backward),
        (torch.optim.Adam, "step", wrap_step),
        (evaluate_module, "evaluate_pre", lambda _orig: stop),
    ]
    paths = ["--config_path", str(config_path), "--pretrained_path", str(archive)]
    after_step = None
    with contextlib.ExitStack() as stack:
        orun.patch_all(stack, wrappers)
        sink = io.StringIO()
        stack.enter_context(contextlib.redirect_stdout(sink))
        stack.enter_context(contextlib.redirect_stderr(sink))
        # 3. official test.py, then train.py up to its first validation
        t0 = time.time()
        state["phase"] = "test"
        orun.run_main(src / "test.py", ["--data_path", str(data_root), "--save_path", "results_parity", *paths,
                                   "--checkpoint_path", str(checkpoint_path), "--seed", str(run_seed)])
        timings["official_test_py"] = round(time.time() - t0, 2)
        if not args.test_only:
            t0 = time.time()
            state["phase"] = "train"
            try:
                orun.run_main(src / "train.py", ["--train_data_path", str(data_root), "--val_data_path", str(data_root),
                                            "--save_path", "train_parity", *paths, "--epochs", "1", "--batch_size",
                                            "2", "--seed", str(run_seed)])
            except StopAfterStep:
                after_step = {"MyModel": {k: v.detach().clone() for k, v in state["model"].state_dict().items()}}
            timings["official_train_py_1_step"] = round(time.time() - t0, 2)
    if after_step is None and not args.test_only:
        raise SystemExit("train.py did not reach its validation after one step")
    if after_step is not None:
        torch.save(after_step, out / "checkpoint_after_step.pth")

    # 4. the set
    tok16, idx = torch.arange(0, 1369, 16), UP_INDEX
    n_test = len(TEST_SET)
    encoded = rec["test:encode_image"]
    ensembles, forwards = rec["test:ensemble"], rec["test:forward"]
    texts, rcas, interps = rec["test:text_encoder"], rec["test:rca"], rec["test:interpolate"]
    eps = rec["test:randn_like"]
    draws = len(eps) // (3 * n_test)
    metric_in, _, metric_kwargs = rec["test:metric_in"][0]
    results = metric_in
    gauss = rec["test:gaussian"][0]
    rocs = rec["test:roc"]
    model_clip = state["clip"][0]
    test_items = rec["test:items"]
    from PIL import Image

    resized = torch.stack([torch.from_numpy(np.asarray(Image.fromarray(images[raw]).resize((518, 518), Image.BICUBIC)
                                                       ).copy()).permute(2, 0, 1) for _, raw in TEST_SET])
    if not torch.equal(decode(resized), torch.cat([it[1][None] for it in test_items])):
        raise SystemExit("stored test images do not decode to the official model input")
    inputs = {
        "raw_images_uint8": torch.from_numpy(images), "raw_masks_uint8": torch.from_numpy(masks),
        "raw_labels": torch.tensor([int(d is not None) for d in orun.DEFECTS[:3]]),
        "test_set": TEST_SET, "train_set": TRAIN_SET, "test_images_resized_uint8": resized,
        "test_masks_packed": orun.pack_bits(torch.stack(results["imgs_masks"])),
        "test_labels": torch.tensor(results["gt_sp"]),
        "meta": {"data_seed": args.seed + 2, "defects": orun.DEFECTS[:3], "test_dataset": "mvtec",
                 "train_dataset": "visa"},
    }
    outputs = {
        "image_features": torch.cat([e[0] for e in encoded]), "patch_token_index": tok16,
        "patch_tokens_sub": [torch.cat([e[1][layer][:, tok16] for e in encoded]) for layer in range(4)],
        "visual_positional_embedding_resized": model_clip.visual.positional_embedding.detach().clone(),
        "token_embedding_extra_row": model_clip.token_embedding.weight.detach()[-1].clone(),
        "prompt_text_projection": model_clip.prompt_text_projection.detach().clone(),
        "mc_eps": torch.stack([torch.stack([torch.stack(eps[(n * 3 + s) * draws:(n * 3 + s + 1) * draws])
                                            for s in range(3)]) for n in range(n_test)]),
        "z_context": torch.stack([r[1] for r in rec["test:pfl_context"]]),
        "z_state_normal": torch.stack([r[1] for r in rec["test:pfl_normal"]]),
        "z_state_abnormal": torch.stack([r[1] for r in rec["test:pfl_abnormal"]]),
        "prompt_tokens": texts[0][0],
        "text_normal": torch.stack([texts[2 * n][1] for n in range(n_test)]),
        "text_abnormal": torch.stack([texts[2 * n + 1][1] for n in range(n_test)]),
        "text_embeddings": torch.stack([e[0] for e in ensembles]),
        "pro_img": torch.stack([f[0] for f in forwards]),
        "rca_text_update": torch.stack([torch.stack(rcas[4 * n:4 * n + 4]) for n in range(n_test)]),
        "maps_37": torch.stack([torch.stack([i[0] for i in interps[4 * n:4 * n + 4]]) for n in range(n_test)]),
        "upsampled_sub_index": idx,
        "image_scores": torch.from_numpy(np.stack([np.asarray(s) for s in results["pr_sp"]])),
        "anomaly_map_sub": sub(torch.from_numpy(np.stack(results["anomaly_maps"]))),
        "anomaly_map_smoothed_sub": sub(torch.from_numpy(gauss[1])),
        "gaussian_kwargs": {"sigma": gauss[2].get("sigma"), "axes": tuple(gauss[2].get("axes"))},
        "metric_kwargs": {**metric_kwargs, "obj_list": rec["test:metric_in"][0][1]},
        "final_image_scores": torch.from_numpy(np.asarray(rocs[1], dtype=np.float64)),
        "auc_inputs_pixel_sub": None,
        "meta": {
            "official_commit": COMMIT, "official_file_sha256": file_hashes,
            "test_argv": "test.py --seed <111+offset> (+ data/save/config/pretrained/checkpoint paths); every other "
                         "option default (mvtec, image_size 518, features 6 12 18 24, prompt_num 3, ctx 5, state 5, "
                         "sample_num 10, num_flows 10)",
            "run_seed": run_seed,
            "clip_cfg": clip_cfg(MODEL_CONFIG, args.seed),
            "model_config_json": MODEL_CONFIG, "param_seed": args.seed + 1, "param_noise_std": PARAM_NOISE,
            "perturbed": perturbed,
            "env": {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
                    "num_threads": torch.get_num_threads()},
            "patches": PATCHES, "generator": "tools/parity/make_bayes_pfl_set.py",
        },
    }
    files = {"inputs.pt": inputs, "outputs.pt": outputs}
    if not args.test_only:
        files["train_step.pt"] = train_step_outputs(rec)
    timings["total"] = round(time.time() - start, 2)
    info = {"timings_s": timings, "patches": PATCHES, "official_commit": COMMIT, "official_file_sha256": file_hashes,
            "env": outputs["meta"]["env"], "seed": args.seed, "run_seed": run_seed,
            "generator": "tools/parity/make_bayes_pfl_set.py"}
    orun.write_set(out, files, info)
    orun.finish(out, work, timings["total"])


if __name__ == "__main__":
    main()
