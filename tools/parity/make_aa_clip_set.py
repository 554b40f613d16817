"""Make an AA-CLIP parity set with the official code (Mwxinnn/AA-CLIP, commit 53db195), any seed.

The set has the format of ``../shared/parity/aa_clip`` (see its README.md): the official ``test.py``
(``--dataset BTAD`` and ``--dataset Brain``) and ``train.py`` (one step of each stage) run unmodified,
as ``__main__``, importing the official code from ``--src`` (an export of the official repository;
nothing of it is copied here). The run-time patches are those the shared set's ``run_info.json``
lists; intermediate tensors are caught by wrappers that only observe.

    git --git-dir <mirror> archive 53db195f230442aa118c246876c94ba1c76139cc | tar x -C /tmp/aaclip_off
    python tools/parity/make_aa_clip_set.py --src /tmp/aaclip_off --out /tmp/parity_seeds/seed7 --seed 7

``--seed S`` draws the narrow CLIP from ``torch.manual_seed(S)``, the adapters from ``S + 1`` and the
images from ``numpy.random.default_rng(S + 2)``; the official scripts' own ``--seed`` (data-loader
shuffling and training augmentation) is ``--run-seed``, by default ``111 + S - 100`` so that
``--seed 100`` remakes the shared set (its README names seeds 100, 101, 102 and the default 111).
The set goes to ``<out>/aa_clip``.
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official_run as orun
from narrow_clip import clip_cfg, narrow_config, write_narrow_clip

COMMIT = "53db195f230442aa118c246876c94ba1c76139cc"
WIDTH = 64
NARROW = narrow_config(WIDTH, WIDTH, WIDTH, text_heads=2, vision_head_width=32)  # 2 heads a tower
OFFICIAL_CONFIG = {"embed_dim": 768, "vision_cfg": {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}}
WIDTH_MAP = {1024: WIDTH, 768: WIDTH}
MEAN, STD = torch.tensor(orun.CLIP_MEAN), torch.tensor(orun.CLIP_STD)
OFFICIAL_FILES = ["test.py", "train.py", "forward_utils.py", "utils.py", "dataset/__init__.py", "dataset/constants.py",
                  "model/adapter.py", "model/adapter_modules.py", "model/clip.py", "model/openai.py", "model/model.py",
                  "model/transformer.py", "model/tokenizer.py", "model/model_configs/ViT-L-14-336.json"]
# set layout (README section 5): BTAD classes 01: raw [0, 1], 02: [2], 03: [3]; Brain: raw [0, 1];
# VisA training set: candle (raw 1, anomalous), pcb1 (raw 0, normal)
TEST_SET = {"01": [0, 1], "02": [2], "03": [3]}
MEDICAL_SET = {"Brain": [0, 1]}
TRAIN_SET = [("candle", 1), ("pcb1", 0)]
PATCHES = [
    ("stub module pkg_resources (model/tokenizer.py uses only pkg_resources.packaging.version; the installed "
     "setuptools ships no pkg_resources)"),
    ("stub module ipdb (imported by train.py, forward_utils.py, model/transformer.py, model/adapter_modules.py; "
     "never called)"),
    ("model.clip._MODEL_CKPT_PATHS['ViT-L-14-336'] -> local TorchScript archive of the narrow random CLIP "
     "(official: model/ViT-L-14-336px.pt, not in the repository)"),
    ("model.clip._MODEL_CONFIGS['ViT-L-14-336'] (read from model_configs/ViT-L-14-336.json) -> narrow config "
     + json.dumps(NARROW)),
    ("model/adapter.py hard-coded widths: the names SimpleAdapter/SimpleProj inside model.adapter are wrapped to map "
     "the constructor widths {1024: 64, 768: 64} (vision width 1024 -> 64, text width = embed dim 768 -> 64); the "
     "modules are the official classes"),
    ("dataset.constants.DATA_PATH[BTAD|Brain|VisA] -> temp data roots (official: absolute paths under "
     "/data/wenxinma); the process cwd is a temp dir holding ./dataset/metadata/<name>/full-shot.jsonl (read "
     "relative to the cwd by dataset/__init__.py)"),
    ("test.py only: pandas.DataFrame.mean defaults to numeric_only=True (the pandas<2 behaviour of dropping the "
     "string column; pandas>=2 raises in test.py's final `df.mean()` summary line, after all metrics)"),
]


# ----------------------------------------------------------------------------- data
def write_data(root: Path, run_dir: Path, images: np.ndarray, masks: np.ndarray) -> dict:
    """BTAD / Brain / VisA folders and the official ``full-shot.jsonl`` metadata (read from the cwd)."""
    from PIL import Image

    layout: dict[str, list[dict]] = {"BTAD": [], "Brain": [], "VisA": []}
    file_names = []
    for name, raws in TEST_SET.items():
        for raw in raws:
            kind = "defect" if orun.DEFECTS[raw] else "good"
            layout["BTAD"].append({"raw": raw, "class_name": name, "image_path": f"{name}/test/{kind}/{raw:03d}.png",
                                   "mask_path": f"{name}/ground_truth/{kind}/{raw:03d}.png"})
            file_names.append(f"{name}/test/{kind}/{raw:03d}.png")
    for name, raws in MEDICAL_SET.items():
        for raw in raws:
            kind = "Ungood" if orun.DEFECTS[raw] else "good"
            layout["Brain"].append({"raw": raw, "class_name": name, "image_path": f"test/{kind}/img/{raw:03d}.png",
                                    "mask_path": f"test/{kind}/label/{raw:03d}.png"})
    for name, raw in TRAIN_SET:
        kind = "Anomaly" if orun.DEFECTS[raw] else "Normal"
        layout["VisA"].append({"raw": raw, "class_name": name, "image_path": f"{name}/Data/Images/{kind}/{raw:03d}.png",
                               "mask_path": f"{name}/Data/Masks/{kind}/{raw:03d}.png"})
    roots = {}
    for dataset, entries in layout.items():
        data_root = root / dataset
        roots[dataset] = str(data_root)
        lines = []
        for entry in entries:
            raw, label = entry["raw"], int(orun.DEFECTS[entry["raw"]] is not None)
            (data_root / entry["image_path"]).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[raw]).save(data_root / entry["image_path"])
            line = {"image_path": entry["image_path"], "label": float(label), "class_name": entry["class_name"]}
            if label:
                (data_root / entry["mask_path"]).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(masks[raw], mode="L").save(data_root / entry["mask_path"])
                line["mask_path"] = entry["mask_path"]
            lines.append(json.dumps(line))
        meta = run_dir / "dataset" / "metadata" / dataset / "full-shot.jsonl"
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text("\n".join(lines) + "\n")
    return {"roots": roots, "file_names": file_names}


def decode(u8: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
    """The README's decoding of stored images (bitwise the model input)."""
    x = u8.float().div(255).sub(MEAN[:, None, None]).div(STD[:, None, None])
    return x if fill is None else x.masked_fill(fill.bool()[:, None], 0.0)


def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Model input [B,3,H,W] (normalised uint8 pixels or the rotation fill 0) -> (uint8, fill)."""
    table = decode(torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256))[:, 0]  # [3, 256]
    fill = (x == 0).all(dim=1)
    u8 = torch.empty(x.shape, dtype=torch.uint8)
    for c in range(3):
        index = torch.searchsorted(table[c].contiguous(), x[:, c].contiguous()).clamp(0, 255)
        u8[:, c] = index.to(torch.uint8)
    u8[fill[:, None].expand_as(u8)] = 0
    if not torch.equal(decode(u8, fill), x):
        raise SystemExit("a training image is not a normalised uint8 image with a zero fill")
    return u8, fill


# ----------------------------------------------------------------------------- patches
def install_stubs() -> None:
    from packaging import version

    pkg = types.ModuleType("pkg_resources")
    pkg.packaging = types.SimpleNamespace(version=version)
    sys.modules["pkg_resources"] = pkg
    sys.modules["ipdb"] = types.ModuleType("ipdb")


def numeric_mean(orig):
    def mean(self, axis=0, skipna=True, numeric_only=True, **kwargs):
        return orig(self, axis=axis, skipna=skipna, numeric_only=numeric_only, **kwargs)
    return mean


def main() -> None:  # noqa: C901
    parser = orun.generator_parser(__doc__, "aa_clip", COMMIT, threads=False)
    parser.add_argument("--run-seed", type=int, default=None, help="official --seed (default 111 + seed - 100)")
    args = parser.parse_args()
    run_seed = 111 + args.seed - 100 if args.run_seed is None else args.run_seed
    out, timings, start = orun.start_set(args, "aa_clip")
    src = args.src.resolve()
    file_hashes = {name: orun.sha256(src / name) for name in OFFICIAL_FILES}

    work, _ = orun.work_dir("aa_clip")  # the official code is imported from --src itself (it writes nothing there)
    run_dir = work / "run"
    run_dir.mkdir()
    with orun.timed(timings, "build_clip"):
        _, archive = write_narrow_clip(args.seed, NARROW, out, work)
    images, masks = orun.make_images(args.seed + 2, 4)
    data = write_data(work / "data", run_dir, images, masks)

    install_stubs()
    sys.path.insert(0, str(src))
    os.chdir(run_dir)
    import forward_utils
    import model.adapter as adapter_module
    import model.clip as clip_module
    import model.model as model_module
    import pandas
    from dataset import BaseDataset, BaseSingleClassDataset
    from dataset import constants as constants_module

    clip_module._MODEL_CKPT_PATHS["ViT-L-14-336"] = archive
    clip_module._MODEL_CONFIGS["ViT-L-14-336"] = json.loads(json.dumps(NARROW))
    constants_module.DATA_PATH.update(data["roots"])
    official_adapter, official_proj = adapter_module.SimpleAdapter, adapter_module.SimpleProj
    adapter_module.SimpleAdapter = lambda c_in, c_out=768: official_adapter(WIDTH_MAP[c_in], WIDTH_MAP[c_out])
    adapter_module.SimpleProj = lambda c_in, c_out=768, relu=True: official_proj(WIDTH_MAP[c_in], WIDTH_MAP[c_out],
                                                                                  relu)
    official_adapted = adapter_module.AdaptedCLIP

    # 1. the adapters (README section 2: manual_seed(S+1), xavier_uniform_ on text then image adapter)
    t0 = time.time()
    clip_model = clip_module.create_model(model_name="ViT-L-14-336", img_size=518, device="cpu", pretrained="openai",
                                          require_pretrained=True)
    adapted = official_adapted(clip_model=clip_model, relu=False)
    torch.manual_seed(args.seed + 1)
    randomised = []
    for part in ("text_adapter", "image_adapter"):
        for name, param in getattr(adapted, part).named_parameters():
            torch.nn.init.xavier_uniform_(param)
            randomised.append(f"{part}.{name}")
    text_path, image_path = out / "text_adapter.pth", out / "image_adapter_1.pth"
    torch.save({"epoch": 1, "text_adapter": adapted.text_adapter.state_dict(),
                "text_optimizer": torch.optim.Adam(adapted.text_adapter.parameters(), lr=1e-5,
                                                   betas=(0.5, 0.999)).state_dict()}, text_path)
    torch.save({"epoch": 1, "image_adapter": adapted.image_adapter.state_dict(),
                "image_optimizer": torch.optim.Adam(adapted.image_adapter.parameters(), lr=5e-4,
                                                    betas=(0.5, 0.999)).state_dict()}, image_path)
    golden_text = adapted.text_adapter.state_dict()
    golden_image = adapted.image_adapter.state_dict()
    del adapted, clip_model
    timings["build_adapters"] = round(time.time() - t0, 2)

    # 2. observation wrappers (they return what they get)
    state: dict = {"phase": None, "stage": 0, "adapted": [], "models": []}
    rec: dict = {}

    def log(key: str, value) -> None:
        rec.setdefault(f"{state['phase']}:{key}", []).append(value)

    def det(t):
        return t.detach().clone()

    class ObservedAdaptedCLIP(official_adapted):
        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            state["adapted"].append(self)
            if state["phase"] == "train":
                self.text_adapter.load_state_dict(golden_text)
                self.image_adapter.load_state_dict(golden_image)

        def forward(self, x):
            seg, det_token = super().forward(x)
            log(f"forward{state['stage']}", ([det(t) for t in seg], det(det_token)))
            return seg, det_token

        def encode_text(self, text, adapt_text=True):
            result = super().encode_text(text, adapt_text)
            log(f"encode_text{state['stage']}", (text.clone(), det(result)))
            return result

    def wrap_create_model(orig):
        def create_model(*a, **k):
            model = orig(*a, **k)
            state["models"].append(model)
            return model
        return create_model

    def wrap_encode_image(orig):
        def encode_image(self, image, out_layers, normalize=False):
            result = orig(self, image, out_layers, normalize)
            log(f"encode_image{state['stage']}", (list(out_layers), det(result[0]), [det(t) for t in result[1]]))
            return result
        return encode_image

    def wrap_text_embedding(orig):
        def get_adapted_text_embedding(model, dataset_name, device):
            if state["phase"] == "train":
                state["stage"] = 2
            result = orig(model, dataset_name, device)
            log("text_embeddings", {k: det(v) for k, v in result.items()})
            return result
        return get_adapted_text_embedding

    def wrap_similarity(orig):
        def calculate_similarity_map(patch_features, epoch_text_feature, img_size, test=False, domain="Medical"):
            result = orig(patch_features, epoch_text_feature, img_size, test=test, domain=domain)
            log(f"similarity{state['stage']}", (det(patch_features), det(epoch_text_feature), det(result)))
            return result
        return calculate_similarity_map

    def wrap_blur(orig):
        def gaussian_blur2d(x, kernel_size, sigma, *a, **k):
            result = orig(x, kernel_size, sigma, *a, **k)
            log("blur", (det(x), det(result), {"kernel_size": tuple(kernel_size), "sigma": tuple(sigma)}))
            return result
        return gaussian_blur2d

    def wrap_metrics(orig):
        def metrics_eval(pixel_label, image_label, pixel_preds, image_preds, class_names, domain):
            log("metrics_in", (np.array(pixel_label, copy=True), np.array(image_label, copy=True),
                               np.array(pixel_preds, copy=True), np.array(image_preds, copy=True), class_names))
            state["roc"] = []
            result = orig(pixel_label, image_label, pixel_preds, image_preds, class_names, domain)
            log("metrics", (dict(result), list(state["roc"])))
            return result
        return metrics_eval

    def wrap_roc(orig):
        def roc_auc_score(y_true, y_score, *a, **k):
            state.setdefault("roc", []).append(np.array(y_score, copy=True))
            return orig(y_true, y_score, *a, **k)
        return roc_auc_score

    def wrap_getitem(orig):
        def getitem(self, idx):
            item = orig(self, idx)
            log("items", (type(self).__name__, getattr(self, "text", None), idx, det(item["image"]),
                          det(item["mask"]), item["label"], item["class_name"]))
            return item
        return getitem

    def wrap_loss(kind):
        def make(orig):
            def forward(self, *a):
                value = orig(self, *a)
                if state["phase"] == "train":
                    log(f"{kind}{state['stage']}", det(value))
                return value
            return forward
        return make

    def wrap_cross_entropy(orig):
        def cross_entropy(logits, target, *a, **k):
            value = orig(logits, target, *a, **k)
            log(f"cross_entropy{state['stage']}", (det(logits), target.clone(), det(value)))
            return value
        return cross_entropy

    def wrap_backward(orig):
        def backward(self, *a, **k):
            if state["phase"] == "train":
                log(f"loss{state['stage']}", det(self))
            return orig(self, *a, **k)
        return backward

    def wrap_step(orig):
        def step(self, *a, **k):
            if state["phase"] != "train":
                return orig(self, *a, **k)
            names = {id(p): n for n, p in state["adapted"][-1].named_parameters()}
            params = [p for group in self.param_groups for p in group["params"]]
            grads = {names[id(p)]: det(p.grad) for p in params}
            result = orig(self, *a, **k)
            log(f"adam{state['stage']}", (grads, [g["lr"] for g in self.param_groups],
                                          {names[id(p)]: det(p) for p in params}))
            return result
        return step

    from forward_utils import BinaryDiceLoss, FocalLoss

    wrappers = [
        (clip_module, "create_model", wrap_create_model),
        (model_module.CLIP, "encode_image", wrap_encode_image),
        (forward_utils, "get_adapted_text_embedding", wrap_text_embedding),
        (forward_utils, "calculate_similarity_map", wrap_similarity),
        (forward_utils, "gaussian_blur2d", wrap_blur),
        (forward_utils, "metrics_eval", wrap_metrics),
        (forward_utils, "roc_auc_score", wrap_roc),
        (BaseDataset, "__getitem__", wrap_getitem),
        (BaseSingleClassDataset, "__getitem__", wrap_getitem),
        (FocalLoss, "forward", wrap_loss("focal")),
        (BinaryDiceLoss, "forward", wrap_loss("dice")),
        (torch.nn.functional, "cross_entropy", wrap_cross_entropy),
        (torch.Tensor, "backward", wrap_backward),
        (torch.optim.Adam, "step", wrap_step),
    ]
    ckpt_dir = run_dir / "ckpt"
    train_dir = run_dir / "train_ckpt"
    ckpt_dir.mkdir()
    shutil.copyfile(text_path, ckpt_dir / "text_adapter.pth")
    shutil.copyfile(image_path, ckpt_dir / "image_adapter_1.pth")
    adapter_module.AdaptedCLIP = ObservedAdaptedCLIP
    try:
        with contextlib.ExitStack() as stack:
            orun.patch_all(stack, wrappers)
            sink = io.StringIO()
            stack.enter_context(contextlib.redirect_stdout(sink))
            stack.enter_context(contextlib.redirect_stderr(sink))
            # 3. official test.py (BTAD, then Brain), then train.py (one step of each stage)
            for dataset in ("BTAD", "Brain"):
                t0 = time.time()
                state.update(phase=f"test_{dataset}", stage=0)
                with orun.patched(pandas.DataFrame, "mean", numeric_mean):
                    orun.run_main(src / "test.py", ["--dataset", dataset, "--save_path", str(ckpt_dir), "--seed",
                                               str(run_seed)])
                timings[f"official_test_py_{dataset}"] = round(time.time() - t0, 2)
            t0 = time.time()
            state.update(phase="train", stage=1)
            orun.run_main(src / "train.py", ["--training_mode", "full_shot", "--text_epoch", "1", "--image_epoch", "1",
                                        "--save_path", str(train_dir), "--seed", str(run_seed)])
            timings["official_train_py"] = round(time.time() - t0, 2)
    finally:
        adapter_module.AdaptedCLIP = official_adapted
    threads = torch.get_num_threads()

    # 4. the set
    tok = torch.arange(0, 1369, 8)
    idx = orun.UPSAMPLED_INDEX

    def sub(maps: torch.Tensor) -> torch.Tensor:
        return maps[..., idx, :][..., idx]

    def test_outputs(phase: str) -> dict:
        forwards = rec[f"{phase}:forward0"]
        seg = [torch.cat([f[0][level] for f in forwards]) for level in range(4)]
        det_feature = torch.cat([f[1] for f in forwards])
        blur = rec[f"{phase}:blur"]
        sims = rec[f"{phase}:similarity0"]
        n_batches = len(forwards)
        raw = torch.stack([torch.cat([blur[b * 4 + level][0][:, 0] for b in range(n_batches)]) for level in range(4)])
        blurred = torch.stack([torch.cat([blur[b * 4 + level][1][:, 0] for b in range(n_batches)])
                               for level in range(4)])
        up = torch.stack([torch.cat([sims[b * 4 + level][2][:, 0] for b in range(n_batches)]) for level in range(4)])
        metrics_in = rec[f"{phase}:metrics_in"]
        preds = torch.cat([torch.from_numpy(m[2]) for m in metrics_in])
        pred_raw = torch.cat([torch.from_numpy(m[3]) for m in metrics_in])
        normalised, finals, rows = [], [], []
        for (row, rocs), m_in in zip(rec[f"{phase}:metrics"], metrics_in, strict=True):
            normalised.append(torch.from_numpy(rocs[0]).reshape(m_in[2].shape))
            finals.append(torch.from_numpy(np.asarray(rocs[1], dtype=np.float64)) if len(rocs) > 1 else None)
            rows.append(row)
        return {"text_embeddings": rec[f"{phase}:text_embeddings"][0], "det_feature": det_feature,
                "image_pred_raw": pred_raw, "seg": seg, "patch_map_raw": raw, "patch_map_blurred": blurred,
                "patch_map_upsampled_sub": sub(up), "preds": preds,
                "pixel_preds_normalized_sub": sub(torch.cat(normalised)), "image_scores_final": finals,
                "metrics": rows, "blur_kwargs": blur[0][2]}

    btad, brain = test_outputs("test_BTAD"), test_outputs("test_Brain")
    test_items = rec["test_BTAD:items"]
    resized = []
    from PIL import Image

    for raw in [r for raws in TEST_SET.values() for r in raws]:
        pil = Image.fromarray(images[raw]).resize((518, 518), Image.BICUBIC)
        resized.append(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))
    resized_u8 = torch.stack(resized)
    if not torch.equal(decode(resized_u8), torch.stack([it[3] for it in test_items])):
        raise SystemExit("stored test images do not decode to the official model input")
    test_raw_index = torch.tensor([r for raws in TEST_SET.values() for r in raws])
    inputs = {
        "raw_images_uint8": torch.from_numpy(images), "raw_masks_uint8": torch.from_numpy(masks),
        "raw_labels": torch.tensor([int(d is not None) for d in orun.DEFECTS]),
        "test_raw_index": test_raw_index, "test_class": [c for c, raws in TEST_SET.items() for _ in raws],
        "test_images_resized_uint8": resized_u8,
        "test_masks_packed": orun.pack_bits(torch.stack([it[4] for it in test_items])),
        "medical_raw_index": torch.tensor(MEDICAL_SET["Brain"]),
        "meta": {"test_dataset": "BTAD", "medical_dataset": "Brain", "train_dataset": "VisA", "test_set": TEST_SET,
                 "medical_set": MEDICAL_SET, "train_set": TRAIN_SET, "defects": orun.DEFECTS,
                 "data_seed": args.seed + 2,
                 "file_names": data["file_names"]},
    }
    first_text = rec["test_BTAD:encode_text0"][:2]
    visual = state["adapted"][0].image_encoder
    outputs = {
        "text_embeddings": btad["text_embeddings"],
        "sentence_tokens_class01": [t[0] for t in first_text],
        "sentence_features_class01": [t[1] for t in first_text],
        "visual_positional_embedding_resized": visual.positional_embedding.detach().clone(),
        "det_feature": btad["det_feature"], "image_pred_raw": btad["image_pred_raw"], "patch_token_index": tok,
        "seg_tokens_sub": torch.stack([s[:, tok] for s in btad["seg"]]),
        "patch_map_raw": btad["patch_map_raw"], "patch_map_blurred": btad["patch_map_blurred"],
        "upsampled_sub_index": idx, "patch_map_upsampled_sub": btad["patch_map_upsampled_sub"],
        "preds_sub": sub(btad["preds"]), "preds_full_image1": btad["preds"][1].clone(),
        "pixel_preds_normalized_sub": btad["pixel_preds_normalized_sub"],
        "image_scores_final": btad["image_scores_final"], "metrics": btad["metrics"],
        "blur_kwargs": btad["blur_kwargs"],
        "variant_medical_brain": {key: brain[key] for key in (
            "text_embeddings", "det_feature", "image_pred_raw", "patch_map_blurred")}
        | {"preds_sub": sub(brain["preds"])}
        | {key: brain[key] for key in ("pixel_preds_normalized_sub", "image_scores_final", "metrics", "blur_kwargs")},
        "meta": {
            "official_commit": COMMIT, "official_file_sha256": file_hashes,
            "test_argv": "test.py --dataset BTAD --save_path <ckpt dir>; and --dataset Brain; every other option "
                         f"default (--seed {run_seed})",
            "official_model_config": OFFICIAL_CONFIG, "narrow_model_config": NARROW,
            "width_map": WIDTH_MAP,
            "clip_cfg": clip_cfg(NARROW, args.seed),
            "adapter_seed": args.seed + 1,
            "adapter_init": "torch.manual_seed(seed); xavier_uniform_ on text_adapter params then image_adapter "
                            "params (named_parameters order)",
            "randomised": randomised, "img_size": 518, "levels": [6, 12, 18, 24], "text_adapt_until": 3,
            "image_adapt_until": 6, "text_adapt_weight": 0.1, "image_adapt_weight": 0.1, "relu": False,
            "token_stride": 8, "pix_stride": 9, "torch_num_threads_during_runs": threads, "run_seed": run_seed,
            "env": {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0]},
            "patches": PATCHES, "generator": "tools/parity/make_aa_clip_set.py",
        },
    }

    # training: items of stage 1 (text dataset) and stage 2 (image dataset), in batch order
    items = rec["train:items"]
    stage_items = {1: [it for it in items if it[1] is True], 2: [it for it in items if it[1] is False]}

    def batch(stage: int) -> dict:
        chosen = stage_items[stage]
        x = torch.stack([it[3] for it in chosen])
        u8, fill = encode(x)
        return {"class_names": [it[6] for it in chosen], "labels": torch.stack([torch.as_tensor(it[5]) for it in chosen]),
                "images_uint8": u8, "images_fill_packed": orun.pack_bits(fill),
                "masks_packed": orun.pack_bits(torch.stack([it[4] for it in chosen]))}

    def terms(stage: int) -> dict:
        focal = torch.stack(rec[f"train:focal{stage}"])
        dice = rec[f"train:dice{stage}"]
        sims = rec[f"train:similarity{stage}"]
        return {"seg_probs_upsampled_sub": sub(torch.stack([s[2] for s in sims])), "focal": focal,
                "dice_normal": torch.stack(dice[0::2]), "dice_anomalous": torch.stack(dice[1::2])}

    def adam(stage: int) -> dict:
        grads, lrs, after = rec[f"train:adam{stage}"][0]
        return {"grads": grads, "lr": lrs, "params_after_step": after}

    encode1 = rec["train:encode_image1"]
    surgery = next(e for e in encode1 if e[0] == [6, 12, 18, 24])
    plain = next(e for e in encode1 if e[0] == [])
    sims1 = rec["train:similarity1"]
    text1 = sims1[0][1]
    cls_token = plain[1] / plain[1].norm(dim=-1, keepdim=True)
    stage1 = batch(1) | {
        "surgery_tokens_sub": torch.stack([t[:, tok] for t in surgery[2]]),
        "cls_token_normalized": cls_token,
        "patch_features": torch.stack([s[0][:, tok] for s in sims1]),
        "patch_token_index_note": "patch_features/seg_tokens use tokens tok of the 1369 patch tokens; "
                                  "surgery_tokens_sub indexes the 1370-token sequence",
        "epoch_text_feature": text1,
    } | terms(1) | {
        "orthogonal_loss": ((text1[:, :, 0] * text1[:, :, 1]).sum(1).mean()) ** 2, "text_norm_weight": 0.1,
        "loss": rec["train:loss1"][0],
    } | adam(1)
    forward2 = rec["train:forward2"][0]
    cross = rec["train:cross_entropy2"][0]
    stage2 = batch(2) | {
        "text_embeddings": rec["train:text_embeddings"][0], "epoch_text_feature": rec["train:similarity2"][0][1],
        "det_feature": forward2[1], "seg_tokens_sub": torch.stack([s[:, tok] for s in forward2[0]]),
        "cls_logits": cross[0], "cls_loss": cross[2],
    } | terms(2) | {"loss": rec["train:loss2"][0]} | adam(2)
    train_step = {
        "stage1_text": stage1, "stage2_image": stage2, "patch_token_index": tok, "upsampled_sub_index": idx,
        "checkpoint_text_adapter_after": torch.load(train_dir / "text_adapter.pth", weights_only=True)["text_adapter"],
        "checkpoint_image_adapter_after": torch.load(train_dir / "image_adapter_1.pth",
                                                     weights_only=True)["image_adapter"],
        "meta": {"train_argv": "train.py --training_mode full_shot --text_epoch 1 --image_epoch 1 (+ --save_path); "
                               f"every other option = argparse default (--seed {run_seed})",
                 "optimizers": "Adam(text_adapter, lr=1e-5, betas=(0.5,0.999)); Adam(image_adapter, lr=5e-4, "
                               "betas=(0.5,0.999)) + MultiStepLR([16000,32000], 0.5) (no effect on step 1)",
                 "image_decode": "x = where(fill, 0, (uint8/255 - mean)/std) per channel (torch float32 ops), "
                                 "bitwise"},
    }
    timings["total"] = round(time.time() - start, 2)
    info = {"timings_s": timings, "patches": PATCHES, "official_commit": COMMIT, "official_file_sha256": file_hashes,
            "env": outputs["meta"]["env"], "seed": args.seed, "run_seed": run_seed,
            "generator": "tools/parity/make_aa_clip_set.py"}
    orun.write_set(out, {"inputs.pt": inputs, "outputs.pt": outputs, "train_step.pt": train_step}, info)
    orun.finish(out, work, timings["total"])


if __name__ == "__main__":
    main()
