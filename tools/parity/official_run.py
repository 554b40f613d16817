"""Run/capture scaffolding of the parity-set generators (``make_<method>_set.py``), nothing of any official code.

Each generator copies an export of the official repository to a temp dir, patches the few things the
official code cannot do here (missing modules, weights paths, data roots), runs the official scripts
unmodified as ``__main__`` while wrappers that only observe catch the intermediate tensors, and writes
the set. The steps that are the same for every method live here, so that a fix reaches all six sets:
the command line, the work dir, the synthetic images, the patching and observing helpers, the run of a
script, and the writing of the set.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import runpy
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

TOKEN_INDEX = torch.arange(0, 1369 + 1, 8)  # tokens kept of the 1 + 37 x 37 at 518 px: 0 = CLS, T = 172
UPSAMPLED_INDEX = torch.cat([torch.arange(0, 518, 9), torch.tensor([517])])  # rows/cols kept of 518 x 518 maps: 59
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFECTS = [None, (96, 160, 64, 144), (40, 100, 150, 230), (170, 230, 20, 90)]  # rows r0:r1, cols c0:c1 of image i
DEFECT_COLOURS = [None, (250, 40, 40), (30, 230, 60), (20, 20, 240)]


# ----------------------------------------------------------------------------- command line, work dir
def generator_parser(doc: str, method: str, commit: str, *, threads: bool = True) -> argparse.ArgumentParser:
    """The options every generator has: ``--src`` (the export), ``--out`` (set root), ``--seed`` (100 remakes
    the shared set) and, where the generator pins them, ``--threads``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True,
                        help=f"export of the official repository (commit {commit[:7]})")
    parser.add_argument("--out", type=Path, required=True, help=f"set root: the files go to <out>/{method}")
    parser.add_argument("--seed", type=int, default=100)
    if threads:
        parser.add_argument("--threads", type=int, default=2)
    return parser


def start_set(args: argparse.Namespace, method: str) -> tuple[Path, dict[str, float], float]:
    """Pin the threads (where the generator has ``--threads``), make the set folder ``<out>/<method>``;
    returns it, the run's timings (run_info.json's ``timings_s``) and the start time."""
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    out = (args.out / method).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out, {}, time.time()


def work_dir(method: str, src: Path | None = None, ignore: tuple[str, ...] = ()) -> tuple[Path, Path | None]:
    """A fresh temp dir, and in it ``src/``, a copy of the export ``src`` (the official scripts write next to
    themselves, and some files are completed there); without ``src`` only the dir."""
    work = Path(tempfile.mkdtemp(prefix=f"{method}_parity_"))
    if src is None:
        return work, None
    copy = work / "src"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns(*ignore) if ignore else None)
    return work, copy


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str):
    """``timings[name]`` = seconds the block took (run_info.json's ``timings_s``)."""
    start = time.time()
    yield
    timings[name] = round(time.time() - start, 2)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- data
def make_images(seed: int | np.random.Generator, count: int, *, defects: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``count`` 256 x 256 RGB images ``0.6 kron(U(8x8x3)) + 0.4 U(256x256x3)`` (``default_rng(seed)``; a
    Generator is used as it is), image ``i >= 1`` with the box ``DEFECTS[i]`` in ``DEFECT_COLOURS[i]`` unless
    ``defects`` is false, and their 0/255 masks (the sets' README, the data section)."""
    rng = np.random.default_rng(seed)
    coarse, fine = rng.random((count, 8, 8, 3)), rng.random((count, 256, 256, 3))
    images, masks = [], []
    for index in range(count):
        mixed = 0.6 * np.kron(coarse[index], np.ones((32, 32, 1))) + 0.4 * fine[index]
        image = np.round(255 * mixed).clip(0, 255).astype(np.uint8)
        mask = np.zeros((256, 256), np.uint8)
        if defects and DEFECTS[index] is not None:
            r0, r1, c0, c1 = DEFECTS[index]
            image[r0:r1, c0:c1] = DEFECT_COLOURS[index]
            mask[r0:r1, c0:c1] = 255
        images.append(image)
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def write_single_class_test_set(root: Path, images: np.ndarray, masks: np.ndarray, cls_name: str, *,
                                bad: str = "defect", train: np.ndarray | None = None) -> dict:
    """The test images as PNGs in one class folder plus the ``meta.json`` that the AnomalyCLIP-derived
    ``dataset.py`` reads (``meta['test'][cls_name]``; GlocalCLIP's train.py reads the same split; VAND's
    ``VisaDataset`` the same layout with ``specie_name`` ``bad`` and the ``train`` images as its few-shot pool).
    A mask file is written only for anomalous images (a normal image's mask is made by the official code)."""
    from PIL import Image

    def save(rel: str, array: np.ndarray, mode: str | None = None) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array, mode=mode).save(root / rel) if mode else Image.fromarray(array).save(root / rel)

    entries, image_paths, mask_paths = [], [], []
    for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
        anomalous = bool(mask.any())
        kind = "defect" if anomalous else "good"
        img_rel = f"{cls_name}/test/{kind}/{index:03d}.png"
        save(img_rel, image)
        mask_rel = f"{cls_name}/ground_truth/{kind}/{index:03d}_mask.png" if anomalous else ""
        if anomalous:
            save(mask_rel, mask, "L")
        entries.append({"img_path": img_rel, "mask_path": mask_rel, "cls_name": cls_name,
                        "specie_name": bad if anomalous else "good", "anomaly": int(anomalous)})
        image_paths.append(img_rel)
        mask_paths.append(mask_rel)
    pool = [f"{cls_name}/train/good/{index:03d}.png" for index in range(0 if train is None else len(train))]
    for rel, image in zip(pool, [] if train is None else train, strict=True):
        save(rel, image)
    train_entries = [{"img_path": rel, "mask_path": "", "cls_name": cls_name, "specie_name": "good", "anomaly": 0}
                     for rel in pool]
    (root / "meta.json").write_text(json.dumps({"train": {cls_name: train_entries}, "test": {cls_name: entries}}))
    if train is None:
        return {"image_paths": image_paths, "mask_paths": mask_paths}
    return {"test_image_paths": image_paths, "train_image_paths": pool}


def pack_bits(array: torch.Tensor) -> dict:
    """Binary map -> ``{"bits": uint8, "shape": [...]}`` (``np.packbits`` of the C-order values)."""
    values = np.asarray(array.detach().cpu().numpy() != 0, dtype=np.uint8)
    return {"bits": torch.from_numpy(np.packbits(values.reshape(-1))), "shape": list(values.shape)}


# ----------------------------------------------------------------------------- run-time patches
def stub_module(name: str, record: list[str], note: str, **attributes) -> None:
    """Put a stub into ``sys.modules`` only when the real module is not importable."""
    try:
        __import__(name)
    except ImportError:
        module = types.ModuleType(name)
        for key, value in attributes.items():
            setattr(module, key, value)
        sys.modules[name] = module
        record.append(f"stub module {name} ({note})")


def pkg_resources_stub(record: list[str], note: str) -> None:
    """``pkg_resources`` with only ``.packaging.version`` (all the official code uses of it)."""
    from packaging import version

    stub_module("pkg_resources", record, note, packaging=types.SimpleNamespace(version=version))


class LegacyImage:
    """``PIL.Image`` proxy: ``fromarray`` of a float64 array in mode 'L' gives the all-zero image that
    Pillow < 11 made (the official data sets build normal images' masks so); everything else is real PIL."""

    def __init__(self, module) -> None:
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def fromarray(self, array, mode=None):
        if mode == "L" and np.asarray(array).dtype == np.float64:
            return self._module.fromarray(np.asarray(array).astype(np.uint8), mode="L")
        return self._module.fromarray(array) if mode is None else self._module.fromarray(array, mode=mode)


@contextlib.contextmanager
def patched(obj, name: str, make):
    """Replace ``obj.name`` by ``make(original)`` for the ``with`` block."""
    original = getattr(obj, name)
    setattr(obj, name, make(original))
    try:
        yield original
    finally:
        setattr(obj, name, original)


def patch_all(stack: contextlib.ExitStack, patches: list) -> None:
    """Enter ``patched(obj, name, make)`` for every ``(obj, name, make)`` on ``stack``."""
    for obj, name, make in patches:
        stack.enter_context(patched(obj, name, make))


@contextlib.contextmanager
def observed(patches: list, log: Path):
    """The official runs' block: every patch and wrapper of ``patches`` in place, their stdout in ``log``."""
    with log.open("w") as sink, contextlib.ExitStack() as stack:
        patch_all(stack, patches)
        stack.enter_context(contextlib.redirect_stdout(sink))
        yield


def cpu_only_patches(record: list[str]) -> list:
    """On a CUDA host the official scripts would pick ``cuda``: keep them on the CPU (the goldens are float32)."""
    if not torch.cuda.is_available():
        return []
    record.append("torch.cuda.is_available -> False: the goldens are the float32 CPU run")
    return [(torch.cuda, "is_available", lambda _orig: lambda: False)]


def norm_on_clone(orig):
    """``Tensor.norm`` of a tensor that requires grad evaluated on a clone (same values): official code that
    divides a tensor in place by its own norm then back-propagates in fp32 (AdaCLIP, VAND train.py)."""
    def norm(self, *a, **k):
        return orig(self.clone() if self.requires_grad else self, *a, **k)
    return norm


# ----------------------------------------------------------------------------- observing wrappers
def after(store):
    """A ``make`` for ``patched``: call the original, hand ``store(result, *args, **kwargs)`` what it returned
    and got, return the result untouched."""
    def make(orig):
        def wrapper(*a, **k):
            result = orig(*a, **k)
            store(result, *a, **k)
            return result
        return wrapper
    return make


def before(store):
    """A ``make`` for ``patched``: ``store(*args, **kwargs)``, then the original."""
    def make(orig):
        def wrapper(*a, **k):
            store(*a, **k)
            return orig(*a, **k)
        return wrapper
    return make


def optimizer_step(names_of, store):
    """A ``make`` for ``Optimizer.step``: ``store(optimizer, grads, params_without_grad, params_after)``, keyed by
    the names ``names_of()`` gives (``{id(param): name}``): gradients before the step, parameters after."""
    def make(orig):
        def step(self, *a, **k):
            names = names_of()
            params = [p for group in self.param_groups for p in group["params"]]
            grads = {names[id(p)]: p.grad.detach().clone() for p in params if p.grad is not None}
            without = [names[id(p)] for p in params if p.grad is None]
            result = orig(self, *a, **k)
            store(self, grads, without, {names[id(p)]: p.detach().clone() for p in params})
            return result
        return step
    return make


def lineage_loss_patches(observe: dict, metrics_module, focal_loss, dice_loss) -> list:
    """``patched`` triples of the ``bucket_observers`` every AnomalyCLIP-lineage generator sets the same way:
    the Gaussian smoothing, both metric functions, the cross entropy, the two segmentation losses, the backward
    and the Adam step."""
    import scipy.ndimage
    import torch.nn.functional as F  # noqa: N812

    return [(scipy.ndimage, "gaussian_filter", observe["gaussian_filter"]),
            (metrics_module, "image_level_metrics", observe["metric"]),
            (metrics_module, "pixel_level_metrics", observe["metric"]),
            (F, "cross_entropy", observe["cross_entropy"]),
            (focal_loss, "forward", observe["focal"]),
            (dice_loss, "forward", observe["dice"]),
            (torch.Tensor, "backward", observe["backward"]),
            (torch.optim.Adam, "step", observe["step"])]


def bucket_observers(bucket, state: dict) -> dict:
    """Observers of the AnomalyCLIP lineage (AnomalyCLIP, its fork GlocalCLIP; VAND shares the backward one).
    Each fills a list of ``bucket()``, the record of the official script running (``state["phase"]``):
    ``models`` (``load``), ``items`` (index, image, mask, label of ``Dataset.__getitem__``), ``image``
    (``encode_image``: pooled and per-layer tokens), ``up`` (``get_similarity_map``, subsampled), ``gauss``
    (input, output, kwargs of ``gaussian_filter``), ``metrics``/``results`` (``image_level_metrics``,
    ``pixel_level_metrics``), ``ce`` (logits, target, loss), ``focal``/``dice`` (loss values), ``backward``
    (the loss ``train.py`` back-propagates) and ``steps`` (of the last prompt learner in ``learners``)."""
    def getitem(item, _dataset, index):
        bucket()["items"].append((index, item["img"].clone(), item["img_mask"].clone(), int(item["anomaly"])))

    def encode_image(result, *_a, **_k):
        if state["phase"] is not None:
            bucket()["image"].append((result[0].detach().clone(), [t.detach().clone() for t in result[1]]))

    def similarity_map(result, *_a, **_k):
        bucket()["up"].append(result.detach()[:, UPSAMPLED_INDEX][:, :, UPSAMPLED_INDEX].clone())

    def gauss(result, array, *_a, **k):
        bucket()["gauss"].append((np.array(array, copy=True), np.array(result, copy=True), dict(k)))

    def metric(value, results, obj, name):
        bucket()["metrics"][name] = float(value)
        bucket()["results"] = results[obj]

    def cross_entropy(value, logits, target, *_a, **_k):
        bucket()["ce"].append((logits.detach().clone(), target.clone(), value.detach().clone()))

    def loss(key):
        return after(lambda value, *_a, **_k: bucket()[key].append(value.detach().clone()))

    def backward(value, *_a, **_k):
        if state["phase"] and state["phase"].startswith("train"):
            bucket()["backward"].append(value.detach().clone())

    def learner_names() -> dict:
        return {id(p): n for n, p in bucket()["learners"][-1].named_parameters()}

    return {"load": after(lambda result, *_a, **_k: bucket()["models"].append(result[0])),
            "getitem": after(getitem), "encode_image": after(encode_image), "similarity_map": after(similarity_map),
            "gaussian_filter": after(gauss), "metric": after(metric), "cross_entropy": after(cross_entropy),
            "focal": loss("focal"), "dice": loss("dice"), "backward": before(backward),
            "step": optimizer_step(learner_names, lambda _opt, *step: bucket()["steps"].append(step))}


def lineage_argv(script: str, dataset: str, data_root: Path, save: Path, checkpoint: Path) -> list[str]:
    """The paths ``test.py``/``train.py`` of the AnomalyCLIP lineage take (every other option stays default)."""
    if script == "test.py":
        return ["--dataset", dataset, "--data_path", str(data_root), "--save_path", str(save), "--checkpoint_path",
                str(checkpoint)]
    return ["--dataset", dataset, "--train_data_path", str(data_root), "--save_path", str(save)]


def lineage_test_images(test: dict, model, features: list[int], images: np.ndarray, masks: np.ndarray,
                        meta: dict) -> tuple[dict, dict]:
    """``inputs.pt`` of an AnomalyCLIP-lineage set from the ``bucket_observers`` record of ``test.py``, and the
    features of its one-image calls next to those of the same images as one batch of 2 (the ``meta`` check
    that batching changes nothing): ``{"pooled1", "tokens1", "batch_vs_single"}``."""
    with torch.no_grad():
        batch = torch.cat([item[1][None] for item in test["items"]])
        pooled2, tokens2 = model.encode_image(batch, features, DPAM_layer=20)
    pooled1 = torch.cat([p for p, _ in test["image"]])
    tokens1 = [torch.cat([t[layer] for _, t in test["image"]]) for layer in range(len(features))]
    inputs = {
        "raw_images_uint8": torch.from_numpy(images), "raw_masks_uint8": torch.from_numpy(masks),
        "labels": torch.tensor([item[3] for item in test["items"]]),
        "images": torch.stack([item[1] for item in test["items"]]),
        "gt_masks": torch.stack([(item[2] > 0.5).to(torch.uint8) for item in test["items"]]),
        "meta": meta,
    }
    diffs = {"image_features": (pooled2 - pooled1).abs().max().item(),
             "patch_features": max((a - b).abs().max().item() for a, b in zip(tokens2, tokens1, strict=True))}
    return inputs, {"pooled1": pooled1, "tokens1": tokens1, "batch_vs_single": diffs}


def per_layer(calls: list, n_images: int, index: int | None = None) -> torch.Tensor:
    """``[L, B, ...]`` from one call a layer an image, image-major (element ``index`` of each call's tuple)."""
    layers = len(calls) // n_images
    return torch.stack([torch.cat([calls[i * layers + layer] if index is None else calls[i * layers + layer][index]
                                   for i in range(n_images)]) for layer in range(layers)])


def image_scores(bucket: dict) -> torch.Tensor:
    """The image scores ``metrics.image_level_metrics`` got (``results[obj]['pr_sp']``)."""
    return torch.stack([torch.as_tensor(s) for s in bucket["results"]["pr_sp"]])


# ----------------------------------------------------------------------------- run, write
def run_main(script: Path, argv: list[str]) -> None:
    """Run an official script unmodified as ``__main__``, as ``python <script> <argv>`` would."""
    sys.argv = [script.name, *argv]
    runpy.run_path(str(script), run_name="__main__")


def environment(extra: tuple[str, ...] = ()) -> dict:
    import PIL
    import scipy
    import torchvision

    env = {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
           "num_threads": torch.get_num_threads(), "scipy": scipy.__version__, "PIL": PIL.__version__,
           "torchvision": torchvision.__version__}
    for name in extra:
        env[name] = __import__(name).__version__
    return env


def write_set(out: Path, files: dict[str, object], info: dict, *, indent: int = 1) -> None:
    """``torch.save`` each of ``files`` (``{"inputs.pt": ..., ...}``) into ``out``, then ``run_info.json``."""
    for name, value in files.items():
        torch.save(value, out / name)
    (out / "run_info.json").write_text(json.dumps(info, indent=indent))


def finish(out: Path, work: Path, seconds: float) -> None:
    """Remove the work dir (from outside it) and say where the set is."""
    if Path.cwd().resolve().is_relative_to(work.resolve()):
        os.chdir(Path(__file__).resolve().parent)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out} in {seconds} s", file=sys.__stdout__)
