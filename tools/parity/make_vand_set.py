r"""Make a VAND (APRIL-GAN) parity set with the official code (ByChelsea/VAND-APRIL-GAN, commit f13b8a6), any seed.

The set has the format of ``../shared/parity/vand`` (see its README.md): the official ``test.py`` (with the
options of ``test_zero_shot.sh``, then of ``test_few_shot.sh``) and ``train.py`` (the VisA line of
``train.sh`` with ``--epoch 1 --batch_size 2``) run unmodified, as ``__main__``, importing the official code
(its vendored ``open_clip`` included) from ``--src``, an export of the official repository; nothing of it is
copied here. The run-time patches are those the shared set's ``run_info.json`` lists; intermediate tensors
are caught by wrappers that only observe.

    git --git-dir /work/.mirror/ByChelsea+VAND-APRIL-GAN/repo archive f13b8a634e04f9fde8fa03db125b25af5695d8e1 \\
        -- . ':!exps' ':!illustration' | tar x -C /tmp/vand_off
    python tools/parity/make_vand_set.py --src /tmp/vand_off --out /tmp/parity_seeds/seed7 --seed 7

``--seed S`` draws the narrow CLIP from ``torch.manual_seed(S)``, the linear layers from ``S + 1`` and the
images (two test images, then the two-image few-shot pool) from ``numpy.random.default_rng(S + 2)``;
``--seed 100`` remakes the shared set (its README names seeds 100, 101, 102). The set goes to ``<out>/vand``.
Run it in a fresh interpreter: the official ``open_clip`` package shadows the installed one.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import official_run as orun
import torch
import torch.nn.functional as F  # noqa: N812
from narrow_clip import clip_cfg, narrow_config, write_narrow_clip

COMMIT = "f13b8a634e04f9fde8fa03db125b25af5695d8e1"
CLASS = "candle"
FEATURES = [6, 12, 18, 24]
BANK_STRIDE = 32
NARROW = narrow_config(32, 64, 64)  # the AnomalyCLIP set's CLIP: width 64 = one head, embed 32
HASHED = ["test.py", "train.py", "model.py", "few_shot.py", "prompt_ensemble.py", "dataset.py", "loss.py",
          "test_zero_shot.sh", "test_few_shot.sh", "train.sh"]


def main() -> None:  # noqa: C901
    args = orun.generator_parser(__doc__, "vand", COMMIT).parse_args()
    if "open_clip" in sys.modules:
        raise SystemExit("the installed open_clip is already imported; run this script in a fresh interpreter")
    out, timings, start = orun.start_set(args, "vand")

    work, src = orun.work_dir("vand", args.src, ("__pycache__", "exps", "illustration"))
    file_hashes = {name: orun.sha256(src / name) for name in HASHED}
    file_hashes |= {str(p.relative_to(src)): orun.sha256(p) for p in sorted((src / "open_clip").rglob("*"))
                    if p.is_file() and (p.parent.name == "open_clip" or p.name == "ViT-L-14-336.json")}
    data_root = work / "data"
    config_path = work / "model_configs" / "ViT-L-14-336.json"
    config_path.parent.mkdir(parents=True)
    config_path.write_text(json.dumps(NARROW))

    # 1. CLIP, data
    with orun.timed(timings, "build_clip"):
        _, archive = write_narrow_clip(args.seed, NARROW, out, work)
    rng = np.random.default_rng(args.seed + 2)
    images, masks = orun.make_images(rng, 2)
    pool, _ = orun.make_images(rng, 2, defects=False)
    paths = orun.write_single_class_test_set(data_root, images, masks, CLASS, bad="bad", train=pool)

    # 2. run-time patches (README section 7)
    patches: list[str] = []
    orun.pkg_resources_stub(patches, "prompt_ensemble.py:3 imports pkg_resources.packaging, never used; the installed "
                       "setuptools ships no pkg_resources")
    sys.path.insert(0, str(src))
    import dataset as dataset_module
    import few_shot
    import model as model_module
    import open_clip
    import prompt_ensemble
    import sklearn.metrics
    import sklearn.metrics.pairwise
    import tabulate as tabulate_module
    from loss import BinaryDiceLoss, FocalLoss
    from open_clip import model as clip_model_module
    from open_clip import openai as openai_module

    if not Path(open_clip.__file__).is_relative_to(src):
        raise SystemExit(f"open_clip resolves to {open_clip.__file__}, not the official copy")
    open_clip.add_model_config(config_path)
    patches.append("open_clip.add_model_config(<tmp>/ViT-L-14-336.json): the narrow architecture replaces the "
                   "vendored ViT-L-14-336 config (embed 768, vision 1024x24, text 768x12 heads 12); the same file "
                   "is passed as --config_path")
    openai_module.download_pretrained_from_url = lambda _url, cache_dir=None: str(archive)  # noqa: ARG005
    patches.append("open_clip.openai.download_pretrained_from_url -> local TorchScript archive of the narrow random "
                   "CLIP")
    dataset_module.Image = orun.LegacyImage(dataset_module.Image)
    patches.append("dataset.Image -> proxy emulating legacy Pillow Image.fromarray(float64 zeros, mode='L') "
                   "(dataset.py:50, normal images)")
    cpu_only = orun.cpu_only_patches(patches)

    def to_cuda_identity(orig):
        def to(self, *a, **k):
            if a and isinstance(a[0], str) and a[0].startswith("cuda") and not torch.cuda.is_available():
                return self
            return orig(self, *a, **k)
        return to

    patches.append("torch.Tensor.to('cuda') -> identity on a CUDA-less host (open_clip/transformer.py:509 out_attn = "
                   "torch.zeros([H, H]).to('cuda'); out_attn is never used)")
    norm_patch = ("train.py only: torch.Tensor.norm of a tensor that requires grad is evaluated on a clone (identical "
                  "values). train.py:122 divides that tensor in place by its own norm; the official run (CUDA "
                  "autocast) feeds norm an fp32 cast copy, in fp32 autograd raises 'modified by an inplace "
                  "operation'. Gradients equal those of the out-of-place x / x.norm()")

    # 3. the linear layers: official __init__, then N(0, 64^-0.5) weights and N(0, 0.02) biases from seed S + 1
    width, embed = NARROW["vision_cfg"]["width"], NARROW["embed_dim"]
    linear = model_module.LinearLayer(width, embed, len(FEATURES), "ViT-L-14-336")
    torch.manual_seed(args.seed + 1)
    with torch.no_grad():
        for name, param in linear.named_parameters():
            param.normal_(std=width**-0.5 if name.endswith("weight") else 0.02)
    linear_path = out / "linearlayer.pt"
    torch.save({"trainable_linearlayer": linear.state_dict()}, linear_path)
    del linear

    # 4. observation wrappers (they return what they get)
    state: dict = {"phase": None, "memory": False}
    rec: dict = {}

    def bucket() -> dict:
        return rec.setdefault(state["phase"], {"items": [], "image": [], "memory_image": [], "text": [],
                                               "interp": [], "cos": [], "auroc": [], "tables": [], "focal": [],
                                               "dice": [], "backward": [], "steps": [], "layers": [],
                                               "models": []})

    def wrap_create(orig):
        def create(*a, **k):
            result = orig(*a, **k)
            bucket()["models"].append(result)
            return result
        return create

    def wrap_encode_image(orig):
        def encode_image(self, image, out_layers, *a, **k):
            pooled, tokens = orig(self, image, out_layers, *a, **k)
            if state["phase"] is not None:  # test.py normalises pooled in place: keep a copy
                key = "memory_image" if state["memory"] else "image"
                bucket()[key].append((pooled.detach().clone(), [t.detach().clone() for t in tokens]))
            return pooled, tokens
        return encode_image

    def wrap_encode_text(orig):
        def encode_text(self, text, *a, **k):
            result = orig(self, text, *a, **k)
            if state["phase"] is not None:  # normalised in place by prompt_ensemble.py
                bucket()["text"].append((text.clone(), result.detach().clone()))
            return result
        return encode_text

    def wrap_prompt_ensemble(orig):
        def encode(*a, **k):
            result = orig(*a, **k)
            bucket()["text_features"] = {c: v.detach().clone() for c, v in result.items()}
            return result
        return encode

    def wrap_memory(orig):
        def memory(*a, **k):
            state["memory"] = True
            try:
                result = orig(*a, **k)
            finally:
                state["memory"] = False
            bucket()["memory"] = {c: [t.clone() for t in v] for c, v in result.items()}
            return result
        return memory

    def wrap_getitem(orig):
        def getitem(self, index):
            item = orig(self, index)
            bucket()["items"].append((state["memory"], index, self.data_all[index]["img_path"], item["img"].clone(),
                                      item["img_mask"].clone(), int(item["anomaly"])))
            return item
        return getitem

    def wrap_interpolate(orig):
        def interpolate(x, *a, **k):
            result = orig(x, *a, **k)
            if state["phase"] is not None and k.get("align_corners") and k.get("mode") == "bilinear":
                bucket()["interp"].append((x.detach().clone(), result.detach().clone()))
            return result
        return interpolate

    def wrap_cosine(orig):
        def cosine_similarity(x, y=None, *a, **k):
            result = orig(x, y, *a, **k)
            bucket()["cos"].append(np.array(result, copy=True))
            return result
        return cosine_similarity

    def wrap_auroc(orig):
        def roc_auc_score(y_true, y_score, *a, **k):
            bucket()["auroc"].append((np.array(y_true, copy=True), np.array(y_score, copy=True)))
            return orig(y_true, y_score, *a, **k)
        return roc_auc_score

    def wrap_tabulate(orig):
        def tabulate(rows, *a, **k):
            bucket()["tables"].append([list(r) for r in rows])
            return orig(rows, *a, **k)
        return tabulate

    def wrap_loss(key):
        def make(orig):
            def forward(self, inputs, targets):
                value = orig(self, inputs, targets)
                bucket()[key].append((value.detach().clone(), inputs.detach().clone() if key == "focal" else None))
                return value
            return forward
        return make

    def wrap_linear_init(orig):
        def init(self, *a, **k):
            orig(self, *a, **k)  # same RNG use as the official run
            if state["phase"].startswith("train"):
                self.load_state_dict(torch.load(linear_path, weights_only=True)["trainable_linearlayer"])
            bucket()["layers"].append(self)
        return init

    def layer_names() -> dict:
        return {id(p): n for n, p in bucket()["layers"][-1].named_parameters()}

    wrap_step = orun.optimizer_step(layer_names,
                                    lambda _opt, grads, _without, after: bucket()["steps"].append((grads, after)))

    common = [
        *cpu_only,
        (torch.Tensor, "to", to_cuda_identity),
        (open_clip, "create_model_and_transforms", wrap_create),
        (clip_model_module.CLIP, "encode_image", wrap_encode_image),
        (clip_model_module.CLIP, "encode_text", wrap_encode_text),
        (prompt_ensemble, "encode_text_with_prompt_ensemble", wrap_prompt_ensemble),
        (few_shot, "memory", wrap_memory),
        (dataset_module.VisaDataset, "__getitem__", wrap_getitem),
        (F, "interpolate", wrap_interpolate),
        (sklearn.metrics.pairwise, "cosine_similarity", wrap_cosine),
        (sklearn.metrics, "roc_auc_score", wrap_auroc),
        (tabulate_module, "tabulate", wrap_tabulate),
        (FocalLoss, "forward", wrap_loss("focal")),
        (BinaryDiceLoss, "forward", wrap_loss("dice")),
        (model_module.LinearLayer, "__init__", wrap_linear_init),
        (torch.Tensor, "backward", orun.bucket_observers(bucket, state)["backward"]),
        (torch.optim.Adam, "step", wrap_step),
    ]
    common_argv = ["--config_path", str(config_path), "--model", "ViT-L-14-336", "--features_list", "6", "12", "18",
                   "24", "--pretrained", "openai", "--image_size", "518"]
    runs = {
        "zero_shot": ("test.py", ["--mode", "zero_shot", "--dataset", "visa", "--data_path", str(data_root),
                                  "--checkpoint_path", str(linear_path), *common_argv]),
        "few_shot": ("test.py", ["--mode", "few_shot", "--dataset", "visa", "--data_path", str(data_root),
                                 "--checkpoint_path", str(linear_path), *common_argv, "--few_shot_features", "6", "12",
                                 "18", "24", "--k_shot", "4", "--seed", "42"]),
        "train": ("train.py", ["--dataset", "visa", "--train_data_path", str(data_root), *common_argv,
                               "--batch_size", "2", "--print_freq", "1", "--epoch", "1", "--save_freq", "1"]),
        "train_b1": ("train.py", ["--dataset", "visa", "--train_data_path", str(data_root), *common_argv,
                                  "--batch_size", "1", "--print_freq", "1", "--epoch", "1", "--save_freq", "1"]),
    }
    with orun.observed(common, work / "official_stdout.txt"):
        for phase, (script, argv) in runs.items():
            t0 = time.time()
            state["phase"] = phase
            save = work / "save" / phase
            with contextlib.ExitStack() as inner:
                if script == "train.py":
                    inner.enter_context(orun.patched(torch.Tensor, "norm", orun.norm_on_clone))
                orun.run_main(src / script, [*argv, "--save_path", str(save)])
            bucket()["save"] = save
            timings[{"zero_shot": "official_test_py_zero_shot", "few_shot": "official_test_py_few_shot",
                     "train": "official_train_py_1_step", "train_b1": "official_train_py_batch_size_1"}[phase]] = round(
                time.time() - t0, 2)
        state["phase"] = None
    patches.append(norm_patch)

    # 5. the set
    zero, few, train = rec["zero_shot"], rec["few_shot"], rec["train"]
    n_images, n_layers = len(zero["image"]), len(FEATURES)
    if n_images != 2:
        raise SystemExit(f"expected 2 test images, got {n_images}")
    tok, up = orun.TOKEN_INDEX, orun.UPSAMPLED_INDEX
    clip, _, preprocess = zero["models"][0]
    items = [it for it in zero["items"] if not it[0]]
    pooled1 = torch.cat([p for p, _ in zero["image"]])
    tokens1 = [torch.cat([t[layer] for _, t in zero["image"]]) for layer in range(n_layers)]
    with torch.no_grad(), orun.patched(torch.Tensor, "to", to_cuda_identity):  # one batch of 2 (meta only)
        pooled2, tokens2 = clip.encode_image(torch.stack([it[3] for it in items]), FEATURES)

    # zero-shot maps: the logits interpolated per image and layer, image-major
    logits_in = [x for x, _ in zero["interp"]]
    logits_up = [y for _, y in zero["interp"]]

    def per_layer(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.cat([values[i * n_layers + layer] for i in range(n_images)])
                            for layer in range(n_layers)])

    patch_logits = per_layer([x.reshape(1, 2, -1).permute(0, 2, 1) for x in logits_in])
    upsampled = per_layer(logits_up)
    per_layer_map = torch.softmax(upsampled.flatten(0, 1), dim=1)[:, 1].unflatten(0, (n_layers, n_images))

    def maps_from_auroc(b: dict) -> tuple[torch.Tensor, np.ndarray]:
        (_, pr_px), (_, pr_sp) = b["auroc"][0], b["auroc"][1]
        return torch.from_numpy(pr_px.reshape(n_images, 518, 518)), pr_sp

    zero_map, zero_scores = maps_from_auroc(zero)
    few_map, few_scores = maps_from_auroc(few)

    # few-shot: the memory draws (their pool index), the distances, their upsampling
    pool_paths = paths["train_image_paths"]
    draws = [it for it in few["items"] if it[0]]
    memory_index = torch.tensor([pool_paths.index(it[2]) for it in draws])
    pool_index = torch.unique(memory_index)
    resized = []
    for pool_id in pool_index.tolist():
        from PIL import Image

        image = Image.open(data_root / pool_paths[pool_id])
        pil = preprocess.transforms[1](preprocess.transforms[0](image)).convert("RGB")
        u8 = torch.from_numpy(np.array(pil))
        as_float = ((u8.permute(2, 0, 1).float() / 255) - torch.tensor(orun.CLIP_MEAN)[:, None, None]) / torch.tensor(
            orun.CLIP_STD)[:, None, None]
        fed = next(it[3] for it in draws if pool_paths.index(it[2]) == pool_id)
        if not torch.equal(as_float, fed):
            raise SystemExit("the memory image is not the PIL-resized uint8 image, bitwise")
        resized.append(u8)
    few_interp = [(x, y) for x, y in few["interp"] if x.shape[1] == 1]
    min_distance = torch.stack([torch.cat([few_interp[i * n_layers + layer][0].flatten(1) for i in range(n_images)])
                                for layer in range(n_layers)])
    cos_min = torch.stack([torch.from_numpy(np.min(1 - c, 0)) for c in few["cos"]])
    if not torch.equal(cos_min.reshape(n_images, n_layers, -1).transpose(0, 1), min_distance):
        raise SystemExit("few-shot distances: interpolate input != np.min(1 - cos, 0)")
    few_up = [y[0] for _, y in few_interp]  # [1, 518, 518] each, numpy in the official code
    few_layer_maps = torch.stack([torch.cat([few_up[i * n_layers + layer] for i in range(n_images)])
                                  for layer in range(n_layers)])
    few_shot_map = torch.stack([torch.from_numpy(np.sum([few_up[i * n_layers + layer].numpy()
                                                         for layer in range(n_layers)], axis=0))[0]
                                for i in range(n_images)])
    memory = few["memory"][CLASS]

    inputs = {
        "raw_images_uint8": torch.from_numpy(images), "raw_masks_uint8": torch.from_numpy(masks),
        "labels": torch.tensor([it[5] for it in items]), "images": torch.stack([it[3] for it in items]),
        "gt_masks": torch.stack([(it[4][0] > 0.5).to(torch.uint8) for it in items]),
        "memory_pool_raw_uint8": torch.from_numpy(pool), "memory_pool_resized_uint8": torch.stack(resized),
        "meta": {"defect_box_raw": (96, 160, 64, 144), "data_seed": args.seed + 2, "raw_size": 256,
                 "dataset": "visa", "cls_name": CLASS, **paths,
                 "memory_pool_note": "memory image float32 = ((u8.permute(2,0,1).float()/255) - mean)/std, bitwise"},
    }
    text_normal, text_abnormal = zero["text"][0], zero["text"][1]
    outputs = {
        "text_tokens_normal": text_normal[0].to(torch.int32), "text_tokens_abnormal": text_abnormal[0].to(torch.int32),
        "text_embeddings_normal": text_normal[1], "text_embeddings_abnormal": text_abnormal[1],
        "text_features": zero["text_features"][CLASS],
        "visual_positional_embedding_sub": clip.visual.positional_embedding.detach()[tok].clone(),
        "image_features_unnormalized": pooled1,
        "image_scores_zero_shot": torch.from_numpy(zero_scores).float(),
        "token_index": tok,
        "patch_tokens_raw_sub": torch.stack([t[:, tok] for t in tokens1]),
        "patch_logits": patch_logits,
        "upsampled_sub_index": up,
        "patch_logits_upsampled_sub": upsampled[..., up[:, None], up],
        "per_layer_map_sub": per_layer_map[..., up[:, None], up],
        "anomaly_map_zero_shot": zero_map,
        "few_shot": {
            "memory_pool_index": pool_index, "memory_index": memory_index,
            "memory_bank_sub": [bank[::BANK_STRIDE].clone() for bank in memory],
            "min_distance": min_distance,
            "per_layer_map_sub": few_layer_maps[..., up[:, None], up],
            "few_shot_map_sub": few_shot_map[:, up[:, None], up],
            "anomaly_map": few_map,
            "image_scores": torch.from_numpy(few_scores),
            "metrics_table": few["tables"][0],
        },
        "metrics_table_zero_shot": zero["tables"][0],
        "meta": {
            "official_commit": COMMIT, "official_file_sha256": file_hashes,
            "test_argv_zero_shot": "--mode zero_shot --dataset visa --data_path <path> --save_path <path> --config_path "
                                   "<path> --checkpoint_path <path> --model ViT-L-14-336 --features_list 6 12 18 24 "
                                   "--pretrained openai --image_size 518",
            "test_argv_few_shot": "--mode few_shot --dataset visa --data_path <path> --save_path <path> --config_path "
                                  "<path> --checkpoint_path <path> --model ViT-L-14-336 --features_list 6 12 18 24 "
                                  "--pretrained openai --image_size 518 --few_shot_features 6 12 18 24 --k_shot 4 "
                                  "--seed 42",
            "features_list": FEATURES, "few_shot_features": FEATURES, "k_shot": 4, "image_size": 518,
            "seed_zero_shot": 10, "seed_few_shot": 42,
            "activation_types": sorted({type(m).__name__ for m in clip.modules()
                                        if type(m).__name__ in ("GELU", "QuickGELU")}),
            "model_config": NARROW, "n_prompts_normal": len(text_normal[0]), "n_prompts_abnormal": len(text_abnormal[0]),
            "batch2_vs_batch1_maxabsdiff": {
                "pooled": (pooled2 - pooled1).abs().max().item(),
                "tokens": max((a - b).abs().max().item() for a, b in zip(tokens2, tokens1, strict=True))},
            "clip_cfg": clip_cfg(NARROW, args.seed), "linear_seed": args.seed + 1,
            "linear_init": "weight ~ N(0, 64^-0.5), bias ~ N(0, 0.02)",
            "upsampled_stride": 9, "token_stride": 8, "bank_stride": BANK_STRIDE,
            "env": orun.environment(("sklearn", "cv2", "skimage")), "patches": patches[:-1],
            "generator": "tools/parity/make_vand_set.py",
        },
    }

    def train_record(phase: str, step: int = 0, steps: int = 1) -> dict:
        """Step ``step`` of the official run ``phase`` (of ``steps``, one batch each)."""
        b = rec[phase]
        if len(b["steps"]) != steps:
            raise SystemExit(f"{phase}: expected {steps} training steps, got {len(b['steps'])}")
        focal = [v for v, _ in b["focal"][step * n_layers:(step + 1) * n_layers]]
        dice = [v for v, _ in b["dice"][step * n_layers:(step + 1) * n_layers]]
        loss = 0  # train.py:134-137, in this order
        for layer in range(n_layers):
            loss += focal[layer]
            loss += dice[layer]
        if not torch.equal(loss, b["backward"][step]):
            raise SystemExit(f"{phase}: replayed loss {loss} != official {b['backward'][step]}")
        grads, after = b["steps"][step]
        if steps == 1:  # what train.py saved after its one step (equal to ``after``)
            saved = torch.load(b["save"] / "epoch_1.pth", weights_only=True)["trainable_linearlayer"]
            after = {name: saved[name].clone() for name in after}
        items = [it for it in b["items"] if not it[0]]
        batch = len(items) // steps
        items = items[step * batch:(step + 1) * batch]
        return {"batch_order": torch.tensor([it[1] for it in items]), "labels": torch.tensor([it[5] for it in items]),
                "focal": torch.stack(focal), "dice": torch.stack(dice), "loss": loss,
                "grads": grads, "params_after_step": {name: after[name] for name in grads}}

    train_step = train_record("train")
    train_step["per_layer_prob_sub"] = torch.stack([p[..., up[:, None], up] for _, p in train["focal"]])
    # --batch_size 1: two steps of one image; the squeezed [H, W] mask makes the dice a mean over rows
    train_step["variant_batch_size_1"] = {"steps": [train_record("train_b1", step, 2) for step in range(2)],
                                          "note": "train.py --batch_size 1: one Adam step per image, in batch_order; "
                                                  "params_after_step of step 1 start step 2"}
    train_step["meta"] = {
        "train_argv": "--dataset visa --train_data_path <path> --save_path <path> --config_path <path> --model "
                      "ViT-L-14-336 --features_list 6 12 18 24 --pretrained openai --image_size 518 --batch_size 2 "
                      "--print_freq 1 --epoch 1 --save_freq 1",
        "optimizer": "torch.optim.Adam(LinearLayer.parameters(), lr=1e-3, betas=(0.5, 0.999))", "seed": 111,
        "features_list": FEATURES, "image_size": 518,
        "batch_order_note": "DataLoader(shuffle=True) after setup_seed(111): the batch is inputs.images[batch_order], "
                            "gt_masks[batch_order]",
        "patches": patches, "official_commit": COMMIT}
    timings["total"] = round(time.time() - start, 2)
    info = {"timings_s": timings, "seed": args.seed, "generator": "tools/parity/make_vand_set.py", "patches": patches,
            "src": "export of the official repository at the commit above", "official_commit": COMMIT,
            "official_file_sha256": file_hashes, "env": orun.environment(("sklearn", "cv2", "skimage"))}
    orun.write_set(out, {"inputs.pt": inputs, "outputs.pt": outputs, "train_step.pt": train_step}, info, indent=2)
    orun.finish(out, work, timings["total"])


if __name__ == "__main__":
    main()
