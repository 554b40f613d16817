"""The README's main job: learn AnomalyCLIP's prompts on some demo categories, test zero-shot on others.

    python -m anomalib_zsad.demo                                   # ViT-B-16 / openai at 224 px (CPU-friendly)
    python -m anomalib_zsad.demo --backbone ViT-L-14-336 --image-size 518     # the paper's setting
    python -m anomalib_zsad.demo --backbone zsad-tiny --pretrained none       # offline smoke run, random CLIP

It generates the offline demo set (real texture photographs with synthetic defects), trains the
prompts on the training categories' test splits (the zero-shot protocol: auxiliary data), tests on
each held-out category, prints the paper-style table, writes it as CSV/Markdown and draws a few
heatmaps. The CLIP is loaded first: without its weights the job stops at once, with the message
that says which file to supply, before any data or result folder is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

PAPER_METRICS = ("image_AUROC", "image_AUPR", "image_F1Max", "pixel_AUROC", "pixel_AUPRO", "pixel_F1Max")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m anomalib_zsad.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("datasets/zsad_demo"), help="demo data set folder")
    parser.add_argument("--output", type=Path, default=Path("results/zsad_demo"), help="results folder")
    parser.add_argument("--backbone", default="ViT-B-16", help="open_clip architecture (paper: ViT-L-14-336)")
    parser.add_argument("--pretrained", default="openai", help="open_clip tag, a checkpoint path, or 'none'")
    parser.add_argument("--image-size", type=int, default=224, help="input size (paper: 518)")
    parser.add_argument("--train-categories", nargs="+", default=["brick", "grass", "gravel"])
    parser.add_argument("--test-categories", nargs="+", default=["tissue", "coffee"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--heatmaps", type=int, default=4, help="images per test category in the heatmap figure")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace):  # noqa: ANN201
    from anomalib_zsad.models import AnomalyCLIP  # noqa: PLC0415

    pretrained = None if args.pretrained.lower() in {"none", "random"} else args.pretrained
    return AnomalyCLIP(backbone=args.backbone, pretrained=pretrained, image_size=args.image_size)


def markdown_table(rows: list[dict]) -> str:
    head = "| category | " + " | ".join(PAPER_METRICS) + " |"
    lines = [head, "|" + "---|" * (len(PAPER_METRICS) + 1)]
    for row in rows:
        lines.append(f"| {row['category']} | " + " | ".join(f"{100 * row[m]:.1f}" for m in PAPER_METRICS) + " |")
    return "\n".join(lines)


def draw_heatmaps(model, datamodules: dict, count: int, path: Path) -> None:  # noqa: ANN001
    """Image, ground truth and anomaly map for a few anomalous test images of each category."""
    import matplotlib as mpl  # noqa: PLC0415

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from anomalib_zsad.models.components.lightning import CLIP_MEAN, CLIP_STD  # noqa: PLC0415

    rows = []
    for category, datamodule in datamodules.items():
        batch = next(iter(datamodule.test_dataloader()))
        keep = torch.nonzero(batch.gt_label == 1).flatten()[:count]
        images = model.pre_processor.transform(batch.image[keep])
        with torch.no_grad():
            maps = model.model.eval()(images).anomaly_map
        masks = torch.nn.functional.interpolate(batch.gt_mask[keep][:, None].float(), size=maps.shape[-2:])[:, 0]
        mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
        rows += [(category, (img * std + mean).clamp(0, 1), m, a) for img, m, a in zip(images, masks, maps, strict=True)]
    figure, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for (category, image, mask, amap), row in zip(rows, axes, strict=True):
        row[0].imshow(image.permute(1, 2, 0).numpy())
        row[0].set_ylabel(category)
        row[1].imshow(mask.numpy(), cmap="gray")
        row[2].imshow(image.permute(1, 2, 0).numpy())
        row[2].imshow(amap.numpy(), cmap="jet", alpha=0.5)
        for axis, title in zip(row, ("image", "ground truth", "AnomalyCLIP map"), strict=True):
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from anomalib_zsad.clip import ClipWeightsUnavailableError  # noqa: PLC0415

    try:
        model = build_model(args)  # first: without weights, stop before anything is written
    except ClipWeightsUnavailableError as error:
        print(f"\n{error}\n\nOffline smoke run instead: python -m anomalib_zsad.demo --backbone zsad-tiny "
              "--pretrained none", file=sys.stderr)
        return 2

    from anomalib.data import MVTecAD  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415

    from anomalib_zsad.data import CrossDataset, make_demo_dataset  # noqa: PLC0415

    categories = [*args.train_categories, *args.test_categories]
    root = make_demo_dataset(args.root, seed=0, categories=categories)
    print(f"demo data set: {root}")

    def target(category: str) -> CrossDataset:
        return CrossDataset(train=MVTecAD(root=root), test=MVTecAD(root=root, category=category),
                            train_categories=args.train_categories, train_batch_size=8, eval_batch_size=8,
                            num_workers=0)

    datamodules = {c: target(c) for c in args.test_categories}
    engine = Engine(max_epochs=args.epochs, default_root_dir=args.output, logger=False)
    engine.fit(model, datamodule=datamodules[args.test_categories[0]])
    rows = []
    for category, datamodule in datamodules.items():
        result = engine.test(model, datamodule=datamodule, verbose=False)[0]
        rows.append({"category": category, **{m: float(result[m]) for m in PAPER_METRICS}})
    rows.append({"category": "mean", **{m: sum(r[m] for r in rows) / len(rows) for m in PAPER_METRICS}})

    args.output.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (args.output / "results.md").write_text(table + "\n")
    (args.output / "results.csv").write_text(
        "category," + ",".join(PAPER_METRICS) + "\n"
        + "\n".join(f"{r['category']}," + ",".join(f"{r[m]:.4f}" for m in PAPER_METRICS) for r in rows) + "\n")
    for datamodule in datamodules.values():
        datamodule.setup("test")
    draw_heatmaps(model, datamodules, args.heatmaps, args.output / "heatmaps.png")
    print(f"\nAnomalyCLIP, prompts learnt on {', '.join(args.train_categories)}; zero-shot on the others (%):\n")
    print(table)
    print(f"\nwritten: {args.output / 'results.md'}, {args.output / 'results.csv'}, {args.output / 'heatmaps.png'}")
    print(f"anomalib's per-image visualisations: {args.output}/**/images/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
