"""Images per second of every plugin model on this machine, at several batch sizes, to size a deployment.

    python benchmarks/throughput.py                                  # every model, batches 1, 4, 8, defaults
    python benchmarks/throughput.py --models Vand BayesPFL --batch-sizes 1 8 --runs 2
    python benchmarks/throughput.py --backbone zsad-tiny --image-size 64 --bgad-backbone resnet18 \
        --bgad-image-size 64 --m3dm-backbone vit_tiny_patch16_224 --m3dm-image-size 64 --m3dm-groups 64 \
        --runs 1                                                                    # smoke run

Each model runs in its own process (its peak memory is its own), with ``--threads`` threads and
random weights (enough for timing: no weights can be downloaded here): one warm-up call at the first
batch size, then ``--runs`` timed calls of the torch model (``model.model``, inference mode) per batch
size. The CLIP models run at ``--backbone`` / ``--image-size`` (default: their own defaults,
ViT-L/14@336 at 518 px); BGAD at its default backbone and size; M3DM with its memory banks fitted on
``--m3dm-train`` random normal samples (random organized clouds), since it has no scores before that.
The table gives images per second at the median time of each batch size and the peak resident memory.
For the exported backends (OpenVINO FP32/INT8) of one model, use ``latency.py --batch-size``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import peak_rss_mib  # (the same measure of peak memory as the latency table)

MODELS = ("AnomalyCLIP", "Vand", "AdaCLIP", "AACLIP", "BayesPFL", "GlocalCLIP", "CLIPBaseline", "CoOp", "BGAD", "M3DM")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--runs", type=int, default=1, help="timed calls per batch size, after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbone", help="CLIP models' backbone (default: each model's, ViT-L-14-336)")
    parser.add_argument("--image-size", type=int, help="CLIP models' image size (default: each model's, 518)")
    parser.add_argument("--bgad-backbone", help="BGAD's timm backbone (default: its own, tf_efficientnet_b6)")
    parser.add_argument("--bgad-image-size", type=int, help="BGAD's image size (default: its own, 256)")
    parser.add_argument("--m3dm-backbone", help="M3DM's RGB backbone (default: its own, DINO ViT-B/8)")
    parser.add_argument("--m3dm-image-size", type=int, help="M3DM's image size (default: its own, 224)")
    parser.add_argument("--m3dm-groups", type=int, help="M3DM's point groups (default: its own, 1024)")
    parser.add_argument("--m3dm-train", type=int, default=8, help="random normal samples M3DM's banks are fitted on")
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batch_sizes) or args.runs < 1 or args.threads < 1 or args.m3dm_train < 1:
        parser.error("--batch-sizes, --runs, --threads and --m3dm-train must be positive")
    return args


def build(name: str, args: argparse.Namespace):
    """-> (the torch model, a function batch size -> its inputs, a description of the setting)."""
    import torch

    import anomalib_zsad.models

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cls = getattr(anomalib_zsad.models, name)
    if name == "BGAD":
        options = {"backbone": args.bgad_backbone} if args.bgad_backbone else {}
        options |= {"image_size": args.bgad_image_size} if args.bgad_image_size else {}
        module = cls(pretrained=None, **options)
    elif name == "M3DM":
        options = {"backbone": args.m3dm_backbone} if args.m3dm_backbone else {}
        options |= {"image_size": args.m3dm_image_size} if args.m3dm_image_size else {}
        options |= {"num_group": args.m3dm_groups} if args.m3dm_groups else {}
        module = cls(pretrained=None, point_checkpoint=None, **options)
    else:
        options = {"backbone": args.backbone} if args.backbone else {}
        options |= {"image_size": args.image_size} if args.image_size else {}
        module = cls(pretrained=None, **options)
    model = module.model.eval()
    size = _input_size(module)
    setting = f"{module.settings['backbone']}, {size[0]}x{size[1]}"

    def images(batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, *size, generator=gen)

    if name != "M3DM":
        return model, lambda batch: (images(batch),), setting

    def clouds(batch: int) -> torch.Tensor:
        return torch.rand(batch, 3, *size, generator=gen)

    with torch.inference_mode():
        for _ in range(args.m3dm_train):
            model.add_training_batch(images(1), clouds(1))
        model.fit()
    return model, lambda batch: (images(batch), clouds(batch)), f"{setting}, banks of {args.m3dm_train} samples"


def _input_size(module) -> tuple[int, int]:
    """The model's input size, read from the settings its constructor checked."""
    size = module.settings["image_size"]
    return (size, size) if isinstance(size, int) else tuple(size)


def worker(name: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model, inputs, setting = build(name, args)
    result = {"model": name, "setting": setting, "seconds": {}}
    with torch.inference_mode():
        model(*inputs(args.batch_sizes[0]))  # warm-up (caches: resized position embeddings, text features)
        for batch in args.batch_sizes:
            data, times = inputs(batch), []
            for _ in range(args.runs):
                start = time.perf_counter()
                model(*data)
                times.append(time.perf_counter() - start)
            result["seconds"][str(batch)] = times
    result["peak_mib"] = peak_rss_mib()
    return result


def run_model(name: str, args: argparse.Namespace, argv: list[str]) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run([sys.executable, __file__, *argv, "--worker", name], capture_output=True, text=True,
                          env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def report(results: list[dict], batch_sizes: list[int]) -> str:
    header = " | ".join(f"images/s at batch {b}" for b in batch_sizes)
    lines = [f"| model | setting | {header} | peak MiB |", "|---|---|" + "---|" * len(batch_sizes) + "---|"]
    for r in results:
        rates = " | ".join(f"{b / statistics.median(r['seconds'][str(b)]):.3g}" for b in batch_sizes)
        lines.append(f"| {r['model']} | {r['setting']} | {rates} | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    results, failed = [], []
    for name in args.models:
        print(f"timing {name} ...", flush=True)
        if (result := run_model(name, args, argv)) is None:
            failed.append(name)
            continue
        rates = {b: round(int(b) / statistics.median(t), 3) for b, t in result["seconds"].items()}
        print(f"  {name}: images/s {rates}, peak {result['peak_mib']:.0f} MiB", flush=True)
        results.append(result)
    print(f"\n{args.threads} threads, {args.runs} timed call(s) per batch size after 1 warm-up, random weights\n")
    print(report(results, args.batch_sizes))
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
