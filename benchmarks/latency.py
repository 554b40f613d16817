"""CPU (and GPU) latency of AnomalyCLIP per image: torch eager, OpenVINO FP32 and INT8, and the
official code on the same inputs and weights.

    python benchmarks/latency.py                                   # ViT-L/14@336 at 518 px, random weights
    python benchmarks/latency.py --official-src ~/src/AnomalyCLIP  # + the official code, same run
    python benchmarks/latency.py --model Vand --official-src ~/src/VAND-APRIL-GAN --backends torch --rounds 3
    python benchmarks/latency.py --backbone zsad-tiny --image-size 224 --runs 3   # quick smoke run
    python benchmarks/latency.py --model AdaCLIP                   # any plugin model (Vand, AACLIP, BayesPFL, ...)
    python benchmarks/latency.py --batch-size 8                    # throughput: images per second in batches of 8

Each backend runs in its own process (so its peak memory is its own), with ``--threads`` threads,
one warm-up and ``--runs`` timed batches of ``--batch-size`` images (default 1); the table gives
min / median / max seconds per batch, images per second at the median,
peak resident memory, the ratio to the official code (official median / this median) and the
largest difference of score and map to our torch model on the same input (equal outputs are part
of the comparison). Random weights are enough for timing (no weights can be downloaded here).
``--rounds N`` runs the backends N times in turn (ours, official, ours, official, ...), each time in a
fresh process, so that other load on the machine falls on both sides alike; the times are pooled.
The official code of the siblings (Vand, AdaCLIP, AACLIP, BayesPFL) is driven by ``official_code.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official_code  # (benchmarks/official_code.py: the siblings' official inference paths)

BACKENDS = ("torch", "openvino", "openvino-int8", "official", "torch-cuda")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="AnomalyCLIP", help="a model of anomalib_zsad.models")
    parser.add_argument("--backbone", default="ViT-L-14-336")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1, help="images per call (throughput at 1, 4, 8, ...)")
    parser.add_argument("--official-src", type=Path,
                        help="an export of the model's official repository (AnomalyCLIP, Vand, AdaCLIP, AACLIP, "
                             "BayesPFL; commits in the models' READMEs)")
    parser.add_argument("--rounds", type=int, default=1, help="run the backends this many times in turn")
    parser.add_argument("--backends", nargs="+", default=["torch", "openvino", "openvino-int8"], choices=BACKENDS)
    parser.add_argument("--calibration-images", type=int, default=8, help="INT8 calibration set size")
    parser.add_argument("--work-dir", type=Path, help="keep the exported models here")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace):
    import anomalib_zsad.models

    model_class = getattr(anomalib_zsad.models, args.model)
    model = model_class(backbone=args.backbone, pretrained=None, image_size=args.image_size).eval()
    if args.model in {"AnomalyCLIP", "GlocalCLIP"}:  # QuickGELU, as OpenAI's weights and their official code
        model.model.clip.set_activation("quick_gelu")
    return model


def time_calls(call, inputs, runs: int) -> list[float]:
    call(inputs)  # warm-up (first call also fills caches: resized pos-embed, text features)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call(inputs)
        times.append(time.perf_counter() - start)
    return times


def worker(args: argparse.Namespace, work: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    image = torch.load(work / "input.pt", weights_only=True)
    result: dict = {"backend": args.worker}
    if args.worker in {"torch", "torch-cuda"}:
        device = "cuda" if args.worker == "torch-cuda" else "cpu"
        torch.manual_seed(0)  # the weights prepare() built and gave the official code (no second copy in memory)
        model = build_model(args).model
        if (work / "official.json").exists():
            official_code.round_to_fp16(model.clip)
        if (work / "fingerprint.json").exists() and fingerprint(model) != json.loads((work / "fingerprint.json").read_text()):
            raise RuntimeError("the rebuilt model differs from the one whose weights the official code got")
        model = model.to(device)
        inputs = image.to(device)

        def call(x):
            with torch.inference_mode():
                out = model(x)
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        result["times"] = time_calls(call, inputs, args.runs)
        out = call(inputs)
        torch.save({"score": out.pred_score.cpu(), "map": out.anomaly_map.cpu()}, work / f"out-{args.worker}.pt")
    elif args.worker in {"openvino", "openvino-int8"}:
        import openvino as ov

        xml = work / ("model-int8.xml" if args.worker == "openvino-int8" else "openvino/weights/openvino/model.xml")
        compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_NUM_THREADS": args.threads})
        raw = torch.load(work / "input-raw.pt", weights_only=True).numpy()
        result["times"] = time_calls(compiled, raw, args.runs)
        outputs = compiled(raw)
        named = {port.get_any_name(): value for port, value in outputs.items()}
        torch.save({"score": torch.as_tensor(named["pred_score"]).reshape(-1),
                    "map": torch.as_tensor(named["anomaly_map"]).reshape(image.shape[0], *image.shape[-2:])},
                   work / f"out-{args.worker}.pt")
    elif args.worker == "official" and args.model == "AnomalyCLIP":
        result.update(official_worker(args, work, image))
    elif args.worker == "official":
        call = official_code.RUNNERS[args.model][0](args.official_src, work)
        result["times"] = time_calls(call, image, args.runs)
        score, amap = call(image)
        torch.save({"score": score.float(), "map": amap.float()}, work / "out-official.pt")
    result["peak_mib"] = peak_rss_mib()
    return result


def fingerprint(module) -> list[float]:
    """Sums of every tensor of ``module`` (float64): equal for equal weights, cheap, no copy kept."""
    import torch

    return [float(t.double().sum()) for t in module.state_dict().values() if torch.is_tensor(t) and t.is_floating_point()]


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux's ``VmHWM`` starts anew at ``exec``; ``ru_maxrss``
    would also count the parent's memory at the ``fork`` (here: the exported models)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def official_worker(args: argparse.Namespace, work: Path, image) -> dict:
    """The official test.py inference path (model_load.load, DPAM_replace(20), encode_image,
    compute_similarity, get_similarity_map, scipy gaussian_filter), on our weights and prompts."""
    import numpy as np
    import torch
    from scipy.ndimage import gaussian_filter

    AnomalyCLIP_lib, model, learner = official_code.anomalyclip(args.official_src, work)  # noqa: N806 (its name)
    layers = list(json.loads((work / "layers.json").read_text()))
    with torch.no_grad():
        prompts, tokens, compound = learner(cls_id=None)
        text = model.encode_text_learn(prompts, tokens, compound).float()
        text = torch.stack(torch.chunk(text, dim=0, chunks=2), dim=1)
        text = text / text.norm(dim=-1, keepdim=True)

    def call(x):
        with torch.no_grad():
            feats, patches = model.encode_image(x, layers, DPAM_layer=20)
            feats = feats / feats.norm(dim=-1, keepdim=True)
            score = ((feats @ text.permute(0, 2, 1)) / 0.07).softmax(-1)[:, 0, 1]
            maps = []
            for patch in patches:
                patch = patch / patch.norm(dim=-1, keepdim=True)
                sim, _ = AnomalyCLIP_lib.compute_similarity(patch, text[0])
                sim = AnomalyCLIP_lib.get_similarity_map(sim[:, 1:, :], x.shape[-1])
                maps.append((sim[..., 1] + 1 - sim[..., 0]) / 2.0)
            amap = torch.stack(maps).sum(0)
            amap = torch.stack([torch.from_numpy(gaussian_filter(m, sigma=4)) for m in amap.numpy()])
        return score, amap

    times = time_calls(call, image, args.runs)
    score, amap = call(image)
    torch.save({"score": score, "map": amap.to(torch.float32)}, work / "out-official.pt")
    del np
    return {"times": times}


def prepare(args: argparse.Namespace, work: Path) -> None:
    """Inputs, weights in the official formats, and the exported OpenVINO models."""
    import torch

    torch.manual_seed(0)
    model = build_model(args)
    raw = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
    torch.save(raw, work / "input-raw.pt")
    torch.save(model.pre_processor.transform(raw), work / "input.pt")
    (work / "layers.json").write_text(json.dumps(list(getattr(model.model, "feature_layers", []))))
    if "official" in args.backends:
        if args.model == "AnomalyCLIP":
            export_official_weights(model, work)
        else:
            from anomalib_zsad.clip.architecture import EXTRA_ARCHITECTURES

            official_code.round_to_fp16(model.model.clip)
            official_code.write_openai_archive(model.model.clip, work / official_code.OPENAI_ARCHIVE)
            config = official_code.RUNNERS[args.model][1](model, work)
            (work / "official.json").write_text(json.dumps(
                {"image_size": args.image_size, **config,  # AdaCLIP's loader wants 'ViT' in the name
                 "open_clip_name": args.backbone if "ViT" in args.backbone else f"ViT-{args.backbone}",
                 "architecture": EXTRA_ARCHITECTURES.get(args.backbone)}))
        (work / "fingerprint.json").write_text(json.dumps(fingerprint(model.model)))
    if {"openvino", "openvino-int8"} & set(args.backends):
        from anomalib.engine import Engine

        engine = Engine(accelerator="cpu", default_root_dir=work, logger=False)
        xml = engine.export(model, export_type="openvino", export_root=work / "openvino",
                            input_size=(args.image_size, args.image_size))
        if "openvino-int8" in args.backends:
            quantize(Path(xml), work / "model-int8.xml", args)


def export_official_weights(model, work: Path) -> None:
    """Our random CLIP as an OpenAI TorchScript archive (what the official loader reads) and our
    prompts in the official ``{"prompt_learner": ...}`` layout, so both sides compute the same thing."""
    import torch
    from torch import nn

    clip = model.model.clip

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = clip.visual
            for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
                setattr(self, name, getattr(clip.text, name))
            self.logit_scale = clip.logit_scale

        def forward(self, x):
            return x + self.logit_scale

    torch.jit.trace(Holder(), torch.zeros(1)).save(str(work / "clip-torchscript.pt"))
    torch.save(model.model.prompt_learner.state_dict(), work / "prompts.pt")


def quantize(xml: Path, target: Path, args: argparse.Namespace) -> None:
    """INT8 as ``--compression_type int8_ptq`` makes it for the plugin's models (NNCF post-training,
    the CLIP settings of ``anomalib_zsad.models.components.quantization``), calibrated on demo images."""
    import numpy as np
    import openvino as ov
    from PIL import Image

    from anomalib_zsad.data import make_demo_dataset
    from anomalib_zsad.models.components.quantization import quantize_ov_model

    root = make_demo_dataset(xml.parent / "calibration_demo", seed=1, image_size=args.image_size)
    paths = sorted(root.rglob("train/good/*.png"))[: args.calibration_images]
    images = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).transpose(2, 0, 1)[None] / 255 for p in paths]
    ov.save_model(quantize_ov_model(ov.Core().read_model(str(xml)), images), str(target), compress_to_fp16=False)


def run_backend(backend: str, args: argparse.Namespace, work: Path) -> dict | None:
    command = [sys.executable, __file__, "--worker", backend, "--work-dir", str(work), "--model", args.model,
               "--backbone", args.backbone,
               "--image-size", str(args.image_size), "--threads", str(args.threads), "--runs", str(args.runs),
               "--batch-size", str(args.batch_size)]
    if args.official_src:
        command += ["--official-src", str(args.official_src)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        print(f"{backend}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def report(results: list[dict], work: Path, batch_size: int = 1) -> str:
    import torch

    reference = torch.load(work / "out-torch.pt", weights_only=True) if (work / "out-torch.pt").exists() else None
    official = next((r for r in results if r["backend"] == "official"), None)
    lines = [("| backend | min s | median s | max s | images/s | peak MiB | speed-up vs official "
              "| max diff score / map vs torch |"), "|---|---|---|---|---|---|---|---|"]
    for r in results:
        median = statistics.median(r["times"])
        ratio = f"{statistics.median(official['times']) / median:.2f}x" if official else "-"
        diff = "-"
        out = work / f"out-{r['backend']}.pt"
        if reference is not None and out.exists():
            other = torch.load(out, weights_only=True)
            diff = (f"{(other['score'] - reference['score']).abs().max():.1e} / "
                    f"{(other['map'] - reference['map']).abs().max():.1e}")
        lines.append(f"| {r['backend']} | {min(r['times']):.3g} | {median:.3g} | {max(r['times']):.3g} | "
                     f"{batch_size / median:.3g} | {r['peak_mib']:.0f} | {ratio} | {diff} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args, args.work_dir)))
        return 0
    if args.official_src:
        if args.model != "AnomalyCLIP" and args.model not in official_code.RUNNERS:
            print(f"--official-src: no official runner for {args.model} (AnomalyCLIP, {', '.join(official_code.RUNNERS)})",
                  file=sys.stderr)
            return 2
        args.backends = [*dict.fromkeys([*args.backends, "official"])]
    try:
        import torch

        if torch.cuda.is_available():
            args.backends = [*dict.fromkeys([*args.backends, "torch-cuda"])]
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"preparing {args.backbone} at {args.image_size} px (random weights) in {work} ...", flush=True)
        prepare(args, work)
        pooled: dict[str, dict] = {}
        for round_index in range(args.rounds):
            for backend in args.backends:
                print(f"timing {backend} (round {round_index + 1}/{args.rounds}) ...", flush=True)
                if (result := run_backend(backend, args, work)) is not None:
                    print(f"  {backend}: {[round(t, 3) for t in result['times']]} s, peak {result['peak_mib']:.0f} MiB",
                          flush=True)  # partial figures survive an interrupted long run
                    if backend in pooled:
                        pooled[backend]["times"] += result["times"]
                        pooled[backend]["peak_mib"] = max(pooled[backend]["peak_mib"], result["peak_mib"])
                    else:
                        pooled[backend] = result
        results = list(pooled.values())
        rounds = f" in each of {args.rounds} alternating rounds" if args.rounds > 1 else ""
        print(f"\n{args.model}, {args.backbone}, {args.image_size}x{args.image_size}, batch {args.batch_size}, "
              f"{args.threads} threads, "
              f"{args.runs} runs after 1 warm-up{rounds}\n")
        print(report(results, work, args.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
