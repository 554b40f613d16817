"""CPU time of ONE training step (an auxiliary batch of 8 images) of the plugin's models against the
official training scripts, on the same weights and the same batch.

    python benchmarks/train_step.py --model AnomalyCLIP --official-src ~/src/AnomalyCLIP --rounds 3
    python benchmarks/train_step.py --model Vand --official-src ~/src/VAND-APRIL-GAN --rounds 3
    python benchmarks/train_step.py --model AACLIP --stage 1 --official-src ~/src/AA-CLIP   # text stage
    python benchmarks/train_step.py --model AACLIP --stage 2 --official-src ~/src/AA-CLIP   # image stage
    python benchmarks/train_step.py --model AdaCLIP --official-src ~/src/AdaCLIP
    python benchmarks/train_step.py --model BayesPFL --stage 1 --official-src ~/src/Bayes-PFL --rounds 3
    python benchmarks/train_step.py --backbone zsad-narrow-L14-336 --image-size 112 --runs 2 ...  # quick run
    python benchmarks/train_step.py --model AdaCLIP --backbone zsad-square --image-size 112 --runs 2 \
        --architecture '{"embed_dim": 64, "vision_cfg": {"image_size": 336, "layers": 24, "width": 64,
        "patch_size": 14}, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1,
        "layers": 12}}' ...   # quick run of AdaCLIP or BayesPFL (their official code wants embed = text width)

The parent process builds the model once (``latency.prepare``: seed 0, random CLIP, rounded to fp16 and
written with our learnt parts in the official formats when ``--official-src`` is given) and one batch
(seed 0): ``--batch-size`` CLIP-normalised images [B, 3, S, S], every other one anomalous with a random
rectangular mask, all named after the model's class word. Each side then runs in a subprocess of its own
(``--threads`` threads), rebuilds or loads those weights, takes one warm-up step and ``--runs`` timed
steps; ``--rounds N`` alternates the sides N times, each in a fresh process, and pools the times. The
table gives min / median / max seconds per step, images per second at the median, peak resident memory,
the speed-up (official median / ours), the loss of the first step (before any update: equal inputs and
weights should give equal losses) and the share of learnt tensors the warm-up step changed.

What one step is, per side (official sizes: the defaults of each official ``train.py``/``train.sh``; the
plugin's defaults are the same):

* ours: the plugin's Lightning module as ``anomalib train`` runs it, without a Trainer: ``training_step``
  on an anomalib ``ImageBatch`` (image, gt_label, gt_mask, image_path), then, for models with automatic
  optimisation (AnomalyCLIP, Vand, AdaCLIP), ``zero_grad``, ``backward`` and ``step`` of the optimiser
  from ``configure_optimizers`` (and its per-step scheduler); AA-CLIP and Bayes-PFL optimise manually
  inside ``training_step`` (their ``optimizers``/``manual_backward``/``lr_schedulers`` are given the
  optimisers of ``configure_optimizers``). ``--stage`` picks the training stage via ``current_epoch``.
* official: the body of one iteration of the official training loop, calling the official modules
  (model, prompt learner, losses, optimiser) in the order of their ``train.py``:

  - AnomalyCLIP ``train.py``: frozen ``encode_image(features_list, DPAM_layer=20)`` under no_grad,
    ``AnomalyCLIP_PromptLearner`` -> ``encode_text_learn``, image cross-entropy at 1/0.07, per layer
    ``compute_similarity``/``get_similarity_map`` with ``FocalLoss`` + 2 ``BinaryDiceLoss``, x ``lam=4``;
    Adam(1e-3, betas 0.5/0.999).
  - VAND ``train.py``: open_clip ``encode_image(image, features_list)`` under no_grad, the trainable
    ``LinearLayer``, per layer 100 x tokens @ text, bilinear, softmax, ``FocalLoss`` + ``BinaryDiceLoss``;
    Adam(1e-3). The text (``encode_text_with_prompt_ensemble``) is made before the loop, as there.
    (The official loop runs under ``torch.cuda.amp.autocast``, a no-op without CUDA; its in-place
    ``patch_tokens[layer] /= norm`` needs autocast's copy: see ``norm_of_a_copy``.)
  - AA-CLIP ``train.py``: stage 1 ``train_text_adapter`` (the adapted text embedding of the class every
    step, the surgery CLIP's ``encode_image([6, 12, 18, 24])`` and the CLS token under no_grad,
    ``calculate_similarity_map`` + ``calculate_seg_loss`` + 0.1 x orthogonality; note that the official
    loop keeps only the last level's loss; Adam(1e-5)); stage 2 ``train_image_adapter``
    (``AdaptedCLIP(image)``, cross-entropy of the detection token, ``calculate_seg_loss`` per level;
    Adam(5e-4) and its MultiStepLR). ``--model-args '{"stage1_levels": "last"}'`` makes ours do the
    official stage-1 loss (ours defaults to the paper's: all levels).
  - AdaCLIP ``train.py``: ``AdaCLIP_Trainer.train_one_batch`` itself (``clip_model(image, cls_name,
    aggregation=False)``, focal classification loss, focal + 2 Dice per map, AdamW(0.01); its forward is
    decorated with CUDA autocast, see ``norm_of_a_copy``). The official
    text prompter takes one image per call ("text layer is not compatible with multiple batches";
    train.py's default batch size is 1), so a batch of B is B official steps of one image (B optimiser
    steps against our one); its loss is then the first image's, comparable with ours at ``--batch-size 1``
    only (the table says so).
  - Bayes-PFL ``train.py``: ``Load_CLIP``'s ``encode_image`` under no_grad, ``forward_ensemble``
    (``mode="train"``), the model at ``stage``, a random prompt index, cross-entropy, the flows' KL,
    orthogonality, focal + Dice per layer (stage 2: the cross-entropy only); Adam with the official
    parameter groups and the cosine warm-up schedule.

Randomness: Bayes-PFL's step is random on both sides (flow draws, the prompt index); the sides cannot
share draws, so each round seeds both (ours: its training generator, official: ``setup_seed``'s torch,
numpy and random seeds) with the round number and the table gives the first-step loss as mean and
spread over rounds: compare spreads, not single values. AdaCLIP's official step is random too: its
training forward runs the HSF, whose sklearn ``KMeans`` has no seed (numpy's global RNG), and the image
score it gives enters the classification loss; ours is a seeded k-means. Use ``--rounds`` of 3 or more
for these two. AA-CLIP, VAND and AnomalyCLIP steps are deterministic (equal losses to float precision).

Random weights are enough for timing. Every ``torch.load`` of this script reads tensors only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import latency  # (benchmarks/latency.py: the model, the official weights, fingerprint, peak memory)
import official_code  # (benchmarks/official_code.py: the official loaders' run-time patches)

MODELS = ("AnomalyCLIP", "Vand", "AACLIP", "AdaCLIP", "BayesPFL")
SIDES = ("ours", "official")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="AnomalyCLIP", choices=MODELS)
    parser.add_argument("--backbone", default="ViT-L-14-336")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3,
                        help="timed steps after one warm-up step (0: time the first step itself, one-time costs "
                             "such as caches and the optimiser's state included, on both sides alike)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per training batch")
    parser.add_argument("--stage", type=int, default=1, choices=(1, 2),
                        help="training stage of AACLIP (1 text adapter, 2 image adapter) and BayesPFL (1 prompt "
                             "flows, 2 classifier); ignored by the others")
    parser.add_argument("--model-args", type=json.loads, default={},
                        help="JSON of extra arguments of OUR model that change no weights, e.g. "
                             "'{\"stage1_levels\": \"last\"}' for AACLIP")
    parser.add_argument("--official-src", type=Path, help="an export of the model's official repository")
    parser.add_argument("--architecture", type=json.loads,
                        help="register --backbone as this open_clip config (JSON) first: a small CLIP for a quick "
                             "check; AdaCLIP's and Bayes-PFL's official code needs embed_dim == the text width")
    parser.add_argument("--rounds", type=int, default=1, help="run the sides this many times in turn")
    parser.add_argument("--work-dir", type=Path, help="keep the weights and the batch here")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--round-index", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---- the batch -------------------------------------------------------------------------------------

def make_batch(model, batch_size: int, image_size: int, seed: int = 0) -> dict:
    """CLIP-normalised random images, every other one anomalous with a random rectangle as mask."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    raw = torch.rand(batch_size, 3, image_size, image_size, generator=gen)
    image = model.pre_processor.transform(raw).contiguous()
    label = torch.tensor([1 - i % 2 for i in range(batch_size)])
    mask = torch.zeros(batch_size, image_size, image_size)
    for i in range(batch_size):
        if label[i]:
            h, w = (int(v) for v in torch.randint(image_size // 8, image_size // 2 + 1, (2,), generator=gen))
            y, x = (int(v) for v in torch.randint(0, image_size - max(h, w) + 1, (2,), generator=gen))
            mask[i, y:y + h, x:x + w] = 1
    return {"image": image, "label": label, "mask": mask,
            "class_name": getattr(model.model, "class_name", None) or "object"}


def image_paths(batch: dict) -> list[str]:
    """MVTec-style paths whose category folder is the model's class word (so that both sides prompt alike)."""
    return [f"/aux/{batch['class_name']}/test/{'defect' if int(label) else 'good'}/{i:03d}.png"
            for i, label in enumerate(batch["label"])]


# ---- ours ------------------------------------------------------------------------------------------

def register_architecture(args: argparse.Namespace) -> None:
    """``--architecture``: the backbone's config, known to our loader (and, via official.json, to the official one)."""
    if args.architecture:
        from anomalib_zsad.clip.architecture import EXTRA_ARCHITECTURES

        EXTRA_ARCHITECTURES[args.backbone] = args.architecture


def build_ours(args: argparse.Namespace):
    """``latency.build_model`` with ``--model-args`` (arguments that change no weights)."""
    if not args.model_args:
        return latency.build_model(args)
    import anomalib_zsad.models

    model = getattr(anomalib_zsad.models, args.model)(backbone=args.backbone, pretrained=None,
                                                      image_size=args.image_size, **args.model_args).eval()
    if args.model in {"AnomalyCLIP", "GlocalCLIP"}:
        model.model.clip.set_activation("quick_gelu")
    return model


def stage_epoch(module, stage: int) -> int:
    """The ``current_epoch`` at which the module trains ``stage``."""
    if stage == 1:
        return 0
    for name in ("text_epochs", "stage1_epochs"):
        if hasattr(module, name):
            return int(getattr(module, name))
    return 0


def ours_step(args: argparse.Namespace, work: Path, batch: dict):
    """One training step of our Lightning module, as Lightning runs it (no Trainer)."""
    import torch
    from anomalib.data import ImageBatch

    torch.manual_seed(0)  # the weights latency.prepare() built (and gave the official code)
    module = build_ours(args)
    if (work / "official.json").exists():
        official_code.round_to_fp16(module.model.clip)
    if (work / "fingerprint.json").exists() and \
            latency.fingerprint(module.model) != json.loads((work / "fingerprint.json").read_text()):
        raise RuntimeError("the rebuilt model differs from the one whose weights the official code got")
    epoch = stage_epoch(module, args.stage)
    cls = type(module)  # current_epoch without a Trainer (Lightning reads it from the Trainer)
    module.__class__ = type(cls.__name__, (cls,), {"current_epoch": property(lambda _self: epoch)})
    config = module.configure_optimizers()
    optimizers, schedulers = split_optimizers(config)
    if not module.automatic_optimization:  # what the Trainer gives a manually optimising module
        module.optimizers = lambda use_pl_optimizer=True: optimizers if len(optimizers) > 1 else optimizers[0]  # noqa: ARG005
        module.lr_schedulers = lambda: (schedulers if len(schedulers) > 1 else schedulers[0]) if schedulers else None
        module.manual_backward = lambda loss, *a, **k: loss.backward(*a, **k)
    if hasattr(module.model, "train_generator"):  # Bayes-PFL: on_train_start's seeding, one seed per round
        module.on_train_start()
        module.model.train_generator.manual_seed(module.model.seed + 1 + args.round_index)
    module.train()
    data = ImageBatch(image=batch["image"], gt_label=batch["label"], gt_mask=batch["mask"].bool(),
                      image_path=image_paths(batch))

    def step() -> float:
        if module.automatic_optimization:
            loss = module.training_step(data, 0)
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss.backward()
            optimizers[0].step()
            for scheduler in schedulers:
                scheduler.step()
        else:
            loss = module.training_step(data, 0)
        return float(loss)

    learnt = [p for p in module.parameters() if p.requires_grad]
    return step, learnt


def split_optimizers(config) -> tuple[list, list]:
    """configure_optimizers' answer as (optimizers, step schedulers)."""
    import torch

    if isinstance(config, torch.optim.Optimizer):
        return [config], []
    if isinstance(config, dict):
        scheduler = config.get("lr_scheduler")
        return [config["optimizer"]], [scheduler["scheduler"] if isinstance(scheduler, dict) else scheduler] \
            if scheduler is not None else []
    optimizers, schedulers = config
    return list(optimizers), [s["scheduler"] if isinstance(s, dict) else s for s in schedulers]


# ---- official --------------------------------------------------------------------------------------

def items(batch: dict) -> dict:
    """A batch as the official data loaders give it (fresh copies: the official loops binarise in place)."""
    mask = batch["mask"][:, None].clone()
    names = [batch["class_name"]] * batch["image"].shape[0]
    return {"img": batch["image"].clone(), "img_mask": mask, "anomaly": batch["label"].clone(), "cls_name": names,
            "image": batch["image"].clone(), "mask": mask.clone(), "label": batch["label"].clone(),
            "class_name": names}


@contextlib.contextmanager
def norm_of_a_copy():
    """``x /= x.norm(...)`` on a tensor that needs a gradient (VAND's ``train.py``, AdaCLIP's
    ``proj_visual_tokens`` and ``encode_text``) works under the official code's CUDA autocast only, where
    ``norm`` runs on an fp32 copy of its fp16 input; in fp32 autograd refuses the in-place division. Here
    ``norm`` takes a copy as autocast does (same values, one copy of the tokens more)."""
    import torch

    original = torch.Tensor.norm

    def norm(self, *args, **kwargs):
        return original(self.clone() if self.requires_grad and torch.is_grad_enabled() else self, *args, **kwargs)

    torch.Tensor.norm = norm
    try:
        yield
    finally:
        torch.Tensor.norm = original


def official_anomalyclip(args: argparse.Namespace, work: Path, batch: dict):
    import torch
    import torch.nn.functional as F  # noqa: N812

    AnomalyCLIP_lib, model, learner = official_code.anomalyclip(args.official_src, work)  # noqa: N806 (its name)
    from loss import BinaryDiceLoss, FocalLoss

    optimizer = torch.optim.Adam(list(learner.parameters()), lr=0.001, betas=(0.5, 0.999))
    loss_focal, loss_dice, lam = FocalLoss(), BinaryDiceLoss(), 4
    features_list = json.loads((work / "layers.json").read_text())
    feature_map_layer = [0, 1, 2, 3]
    model.eval()
    learner.train()

    def step() -> float:
        data = items(batch)
        image, label = data["img"], data["anomaly"]
        gt = data["img_mask"].squeeze()
        gt[gt > 0.5] = 1
        gt[gt <= 0.5] = 0
        with torch.no_grad():
            image_features, patch_features = model.encode_image(image, features_list, DPAM_layer=20)
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        prompts, tokenized_prompts, compound_prompts_text = learner(cls_id=None)
        text_features = model.encode_text_learn(prompts, tokenized_prompts, compound_prompts_text).float()
        text_features = torch.stack(torch.chunk(text_features, dim=0, chunks=2), dim=1)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        text_probs = image_features.unsqueeze(1) @ text_features.permute(0, 2, 1)
        text_probs = text_probs[:, 0, ...] / 0.07
        image_loss = F.cross_entropy(text_probs.squeeze(), label.long())
        maps = []
        for idx, patch_feature in enumerate(patch_features):
            if idx >= feature_map_layer[0]:
                patch_feature = patch_feature / patch_feature.norm(dim=-1, keepdim=True)
                similarity, _ = AnomalyCLIP_lib.compute_similarity(patch_feature, text_features[0])
                maps.append(AnomalyCLIP_lib.get_similarity_map(similarity[:, 1:, :], args.image_size)
                            .permute(0, 3, 1, 2))
        loss = 0
        for similarity_map in maps:
            loss += loss_focal(similarity_map, gt)
            loss += loss_dice(similarity_map[:, 1, :, :], gt)
            loss += loss_dice(similarity_map[:, 0, :, :], 1 - gt)
        loss = lam * loss
        optimizer.zero_grad()
        (loss + image_loss).backward()
        optimizer.step()
        return float(loss + image_loss)

    return step, list(learner.parameters())


def official_vand(args: argparse.Namespace, work: Path, batch: dict):
    import numpy as np
    import torch
    import torch.nn.functional as F  # noqa: N812

    official_code.stub_modules()
    sys.path.insert(0, str(args.official_src))
    import open_clip
    from loss import BinaryDiceLoss, FocalLoss
    from model import LinearLayer
    from open_clip import openai as openai_module
    from prompt_ensemble import encode_text_with_prompt_ensemble

    archive = work / official_code.OPENAI_ARCHIVE  # as official_code.vand loads it
    openai_module.get_pretrained_url = lambda _name, _tag: "local"
    openai_module.download_pretrained_from_url = lambda _url, cache_dir=None: str(archive)  # noqa: ARG005
    config = json.loads((work / "official.json").read_text())
    image_size, features_list = config["image_size"], config["feature_layers"]
    if config.get("architecture"):
        (work / f"{config['open_clip_name']}.json").write_text(json.dumps(config["architecture"]))
        open_clip.add_model_config(work / f"{config['open_clip_name']}.json")
    model, _, _ = open_clip.create_model_and_transforms(config["open_clip_name"], image_size, pretrained="openai")
    tokenizer = open_clip.get_tokenizer(config["open_clip_name"])
    layer = LinearLayer(model.visual.transformer.width, model.text_projection.shape[1], len(features_list), "ViT")
    layer.load_state_dict(torch.load(work / "official-weights.pt", weights_only=True)["trainable_linearlayer"])
    optimizer = torch.optim.Adam(list(layer.parameters()), lr=0.001, betas=(0.5, 0.999))
    loss_focal, loss_dice = FocalLoss(), BinaryDiceLoss()
    with torch.no_grad(), official_code.cuda_to_identity():
        text_prompts = encode_text_with_prompt_ensemble(model, [batch["class_name"]], tokenizer, "cpu")

    def step() -> float:
        data = items(batch)
        image, cls_name = data["img"], data["cls_name"]
        with official_code.cuda_to_identity(), norm_of_a_copy():
            with torch.no_grad():
                _, patch_tokens = model.encode_image(image, features_list)
                text_features = torch.stack([text_prompts[cls] for cls in cls_name], dim=0)
            patch_tokens = layer(patch_tokens)
            anomaly_maps = []
            for i in range(len(patch_tokens)):
                patch_tokens[i] /= patch_tokens[i].norm(dim=-1, keepdim=True)
                anomaly_map = 100.0 * patch_tokens[i] @ text_features
                b, length, _ = anomaly_map.shape
                h = int(np.sqrt(length))
                anomaly_map = F.interpolate(anomaly_map.permute(0, 2, 1).view(b, 2, h, h), size=image_size,
                                            mode="bilinear", align_corners=True)
                anomaly_maps.append(torch.softmax(anomaly_map, dim=1))
        gt = data["img_mask"].squeeze()
        gt[gt > 0.5], gt[gt <= 0.5] = 1, 0
        loss = 0
        for anomaly_map in anomaly_maps:
            loss += loss_focal(anomaly_map, gt)
            loss += loss_dice(anomaly_map[:, 1, :, :], gt)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss)

    return step, list(layer.parameters())


def official_aa_clip(args: argparse.Namespace, work: Path, batch: dict):
    import torch
    import torch.nn.functional as F  # noqa: N812

    official_code.stub_modules()
    sys.path.insert(0, str(args.official_src))
    with contextlib.chdir(args.official_src):
        import forward_utils
        import model.clip as clip_module
        from model.adapter import AdaptedCLIP
    config = json.loads((work / "official.json").read_text())
    clip_module._MODEL_CKPT_PATHS[config["open_clip_name"]] = str(work / official_code.OPENAI_ARCHIVE)
    if (arch := config.get("architecture")) is not None:  # a small test architecture
        clip_module._MODEL_CONFIGS[config["open_clip_name"]] = arch  # (the official configs are ViT-B/L's)
        # AdaptedCLIP builds its adapters for ViT-L's widths (vision 1024, text = embed 768), as
        # tools/parity/make_aa_clip_set.py patches them: inputs 1024 -> vision, 768 -> text; outputs 768 -> embed
        import model.adapter as adapter_module

        widths = {1024: arch["vision_cfg"]["width"], 768: arch["text_cfg"]["width"]}
        adapter, proj = adapter_module.SimpleAdapter, adapter_module.SimpleProj
        adapter_module.SimpleAdapter = lambda c_in, c_out=768: adapter(widths[c_in], widths[c_out])
        adapter_module.SimpleProj = lambda c_in, c_out=768, relu=True: proj(  # noqa: ARG005 (always 768: embed)
            widths[c_in], arch["embed_dim"], relu)
    image_size, dataset_name = config["image_size"], "MVTec"  # "object" is class-agnostic in every data set

    def create():
        return clip_module.create_model(model_name=config["open_clip_name"], img_size=image_size, device="cpu",
                                        pretrained="openai", require_pretrained=True)

    model = AdaptedCLIP(clip_model=create().eval(), text_adapt_weight=0.1, image_adapt_weight=0.1,
                        text_adapt_until=3, image_adapt_until=6, relu=False).eval()
    model.text_adapter.load_state_dict(torch.load(work / "text_adapter.pth", weights_only=True)["text_adapter"])
    model.image_adapter.load_state_dict(torch.load(work / "image_adapter_1.pth", weights_only=True)["image_adapter"])
    if args.stage == 1:
        clip_surgery = create().eval()
        clip_surgery.visual.DAPM_replace(DPAM_layer=20)
        optimizer = torch.optim.Adam(model.text_adapter.parameters(), lr=0.00001, betas=(0.5, 0.999))

        def step() -> float:
            data = items(batch)
            image, mask, class_names = data["image"], data["mask"], data["class_name"]
            features = {name: forward_utils.get_adapted_single_class_text_embedding(model, dataset_name, name, "cpu")
                        for name in set(class_names)}
            epoch_text_feature = torch.stack([features[name] for name in class_names], dim=0)
            with torch.no_grad():
                _, patch_features = clip_surgery.encode_image(image, [6, 12, 18, 24])
                cls_token, _ = model.clipmodel.encode_image(image, [])
                cls_token = cls_token / cls_token.norm(dim=-1, keepdim=True)
                patch_features = [clip_surgery.visual.ln_post(t[:, 1:, :]) for t in patch_features]
                patch_features = [t @ clip_surgery.visual.proj for t in patch_features]
                patch_features = [t / t.norm(dim=-1, keepdim=True) for t in patch_features]
                patch_features = [t + cls_token.unsqueeze(1) for t in patch_features]
            for f in patch_features:  # (the official loop keeps the last level's loss only)
                patch_preds = forward_utils.calculate_similarity_map(f, epoch_text_feature, image_size)
                loss = forward_utils.calculate_seg_loss(patch_preds, mask)
                orthogonal_loss = ((epoch_text_feature[:, :, 0] * epoch_text_feature[:, :, 1]).sum(1).mean()) ** 2
                loss += orthogonal_loss * 0.1
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return float(loss)

        return step, list(model.text_adapter.parameters())

    optimizer = torch.optim.Adam(model.image_adapter.parameters(), lr=0.0005, betas=(0.5, 0.999))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[16000, 32000], gamma=0.5)
    with torch.no_grad():  # before the stage-2 loop (get_adapted_text_embedding, for our class)
        text_embeddings = {batch["class_name"]: forward_utils.get_adapted_single_class_text_embedding(
            model, dataset_name, batch["class_name"], "cpu")}

    def step() -> float:
        data = items(batch)
        image, mask, label = data["image"], data["mask"], data["label"]
        epoch_text_feature = torch.stack([text_embeddings[name] for name in data["class_name"]], dim=0)
        patch_features, det_feature = model(image)
        loss = 0.0
        det_feature = det_feature.unsqueeze(1)
        cls_preds = torch.matmul(det_feature, epoch_text_feature)[:, 0]
        loss += F.cross_entropy(cls_preds, label)
        for f in patch_features:
            patch_preds = forward_utils.calculate_similarity_map(f, epoch_text_feature, image_size)
            loss += forward_utils.calculate_seg_loss(patch_preds, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        return float(loss)

    return step, list(model.image_adapter.parameters())


def official_adaclip(args: argparse.Namespace, work: Path, batch: dict):
    import torch

    trainer = official_code.adaclip_trainer(args.official_src, work, learning_rate=0.01)  # train.py's default
    state = torch.load(work / "official-weights.pt", map_location="cpu", weights_only=True)
    trainer.load_state_dict(state, strict=False)  # AdaCLIP_Trainer.load, reading tensors only

    # The official text prompter takes one image at a time (adaclip.py: "text layer is not compatible with
    # multiple batches"; train.py's default --batch_size is 1): a batch of B is B official steps of 1 image.
    singles = [{key: value[i:i + 1] if key in {"image", "label", "mask"} else value
                for key, value in batch.items()} for i in range(batch["image"].shape[0])]

    def step() -> float:
        trainer.clip_model.train()  # train_epoch
        with official_code.cuda_to_identity(), norm_of_a_copy():
            losses = [float(trainer.train_one_batch(items(single))) for single in singles]
        return losses[0]

    return step, list(trainer.params_to_update)


def official_bayes_pfl(args: argparse.Namespace, work: Path, batch: dict):
    import torch
    from torch import nn

    official_code.stub_modules()
    sys.path.insert(0, str(args.official_src))
    with contextlib.chdir(args.official_src):
        from loss import DiceLoss, FocalLoss, Orthogonal_Loss
        from models.model_CLIP import Load_CLIP, tokenize
        from models.VPB import Context_Prompting, TextEncoder
    config = json.loads((work / "official.json").read_text())
    opts = argparse.Namespace(**config["args"], image_size=config["image_size"], learning_rate=0.0001,
                              learning_rate_PFL=0.001, learning_rate_prompt=0.001, learning_rate_linear=0.0001)
    model_clip, _, _ = Load_CLIP(opts.image_size, str(work / official_code.OPENAI_ARCHIVE), device="cpu")
    model_clip.eval()
    text_encoder = TextEncoder(model_clip, opts)
    my_model = Context_Prompting(args=opts)
    weights = torch.load(work / "official-weights.pt", map_location="cpu", weights_only=True)
    my_model.load_state_dict(weights["MyModel"], strict=True)
    my_model.train()
    # train.py's parameter groups (its inline loop over named_parameters)
    group1 = [m for n, m in my_model.named_parameters() if "prompt" in n]
    group3 = [m for n, m in my_model.named_parameters()
              if "prompt" not in n and "PFL" in n and "encoder" not in n and "decoder" not in n]
    group4 = [m for n, m in my_model.named_parameters() if "prompt" not in n
              and not ("PFL" in n and "encoder" not in n and "decoder" not in n) and "temperature" not in n]
    group5 = [m for n, m in my_model.named_parameters() if "class_mapping" in n or "image_mapping" in n or "fuse" in n]
    optimizer_stage1 = torch.optim.Adam(
        [{"params": group1, "lr": opts.learning_rate_prompt},
         {"params": [my_model.temperature_pixel, my_model.temperature_image], "lr": 0.01},
         {"params": group3, "lr": opts.learning_rate_PFL}, {"params": group4, "lr": opts.learning_rate_linear}],
        lr=opts.learning_rate, betas=(0.5, 0.999))
    optimizer_stage2 = torch.optim.Adam([{"params": group5, "lr": opts.learning_rate_linear}], lr=opts.learning_rate,
                                        betas=(0.5, 0.999))
    try:  # train.py's transformers.get_cosine_schedule_with_warmup; ours is the same schedule
        from transformers import get_cosine_schedule_with_warmup
    except ImportError:
        from anomalib_zsad.models.bayes_pfl.optim import cosine_with_warmup

        def get_cosine_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps):
            return cosine_with_warmup(optimizer, num_training_steps, num_warmup_steps / num_training_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer_stage1, num_warmup_steps=0, num_training_steps=1)
    loss_dice_function, loss_focal_function = DiceLoss(), FocalLoss()
    loss_ort_function, loss_cross = Orthogonal_Loss(), nn.CrossEntropyLoss()
    stage = args.stage
    optimizer = optimizer_stage1 if stage == 1 else optimizer_stage2

    def step() -> float:
        with official_code.cuda_to_identity():
            optimizer.zero_grad()
            data = items(batch)
            image, cls_name, anomaly = data["img"], data["cls_name"], data["anomaly"]
            gt = data["img_mask"].squeeze()
            gt[gt > 0.5], gt[gt < 0.5] = 1, 0
            with torch.no_grad():
                image_features, _, patch_tokens = model_clip.encode_image(image, opts.features_list)
            text_embeddings, loss_reg = my_model.forward_ensemble(text_encoder, image_features, patch_tokens, cls_name,
                                                                  "cpu", tokenize, mode="train")
            pro_img, anomaly_maps_list = my_model(text_embeddings, image_features, patch_tokens, stage=stage,
                                                  mode="train")
            pro_img = pro_img.squeeze(2)
            index_prompt = torch.randint(0, opts.prompt_num, (1, 1))[0]
            pro_img = torch.cat([pro_img[:, index_prompt], pro_img[:, index_prompt + opts.prompt_num]], dim=1)
            loss_class = loss_cross(pro_img, anomaly)
            loss_dist_reg = loss_reg[1] + loss_reg[2] + loss_reg[3]
            loss_text = loss_ort_function(text_embeddings, opts)
            loss_foc = loss_dic = 0
            for anomaly_map in anomaly_maps_list:
                select = torch.cat([anomaly_map[:, index_prompt, :, :],
                                    anomaly_map[:, index_prompt + opts.prompt_num, :, :]], dim=1)
                select = torch.softmax(select, dim=1)
                loss_foc += loss_focal_function(select.clone(), gt.clone())
                loss_dic += loss_dice_function(select, gt)
            loss_seg = loss_foc + loss_dic
            loss = loss_class + loss_seg + loss_dist_reg + loss_text if stage == 1 else loss_class
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            return float(loss)

    return step, [p for group in optimizer.param_groups for p in group["params"]]


OFFICIAL = {"AnomalyCLIP": official_anomalyclip, "Vand": official_vand, "AACLIP": official_aa_clip,
            "AdaCLIP": official_adaclip, "BayesPFL": official_bayes_pfl}


# ---- the two sides ---------------------------------------------------------------------------------

def worker(args: argparse.Namespace, work: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    register_architecture(args)
    batch = torch.load(work / "batch.pt", weights_only=True)
    if args.worker == "official":  # the official train.py's setup_seed(111), one seed per round
        import random

        import numpy as np

        torch.manual_seed(111 + args.round_index)
        np.random.seed(111 + args.round_index)  # noqa: NPY002 (the global RNG sklearn and the official code use)
        random.seed(111 + args.round_index)
    step, learnt = (ours_step if args.worker == "ours" else OFFICIAL[args.model])(args, work, batch)
    before = [p.detach().clone() for p in learnt]
    start = time.perf_counter()
    first_loss = step()  # warm-up; the loss before any update
    first_time = time.perf_counter() - start
    changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, learnt, strict=True))
    del before
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times = times or [first_time]  # --runs 0: the first step, one-time costs included, is the figure
    single_steps = args.worker == "official" and args.model == "AdaCLIP" and args.batch_size > 1
    return {"side": args.worker, "times": times, "losses": [first_loss], "changed": changed, "learnt": len(learnt),
            "peak_mib": latency.peak_rss_mib(), "loss_of": "first image" if single_steps else "batch"}


def prepare(args: argparse.Namespace, work: Path) -> None:
    """The weights (``latency.prepare``: official formats when the official side runs) and the batch."""
    import torch

    args.backends = ["official"] if args.official_src else []  # what latency.prepare reads
    latency.prepare(args, work)
    for stale in ("input.pt", "input-raw.pt"):  # latency's inference inputs, unused here
        (work / stale).unlink(missing_ok=True)
    torch.manual_seed(0)
    model = latency.build_model(args)
    torch.save(make_batch(model, args.batch_size, args.image_size), work / "batch.pt")


def run_side(side: str, args: argparse.Namespace, work: Path, round_index: int) -> dict | None:
    command = [sys.executable, __file__, "--worker", side, "--work-dir", str(work), "--model", args.model,
               "--backbone", args.backbone, "--image-size", str(args.image_size), "--threads", str(args.threads),
               "--runs", str(args.runs), "--batch-size", str(args.batch_size), "--stage", str(args.stage),
               "--model-args", json.dumps(args.model_args), "--round-index", str(round_index)]
    if args.official_src:
        command += ["--official-src", str(args.official_src)]
    if args.architecture:
        command += ["--architecture", json.dumps(args.architecture)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        print(f"{side}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def report(results: list[dict], batch_size: int) -> str:
    official = next((r for r in results if r["side"] == "official"), None)
    ours = next((r for r in results if r["side"] == "ours"), None)
    lines = [("| side | min s | median s | max s | images/s | peak MiB | speed-up vs official | first-step loss "
              "| loss diff vs official | learnt tensors changed |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        median = statistics.median(r["times"])
        ratio = f"{statistics.median(official['times']) / median:.2f}x" if official else "-"
        losses = r["losses"]
        loss = f"{losses[0]:.6g}" if len(losses) == 1 else \
            f"{statistics.mean(losses):.6g} ({min(losses):.4g} .. {max(losses):.4g})"
        diff = "-"
        if official and ours and r is ours and official.get("loss_of") == "first image":
            diff = "n/a (official: 1-image steps)"
        elif official and ours and r is ours:
            diff = f"{statistics.mean(ours['losses']) - statistics.mean(official['losses']):+.2e}"
        lines.append(f"| {r['side']} | {min(r['times']):.3g} | {median:.3g} | {max(r['times']):.3g} | "
                     f"{batch_size / median:.3g} | {r['peak_mib']:.0f} | {ratio} | {loss} | {diff} | "
                     f"{r['changed']}/{r['learnt']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args, args.work_dir)))
        return 0
    sides = ["ours", "official"] if args.official_src else ["ours"]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"preparing {args.model} {args.backbone} at {args.image_size} px (random weights), batch "
              f"{args.batch_size}, in {work} ...", flush=True)
        register_architecture(args)
        prepare(args, work)
        pooled: dict[str, dict] = {}
        failed = False
        for round_index in range(args.rounds):
            for side in sides:
                print(f"timing {side} (round {round_index + 1}/{args.rounds}) ...", flush=True)
                result = run_side(side, args, work, round_index)
                if result is None:
                    failed = True
                    continue
                print(f"  {side}: {[round(t, 3) for t in result['times']]} s, first-step loss "
                      f"{result['losses'][0]:.6g}, peak {result['peak_mib']:.0f} MiB", flush=True)
                if side in pooled:
                    pooled[side]["times"] += result["times"]
                    pooled[side]["losses"] += result["losses"]
                    pooled[side]["peak_mib"] = max(pooled[side]["peak_mib"], result["peak_mib"])
                else:
                    pooled[side] = result
        if not pooled:
            return 1
        rounds = f" in each of {args.rounds} alternating rounds" if args.rounds > 1 else ""
        stage = f", stage {args.stage}" if args.model in {"AACLIP", "BayesPFL"} else ""
        print(f"\n{args.model}{stage}, {args.backbone}, {args.image_size}x{args.image_size}, batch {args.batch_size}, "
              f"{args.threads} threads, "
              f"{f'{args.runs} timed steps after 1 warm-up' if args.runs else 'the first step timed (no warm-up)'}"
              f"{rounds}\n")
        print(report(list(pooled.values()), args.batch_size))
        if args.model in {"BayesPFL", "AdaCLIP"} and len(sides) > 1:
            why = "flow draws, prompt index" if args.model == "BayesPFL" else "the official HSF's unseeded KMeans"
            print(f"\n{args.model}'s step is random ({why}), the sides draw differently: compare the losses' "
                  "spreads over rounds (--rounds), not single values.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
