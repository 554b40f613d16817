"""The official inference paths that ``latency.py --official-src`` times against the plugin's models.

One function per method: it imports the official code from an export of its repository (``src``),
loads the weights ``latency.py`` wrote in the official formats (our random CLIP as an OpenAI
TorchScript archive, our learnt parts through each model's own ``save_official_checkpoint``-style
writer), and returns ``call(images) -> (score [B], map [B, H, W])`` computing what the official
test script computes per batch. Nothing of the official code is copied here; the run-time patches
are those of ``tools/parity/make_<method>_set.py`` (CPU-only host, absent ``pkg_resources``).
"""

from __future__ import annotations

import contextlib
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "parity"))
from narrow_clip import torchscript_archive  # the parity generators' writer of OpenAI's container

OPENAI_ARCHIVE = "clip-openai.pt"
OfficialCall = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def openai_state_dict(clip) -> dict[str, torch.Tensor]:
    """Our CLIP's weights under OpenAI's names (the text tower's ``text.`` prefix dropped)."""
    return {k.removeprefix("text."): v.detach().clone() for k, v in clip.state_dict().items()}


def write_openai_archive(clip, path: Path) -> None:
    """A TorchScript archive whose ``state_dict()`` is our CLIP in OpenAI's layout, what every official
    loader (``open_clip``'s ``load_openai_model``, AnomalyCLIP's ``load``) reads for ``pretrained=openai``.
    The official loaders convert it to fp16 and back: :func:`round_to_fp16` beforehand keeps both sides equal."""
    torchscript_archive(openai_state_dict(clip), path)


@torch.no_grad()
def round_to_fp16(module: torch.nn.Module) -> None:
    """Round every floating parameter to fp16 precision (kept in fp32): the official loaders' half() round trip."""
    for param in module.parameters():
        if param.is_floating_point():
            param.copy_(param.half().float())


def stub_modules() -> None:
    """``pkg_resources`` (imported by several official files for ``packaging``, absent with recent setuptools),
    ``ipdb`` and ``thop`` (imported, never used for inference)."""
    from packaging import version

    for name, attrs in (("pkg_resources", {"packaging": types.SimpleNamespace(version=version)}),
                        ("ipdb", {}), ("thop", {"profile": None})):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.SimpleNamespace(**attrs)


@contextlib.contextmanager
def cuda_to_identity():
    """``tensor.to('cuda')`` returns the tensor on a CUDA-less host (VAND's, AdaCLIP's and Bayes-PFL's
    vendored transformers build an unused ``out_attn`` on ``cuda``)."""
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], str) and args[0].startswith("cuda") and not torch.cuda.is_available():
            return self
        return original(self, *args, **kwargs)

    original_cuda = torch.Tensor.cuda
    torch.Tensor.to = to
    if not torch.cuda.is_available():  # Bayes-PFL's flows: torch.zeros(...).cuda()
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # noqa: ARG005
    try:
        yield
    finally:
        torch.Tensor.to = original
        torch.Tensor.cuda = original_cuda


def anomalyclip(src: Path, work: Path):
    """The official AnomalyCLIP on our weights, as its test.py and train.py set it up: ``model_load.load`` of
    the TorchScript CLIP, the prompt learner with our prompts, DPAM from layer 20. -> (``AnomalyCLIP_lib``,
    model, prompt learner)."""
    stub_modules()
    sys.path.insert(0, str(src))
    import AnomalyCLIP_lib
    from prompt_ensemble import AnomalyCLIP_PromptLearner

    details = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9, "learnabel_text_embedding_length": 4}
    model, _ = AnomalyCLIP_lib.load(str(work / "clip-torchscript.pt"), device="cpu", design_details=details)
    model.eval()
    learner = AnomalyCLIP_PromptLearner(model.to("cpu"), details)
    learner.load_state_dict(torch.load(work / "prompts.pt", weights_only=True), strict=False)
    model.visual.DAPM_replace(DPAM_layer=20)
    return AnomalyCLIP_lib, model, learner


def vand(src: Path, work: Path) -> OfficialCall:
    """VAND (APRIL-GAN) ``test.py --mode zero_shot``: open_clip's ``encode_image(image, features_list)``,
    the ``LinearLayer``, per layer ``softmax(bilinear(100 * tokens @ text))[:, 1]`` summed; the image score
    ``softmax(100 * image @ text)[:, 1]``. Text: ``encode_text_with_prompt_ensemble`` for our class name."""
    import numpy as np
    import torch.nn.functional as F  # noqa: N812

    stub_modules()
    sys.path.insert(0, str(src))
    import open_clip
    from model import LinearLayer
    from open_clip import openai as openai_module
    from prompt_ensemble import encode_text_with_prompt_ensemble

    archive = work / OPENAI_ARCHIVE
    openai_module.get_pretrained_url = lambda _name, _tag: "local"  # also for the small test architectures
    openai_module.download_pretrained_from_url = lambda _url, cache_dir=None: str(archive)  # noqa: ARG005
    config = json.loads((work / "official.json").read_text())
    size, layers, name = config["image_size"], config["feature_layers"], config["class_name"]
    if config.get("architecture"):  # a small test architecture: open_clip checks the name's image size
        (work / f"{config['open_clip_name']}.json").write_text(json.dumps(config["architecture"]))
        open_clip.add_model_config(work / f"{config['open_clip_name']}.json")
    clip, _, _ = open_clip.create_model_and_transforms(config["open_clip_name"], size, pretrained="openai")
    clip.eval()
    head = LinearLayer(clip.visual.transformer.width, clip.text_projection.shape[1], len(layers), "ViT")
    head.load_state_dict(torch.load(work / "official-weights.pt", weights_only=True)["trainable_linearlayer"])
    with torch.no_grad(), cuda_to_identity():
        text = encode_text_with_prompt_ensemble(clip, [name], open_clip.get_tokenizer(config["open_clip_name"]),
                                                "cpu")[name][None]

    def call(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), cuda_to_identity():
            features, tokens = clip.encode_image(image, layers)
            features /= features.norm(dim=-1, keepdim=True)
            score = (100.0 * features @ text[0]).softmax(dim=-1)[:, 1]
            tokens = head(tokens)
            maps = []
            for layer in range(len(tokens)):
                tokens[layer] /= tokens[layer].norm(dim=-1, keepdim=True)
                logits = 100.0 * tokens[layer] @ text
                batch, length, _ = logits.shape
                grid = int(np.sqrt(length))
                logits = F.interpolate(logits.permute(0, 2, 1).view(batch, 2, grid, grid), size=size,
                                       mode="bilinear", align_corners=True)
                maps.append(torch.softmax(logits, dim=1)[:, 1].cpu().numpy())
            return score, torch.from_numpy(np.sum(maps, axis=0))

    return call


def export_vand(model, work: Path) -> dict:
    from anomalib_zsad.models.vand import save_official_checkpoint

    save_official_checkpoint(model.model, work / "official-weights.pt")
    return {"feature_layers": list(model.model.feature_layers), "class_name": model.model.class_name}


def aa_clip(src: Path, work: Path) -> OfficialCall:
    """AA-CLIP ``test.py`` (``get_predictions``): ``AdaptedCLIP(clip)(image)`` gives the segmentation
    tokens and the detection token; score ``(det @ text)[:, 1] + 1) / 2``; map: per level
    ``calculate_similarity_map(..., test=True, domain="Industrial")`` (kornia blur 7 / 1 on the patch
    grid, bilinear upsampling), summed. Text: ``get_adapted_single_class_text_embedding`` of our class
    (``"object"`` is the official code's own class-agnostic name)."""
    stub_modules()
    sys.path.insert(0, str(src))
    with contextlib.chdir(src):  # the official modules may read files relative to the repository root
        import forward_utils
        import model.clip as clip_module
        from model.adapter import AdaptedCLIP
    config = json.loads((work / "official.json").read_text())
    clip_module._MODEL_CKPT_PATHS[config["open_clip_name"]] = str(work / OPENAI_ARCHIVE)
    clip = clip_module.create_model(model_name=config["open_clip_name"], img_size=config["image_size"],
                                    device="cpu", pretrained="openai", require_pretrained=True).eval()
    model = AdaptedCLIP(clip_model=clip, relu=False).eval()
    model.text_adapter.load_state_dict(torch.load(work / "text_adapter.pth", weights_only=True)["text_adapter"])
    model.image_adapter.load_state_dict(torch.load(work / "image_adapter_1.pth", weights_only=True)["image_adapter"])
    size, name = config["image_size"], config["class_name"]
    with torch.no_grad():
        text = forward_utils.get_adapted_single_class_text_embedding(model, "MVTec", name, "cpu")

    def call(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            patch_features, det_feature = model(image)
            pred = det_feature @ text
            score = (pred[:, 1] + 1) / 2
            maps = [forward_utils.calculate_similarity_map(f, text, size, test=True, domain="Industrial")
                    for f in patch_features]
            return score, torch.cat(maps, dim=1).sum(1)

    return call


def export_aa_clip(model, work: Path) -> dict:
    """Our adapters under the official file names and keys (``train.py`` saves these two files)."""
    inner = model.model
    torch.save({"epoch": 1, "text_adapter": inner.text_adapter.state_dict()}, work / "text_adapter.pth")
    torch.save({"epoch": 1, "image_adapter": inner.image_adapter.state_dict()}, work / "image_adapter_1.pth")
    return {"class_name": inner.class_name}


def adaclip(src: Path, work: Path) -> OfficialCall:
    """AdaCLIP ``test.py`` (``AdaCLIP_Trainer.evaluation``): ``clip_model(image, cls_name, aggregation=True)``
    gives the map and the score; each map then goes through scipy's ``gaussian_filter(sigma=4)``. The
    trainer is built with test.py's defaults (prompting depth 4, length 5, ``SD``/``VL``, HSF with 20
    clusters), which are also ours. The official HSF clusters with sklearn's ``KMeans(n_init="auto")``
    without a seed: its image score changes from run to run, ours is a seeded k-means (the maps do
    not depend on it)."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    trainer = adaclip_trainer(src, work)
    config = json.loads((work / "official.json").read_text())
    trainer.load(str(work / "official-weights.pt"))
    trainer.eval()
    name = config["class_name"]

    def call(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), cuda_to_identity():
            anomaly_map, anomaly_score = trainer.clip_model(image, [name] * image.shape[0], aggregation=True)
            maps = np.stack([gaussian_filter(m, sigma=4) for m in anomaly_map.cpu().numpy()])
            return anomaly_score.float(), torch.from_numpy(maps)

    return call


def adaclip_trainer(src: Path, work: Path, learning_rate: float = 0.0):
    """The official ``AdaCLIP_Trainer`` on our CLIP archive (test.py's and train.py's settings from
    ``official.json``), before its learnt weights are loaded; the run-time patches of :func:`adaclip`."""
    stub_modules()
    for name in ("seaborn",):
        sys.modules.setdefault(name, types.ModuleType(name))
    board = types.ModuleType("torch.utils.tensorboard")  # imported by the official tools; training only

    class SummaryWriter:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def add_scalar(self, *args, **kwargs) -> None:
            pass

    board.SummaryWriter = SummaryWriter
    sys.modules.setdefault("torch.utils.tensorboard", board)
    vocab = src / "method" / "bpe_simple_vocab_16e6.txt.gz"
    if vocab.stat().st_size < 1000:  # a Git LFS pointer in the repository: CLIP's vocabulary is open_clip's
        import shutil

        import open_clip

        shutil.copyfile(Path(open_clip.__file__).parent / vocab.name, vocab)
        for module in [m for m in sys.modules if m == "open_clip" or m.startswith("open_clip.")]:
            del sys.modules[module]
    sys.path.insert(0, str(src))
    with contextlib.chdir(src):
        from method import custom_clip
        from method.trainer import AdaCLIP_Trainer
    config = json.loads((work / "official.json").read_text())
    custom_clip.get_pretrained_cfg = lambda _name, _tag: {"url": "local"}  # also for the small test architectures
    custom_clip.download_pretrained = lambda _cfg, cache_dir=None: str(work / OPENAI_ARCHIVE)  # noqa: ARG005
    if config.get("architecture"):
        (work / f"{config['open_clip_name']}.json").write_text(json.dumps(config["architecture"]))
        custom_clip.add_model_config(work / f"{config['open_clip_name']}.json")
    with contextlib.chdir(src), cuda_to_identity():
        return AdaCLIP_Trainer(backbone=config["open_clip_name"], feat_list=config["feature_layers"],
                               input_dim=config["vision_width"], output_dim=config["embed_dim"],
                               learning_rate=learning_rate, device="cpu", image_size=config["image_size"],
                               **config["hyper"])


def export_adaclip(model, work: Path) -> dict:
    """Our learnt tensors as ``AdaCLIP_Trainer.save()`` writes them, and the settings the trainer needs."""
    from anomalib_zsad.models.adaclip.checkpoint import official_state_dict

    inner = model.model
    torch.save(official_state_dict(inner), work / "official-weights.pt")
    hyper = {"prompting_depth": inner.prompt_depth, "prompting_length": inner.prompt_length,
             "prompting_branch": ("V" if inner.visual_prompts_on else "") + ("L" if inner.text_prompts_on else ""),
             "prompting_type": ("S" if inner.text_prompter is not None or inner.visual_prompter is not None else "")
             + ("D" if inner.dynamic_visual_prompt_generator is not None
                or inner.dynamic_text_prompt_generator is not None else ""),
             "use_hsf": inner.hsf is not None, "k_clusters": inner.hsf.k_clusters if inner.hsf is not None else 20}
    return {"class_name": inner.class_name, "feature_layers": list(inner.feature_layers), "hyper": hyper,
            "vision_width": inner.clip.visual.conv1.out_channels, "embed_dim": inner.clip.visual.proj.shape[1]}


def bayes_pfl(src: Path, work: Path) -> OfficialCall:
    """Bayes-PFL ``test.py``, per image as it runs (batch 1): ``Load_CLIP``'s ``encode_image``,
    ``Context_Prompting.forward_ensemble`` (prompt bank x Monte-Carlo samples of the flows), the model's
    maps and scores averaged over the ``prompt_num * sample_num`` draws; the map through scipy's
    ``gaussian_filter(sigma=8)`` as ``calcuate_metric_pixel`` applies it. The score returned is the mean
    anomalous probability (the official final score min-max normalises over the whole test set).
    Both sides draw their own Monte-Carlo samples, so outputs agree only within the sampling spread."""
    import argparse

    import numpy as np

    stub_modules()
    sys.path.insert(0, str(src))
    with contextlib.chdir(src):
        from models.model_CLIP import Load_CLIP, tokenize
        from models.VPB import Context_Prompting, TextEncoder
    from scipy.ndimage import gaussian_filter

    config = json.loads((work / "official.json").read_text())
    args = argparse.Namespace(**config["args"], image_size=config["image_size"])
    clip, _, _ = Load_CLIP(args.image_size, str(work / OPENAI_ARCHIVE), device="cpu")
    clip.eval()
    text_encoder = TextEncoder(clip, args)
    model = Context_Prompting(args=args).eval()
    model.load_state_dict(torch.load(work / "official-weights.pt", map_location="cpu", weights_only=True)["MyModel"],
                          strict=True)
    draws = args.prompt_num * args.sample_num
    name = config["class_name"]

    def one(image: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        image_features, _, patch_tokens = clip.encode_image(image, args.features_list)
        text, _ = model.forward_ensemble(text_encoder, image_features, patch_tokens, [name], "cpu", tokenize,
                                         mode="test")
        pro_img, maps_list = model(text, image_features, patch_tokens, stage=2, mode="test")
        pro_img = pro_img.squeeze(2)
        score = 0
        for i in range(draws):
            score = score + torch.cat([pro_img[:, i].unsqueeze(0), pro_img[:, i + draws].unsqueeze(0)],
                                      dim=1).softmax(dim=-1)[0, 1]
        maps = []
        for anomaly_map in maps_list:
            for i in range(draws):
                pair = torch.stack([anomaly_map[:, i], anomaly_map[:, i + draws]], dim=1).softmax(dim=1)
                maps.append(pair[:, 1].cpu().numpy())
        return score / draws, gaussian_filter(np.mean(maps, axis=0)[0], sigma=8)

    def call(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), cuda_to_identity():  # its transformer.py also builds an unused out_attn on cuda
            outs = [one(image[None]) for image in images]
        return torch.stack([s for s, _ in outs]), torch.from_numpy(np.stack([m for _, m in outs]))

    return call


def export_bayes_pfl(model, work: Path) -> dict:
    """Our prompt distributions etc. as the official ``{"MyModel": ...}`` checkpoint, and test.py's arguments."""
    from anomalib_zsad.models.bayes_pfl import save_official_checkpoint

    inner = model.model
    save_official_checkpoint(inner, work / "official-weights.pt")
    arch = inner.clip.arch
    args = {"vision_width": arch.vision_width, "text_width": arch.text_width, "embed_dim": arch.embed_dim,
            "prompt_num": inner.prompt_num, "prompt_context_len": inner.context_length,
            "prompt_state_len": inner.state_length, "num_flows": inner.PFL_context.num_flows,
            "sample_num": inner.num_samples,
            "features_list": list(inner.feature_layers)}
    return {"class_name": inner.class_name, "args": args}


RUNNERS: dict[str, tuple[Callable, Callable]] = {"Vand": (vand, export_vand), "AACLIP": (aa_clip, export_aa_clip),
                                                 "AdaCLIP": (adaclip, export_adaclip),
                                                 "BayesPFL": (bayes_pfl, export_bayes_pfl)}
