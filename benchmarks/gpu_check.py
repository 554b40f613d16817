"""GPU readiness check: every plugin CLIP model trains one epoch and tests on the offline demo set, in
fp32 and mixed precision, with outputs held to the CPU's; then the latency table's ``torch-cuda``
column at the papers' backbone and resolution.

    python benchmarks/gpu_check.py                          # on a CUDA machine: everything below
    python benchmarks/gpu_check.py --models AnomalyCLIP Vand --precisions 32 bf16-mixed
    python benchmarks/gpu_check.py --device cpu --models Vand --precisions 32 --no-latency   # CPU fallback

What it checks, per CLIP model (BGAD and M3DM need their own data: their flows run in the test
suite) and precision (Lightning's ``--trainer.precision``):

1. ``Engine.fit`` for ``--epochs`` epochs on auxiliary demo categories, then ``Engine.test`` on an
   unseen one: both finish, and the paper metrics are numbers in [0, 1];
2. the trained model on the device (under the precision's autocast) against the same weights in
   fp32 on the CPU, on the same images: the largest difference of image score and of anomaly map
   must stay within the precision's tolerance (``32``: 1e-3, TF32 convolutions included;
   ``16-mixed``: 2e-2; ``bf16-mixed``, 8 mantissa bits: 1e-1; scores and maps are in [0, 1]);
3. unless ``--no-latency``: ``benchmarks/latency.py`` with the ``torch-cuda`` backend, for each model,
   at ``--latency-backbone`` / ``--latency-image-size`` (default ViT-L/14@336 at 518 px).

It prints one table and exits 1 on any failure or tolerance breach, 2 when the device is missing.
Nothing needs the network: random CLIP weights (the numbers check the machinery, not accuracy) and
the generated demo set.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOLERANCE = {"32": 1e-3, "16-mixed": 2e-2, "bf16-mixed": 1e-1}
AUTOCAST_DTYPE = {"16-mixed": "float16", "bf16-mixed": "bfloat16"}
TRAIN_CATEGORIES = ("brick", "grass")
TEST_CATEGORY = "coffee"


def clip_models() -> list[str]:
    """The plugin's CLIP models: they all train on the tiny random CLIP and the 2D demo set. BGAD
    (few anomalies of the target) and M3DM (point clouds) have their own data; their anomalib flow
    runs in ``tests/models/test_contract_flow.py``."""
    import anomalib_zsad.models
    from anomalib_zsad.models.components.contract import ClipModelContract

    return [name for name in anomalib_zsad.models.__all__
            if issubclass(getattr(anomalib_zsad.models, name), ClipModelContract)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    models = clip_models()
    parser.add_argument("--models", nargs="+", default=models, choices=models, metavar="MODEL",
                        help="default: every CLIP model of the plugin (%(default)s)")
    parser.add_argument("--precisions", nargs="+", choices=list(TOLERANCE), default=None,
                        help="default: all three on cuda; 32 and bf16-mixed on cpu (no fp16 autocast there)")
    parser.add_argument("--backbone", default="zsad-tiny", help="CLIP of the training check (random weights)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-latency", dest="latency", action="store_false")
    parser.add_argument("--latency-backbone", default="ViT-L-14-336")
    parser.add_argument("--latency-image-size", type=int, default=518)
    parser.add_argument("--work-dir", type=Path, help="keep the demo set and the runs here")
    args = parser.parse_args(argv)
    if args.precisions is None:
        args.precisions = list(TOLERANCE) if args.device == "cuda" else ["32", "bf16-mixed"]
    return args


def largest_differences(model, device: str, precision: str, images) -> tuple[float, float]:
    """Image score and map on ``device`` under the precision's autocast against fp32 on the CPU."""
    import copy

    import torch

    torch_model = model.model.eval()
    on_cpu = copy.deepcopy(torch_model).to("cpu").float()
    with torch.no_grad():
        expected = on_cpu(images)
        dtype = AUTOCAST_DTYPE.get(precision)
        with torch.autocast(device_type=device, dtype=getattr(torch, dtype or "float32"), enabled=dtype is not None):
            actual = torch_model.to(device)(images.to(device))
    score = (actual.pred_score.float().cpu() - expected.pred_score).abs().max().item()
    amap = (actual.anomaly_map.float().cpu() - expected.anomaly_map).abs().max().item()
    return score, amap


def check_training(model_name: str, precision: str, args: argparse.Namespace, demo: Path, work: Path) -> dict:
    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    import anomalib_zsad.models
    from anomalib_zsad.data import CrossDataset
    from anomalib_zsad.models.components.lightning import PAPER_METRICS

    row = {"model": model_name, "precision": precision}
    torch.manual_seed(0)
    model = getattr(anomalib_zsad.models, model_name)(backbone=args.backbone, pretrained=None,
                                                       image_size=args.image_size)
    data = CrossDataset(train=MVTecAD(root=demo), test=MVTecAD(root=demo, category=TEST_CATEGORY),
                        train_categories=list(TRAIN_CATEGORIES), train_batch_size=args.batch_size,
                        eval_batch_size=args.batch_size, num_workers=0)
    engine = Engine(accelerator=args.device, devices=1, precision=precision, max_epochs=args.epochs, logger=False,
                    default_root_dir=work / model_name / precision, enable_progress_bar=False)
    start = time.perf_counter()
    engine.fit(model, datamodule=data)
    row["fit s"] = time.perf_counter() - start
    start = time.perf_counter()
    metrics = engine.test(model, datamodule=data, verbose=False)[0]
    row["test s"] = time.perf_counter() - start
    row["image AUROC"] = metrics.get("image_AUROC", math.nan)
    bad = [name for name in PAPER_METRICS if not 0.0 <= metrics.get(name, math.nan) <= 1.0]
    images = torch.rand(2, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    row["max diff score"], row["max diff map"] = largest_differences(model, args.device, precision, images)
    tolerance = TOLERANCE[precision]
    problems = [f"metrics not in [0, 1]: {bad}"] if bad else []
    problems += [f"{what} differs from CPU fp32 by {row[f'max diff {what}']:.2e} > {tolerance:g}"
                 for what in ("score", "map") if not row[f"max diff {what}"] <= tolerance]
    row["status"] = "; ".join(problems) or "ok"
    return row


def check_latency(model_name: str, args: argparse.Namespace) -> str:
    """``latency.py``'s table for one model (its own processes), or why it failed."""
    backend = "torch-cuda" if args.device == "cuda" else "torch"
    command = [sys.executable, str(Path(__file__).with_name("latency.py")), "--model", model_name,
               "--backbone", args.latency_backbone, "--image-size", str(args.latency_image_size),
               "--backends", backend, "--runs", "3"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    rows = [line for line in done.stdout.splitlines() if line.startswith(f"| {backend} ")]
    if done.returncode or not rows:
        return f"FAILED: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    return rows[0]


def table(rows: list[dict]) -> str:
    columns = ["model", "precision", "fit s", "test s", "image AUROC", "max diff score", "max diff map", "status"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine (use --device cpu for the CPU fallback)",
              file=sys.stderr)
        return 2
    from anomalib_zsad.data import make_demo_dataset

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        demo = make_demo_dataset(work / "zsad_demo", seed=0, categories=(*TRAIN_CATEGORIES, TEST_CATEGORY),
                                 image_size=min(args.image_size, 128), n_train=4, n_test_good=4, n_test_defect=4)
        rows = []
        for model_name in args.models:
            for precision in args.precisions:
                print(f"{model_name} {precision} ...", flush=True)
                try:
                    rows.append(check_training(model_name, precision, args, demo, work))
                except Exception as error:  # noqa: BLE001  (one failing model must not hide the others)
                    rows.append({"model": model_name, "precision": precision,
                                 "status": f"FAILED: {type(error).__name__}: {error}"})
        device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        print(f"\n{device_name}, {args.backbone} (random weights) at {args.image_size} px, {args.epochs} epoch(s)\n")
        print(table(rows))
        latency_failed = False
        if args.latency:
            print(f"\nlatency, {args.latency_backbone} at {args.latency_image_size} px, batch 1\n")
            print("| model | backend | min s | median s | max s | peak MiB | speed-up vs official | max diff |")
            print("|---|---|---|---|---|---|---|---|")
            for model_name in args.models:
                line = check_latency(model_name, args)
                latency_failed |= line.startswith("FAILED")
                print(f"| {model_name} {line}" if line.startswith("|") else f"| {model_name} | {line} |")
    failed = latency_failed or any(row["status"] != "ok" for row in rows)
    print("\nFAILED" if failed else "\nall checks passed")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
