"""The README's main job: learn AnomalyCLIP's prompts on some demo categories, test zero-shot on others.

    python -m anomalib_zsad.demo                                   # ViT-B-16 / openai at 224 px (CPU-friendly)
    python -m anomalib_zsad.demo --backbone ViT-L-14-336 --image-size 518     # the paper's setting
    python -m anomalib_zsad.demo --backbone zsad-tiny --pretrained none       # offline smoke run, random CLIP

It generates the offline demo set (real texture photographs with synthetic defects), trains the
prompts on the training categories' test splits (the zero-shot protocol: auxiliary data), tests on
each held-out category, prints the paper-style table and writes, under ``--output``:

* ``results.md`` / ``results.csv``: the table, with the model, backbone, weights, image size, seed,
  date and command that made it (``results.md``);
* ``heatmaps.png``: per test category a few anomalous and normal images, each as image | ground
  truth outline | anomaly map, on one colour scale for the model (the range of its maps over every
  test image), with a colour bar, and each image's score and predicted label;
* ``<category>/images/``: anomalib's own per-image visualisations, one folder per test category.

The CLIP is loaded first: without its weights the job stops at once, with the message that says
which file to supply, before any data or result folder is written.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any

MODEL_NAME = "AnomalyCLIP"
RANDOM_WEIGHTS_BANNER = "RANDOM WEIGHTS (--pretrained none): numbers meaningless, this run only shows the flow"
DATASET_SEED = 0  # the demo set is the same whatever --seed says


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
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts, a random CLIP and the batch order")
    parser.add_argument("--heatmaps", type=int, default=2,
                        help="anomalous and as many normal images per test category in heatmaps.png")
    return parser.parse_args(argv)


def random_weights(args: argparse.Namespace) -> bool:
    return args.pretrained.lower() in {"none", "random"}


def build_model(args: argparse.Namespace):  # noqa: ANN201
    from anomalib_zsad.models import AnomalyCLIP

    pretrained = None if random_weights(args) else args.pretrained
    model = AnomalyCLIP(backbone=args.backbone, pretrained=pretrained, image_size=args.image_size, seed=args.seed)
    _ = model.model  # the CLIP (and its weights) now, in case the model builds it lazily
    return model


def markdown_table(rows: list[dict]) -> str:
    metrics = [name for name in rows[0] if name != "category"]
    head = "| category | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 1)]
    for row in rows:
        lines.append(f"| {row['category']} | " + " | ".join(f"{100 * row[m]:.1f}" for m in metrics) + " |")
    return "\n".join(lines)


def weights_description(args: argparse.Namespace) -> str:
    if random_weights(args):
        return f"none: random CLIP weights (seed {args.seed})"
    return args.pretrained


def run_description(args: argparse.Namespace, command: str, date: str) -> dict[str, str]:
    """Everything that made a result, as results.md prints it."""
    import anomalib
    import torch

    return {
        "model": MODEL_NAME,
        "backbone": args.backbone,
        "pretrained weights": weights_description(args),
        "image size": f"{args.image_size} px",
        "seed": f"{args.seed} (demo data set: seed {DATASET_SEED})",
        "prompts learnt on": f"{', '.join(args.train_categories)} (their test splits), {args.epochs} epoch(s)",
        "tested zero-shot on": ", ".join(args.test_categories),
        "date": date,
        "command": f"`{command}`",
        "software": f"anomalib {anomalib.__version__}, torch {torch.__version__}",
    }


def results_markdown(args: argparse.Namespace, rows: list[dict], command: str, date: str) -> str:
    lines = [f"# {MODEL_NAME} zero-shot on the demo set", ""]
    if random_weights(args):
        lines += [f"> **{RANDOM_WEIGHTS_BANNER}.**", ""]
    lines += ["| run | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in run_description(args, command, date).items()]
    lines += ["", "Scores in % (paper style: not normalised across categories):", "", markdown_table(rows), "",
              "Figure: `heatmaps.png`; anomalib's per-image visualisations: "
              + ", ".join(f"`{c}/images/`" for c in args.test_categories), ""]
    return "\n".join(lines)


class CollectedOutputs:
    """Collects, from anomalib's own test pass, what the heat-map figure needs: the range of every
    anomaly map of the model (for one shared colour scale) and the first ``per_kind`` anomalous and
    normal images of each category (score, label, map, mask)."""

    def __init__(self, per_kind: int) -> None:
        from lightning.pytorch import Callback

        outer = self

        class _Collector(Callback):
            def on_test_batch_end(self, trainer, pl_module, outputs, batch, *args: Any) -> None:  # noqa: ANN001, ANN401
                outer.add(outputs)

        self.callback = _Collector()
        self.per_kind = per_kind
        self.category = ""
        self.samples: dict[str, dict[str, list[dict]]] = {}
        self.map_min, self.map_max = math.inf, -math.inf

    def add(self, batch: Any) -> None:  # noqa: ANN401
        maps = batch.anomaly_map.detach().float().cpu()
        maps = maps.reshape(maps.shape[0], *maps.shape[-2:])
        self.map_min = min(self.map_min, float(maps.min()))
        self.map_max = max(self.map_max, float(maps.max()))
        kinds = self.samples.setdefault(self.category, {"anomalous": [], "normal": []})
        masks = batch.gt_mask
        for i in range(maps.shape[0]):
            kind = "anomalous" if int(batch.gt_label[i]) == 1 else "normal"
            if len(kinds[kind]) >= self.per_kind:
                continue
            mask = masks[i].detach().float().cpu().reshape(masks.shape[-2:]) if masks is not None else None
            kinds[kind].append({"path": str(batch.image_path[i]), "score": float(batch.pred_score[i]),
                                "map": maps[i].clone(), "mask": mask})


def _threshold(model: Any, name: str) -> float:  # noqa: ANN401
    value = getattr(getattr(model, "post_processor", None), name, None)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def draw_heatmaps(outputs: CollectedOutputs, path: Path, *, title: str, banner: str | None = None,
                  image_threshold: float = math.nan, pixel_threshold: float = math.nan) -> dict:
    """Per category one row of anomalous and one of normal images, each as three panels: the
    image | the ground-truth outline | the anomaly map over the image. All maps share one colour
    scale (``outputs``' range over the whole test set), shown by a colour bar with the pixel
    threshold marked. Returns what was drawn, read back from the figure's artists."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import Normalize
    from PIL import Image

    vmin, vmax = outputs.map_min, outputs.map_max
    if not vmax > vmin:  # a constant map: widen so that the colour bar still draws
        vmin, vmax = vmin - 1e-6, vmax + 1e-6
    norm = Normalize(vmin=vmin, vmax=vmax)
    rows = [(c, kind, kinds[kind]) for c, kinds in outputs.samples.items() for kind in ("anomalous", "normal")]
    columns = 3 * max(outputs.per_kind, 1)
    threshold_note = "" if math.isnan(image_threshold) else f"; label: score > image threshold {image_threshold:.3f}"
    width = 2.1 * columns + 1.9
    # Text wrapped to the figure's width (about 0.085 in a character at 11 pt, 0.125 at 14 pt bold).
    legend = (f"red outline: ground truth; colour: anomaly map (scale on the right){threshold_note}; "
              "✓/✗: predicted label right/wrong")
    title_lines = [line for part in (title, legend) for line in textwrap.wrap(part, int(width / 0.085))]
    banner_lines = textwrap.wrap(banner, int((width - 0.6) / 0.125)) if banner else []
    # Heights in inches: the title, the banner, then the rows of panels.
    row_height = 2.35
    title_height = 0.22 * len(title_lines) + 0.35
    banner_height = 0.3 * len(banner_lines) + 0.55 if banner else 0.0
    height = title_height + banner_height + row_height * len(rows) + 0.1
    figure = plt.figure(figsize=(width, height))
    grid = figure.add_gridspec(len(rows), columns + 1, width_ratios=[1] * columns + [0.12],
                               left=0.55 / width, right=1 - 1.05 / width, bottom=0.1 / height,
                               top=1 - (title_height + banner_height) / height, wspace=0.08, hspace=0.3)
    for r, (category, kind, samples) in enumerate(rows):
        for s in range(outputs.per_kind):
            axes = [figure.add_subplot(grid[r, 3 * s + j]) for j in range(3)]
            for axis in axes:
                axis.set_xticks([])
                axis.set_yticks([])
            if s == 0:
                axes[0].set_ylabel(f"{category}\n{kind}", fontsize=11, fontweight="bold")
            if s >= len(samples):
                for axis in axes:
                    axis.axis("off")
                axes[1].text(0.5, 0.5, f"no more {kind} images", ha="center", va="center", fontsize=8,
                             transform=axes[1].transAxes)
                continue
            sample = samples[s]
            amap = sample["map"].numpy()
            image = np.asarray(Image.open(sample["path"]).convert("RGB").resize(amap.shape[::-1], Image.BICUBIC))
            mask = sample["mask"].numpy() if sample["mask"] is not None else np.zeros_like(amap)
            name = "/".join(Path(sample["path"]).parts[-2:])
            axes[0].imshow(image)
            axes[0].set_title(name, fontsize=8)
            axes[1].imshow(image)
            if mask.max() > 0.5:
                axes[1].contour(mask, levels=[0.5], colors="red", linewidths=1.5)
                axes[1].set_title("ground truth (red)", fontsize=8)
            else:
                axes[1].set_title("ground truth: no defect", fontsize=8)
            axes[2].imshow(image)
            axes[2].imshow(amap, cmap="jet", norm=norm, alpha=0.5, gid="heatmap")
            if mask.max() > 0.5:
                axes[2].contour(mask, levels=[0.5], colors="white", linewidths=0.8)
            score = f"score {sample['score']:.3f}"
            if math.isnan(image_threshold):
                axes[2].set_title(score, fontsize=9)
            else:
                predicted = "anomalous" if sample["score"] > image_threshold else "normal"
                right = predicted == kind
                axes[2].set_title(f"{score} → {predicted} {'✓' if right else '✗'}", fontsize=9, fontweight="bold",
                                  color="green" if right else "red")
    colour_axis = figure.add_subplot(grid[:, columns])
    bar = figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="jet"), cax=colour_axis)
    label = f"{MODEL_NAME} anomaly map, one scale: its range over every test image"
    if vmin <= pixel_threshold <= vmax:
        colour_axis.axhline(pixel_threshold, color="black", linewidth=2.5)
        label += f"\nblack line: pixel threshold {pixel_threshold:.3g}"
    bar.set_label(label, fontsize=9)
    figure.suptitle("\n".join(title_lines), fontsize=11, y=1 - 0.1 / height, va="top")
    if banner:
        figure.text(0.5, 1 - (title_height + 0.15 * len(banner_lines) + 0.1) / height, "\n".join(banner_lines),
                    ha="center", va="center", multialignment="center",
                    fontsize=14, fontweight="bold", color="white", gid="banner",
                    bbox={"facecolor": "red", "edgecolor": "darkred", "boxstyle": "round,pad=0.4"})
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    drawn = {
        "title": figure._suptitle.get_text().replace("\n", " ") if figure._suptitle else "",  # noqa: SLF001
        "banner": next((t.get_text().replace("\n", " ") for t in figure.texts if t.get_gid() == "banner"), None),
        "heatmap_clims": [image.get_clim() for axis in figure.axes for image in axis.get_images()
                          if image.get_gid() == "heatmap"],
        "colourbar_clim": bar.mappable.get_clim(),
        "panel_titles": [axis.get_title() for axis in figure.axes if axis.get_title()],
        "rows": [(category, kind, len(samples)) for category, kind, samples in rows],
    }
    plt.close(figure)
    return drawn


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "anomalib_zsad.demo", *argv])
    logging.basicConfig(level=logging.WARNING)
    from anomalib_zsad.clip import ClipWeightsUnavailableError

    try:
        model = build_model(args)  # first: without weights, stop before anything is written
    except ClipWeightsUnavailableError as error:
        print(f"\n{error}\n\nOffline smoke run instead: python -m anomalib_zsad.demo --backbone zsad-tiny "
              "--pretrained none", file=sys.stderr)
        return 2

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_zsad.data import CrossDataset, make_demo_dataset
    from anomalib_zsad.models.components.lightning import PAPER_METRICS

    seed_everything(args.seed, verbose=False)
    categories = [*args.train_categories, *args.test_categories]
    root = make_demo_dataset(args.root, seed=DATASET_SEED, categories=categories)
    print(f"demo data set: {root}")
    if random_weights(args):
        print(f"\n*** {RANDOM_WEIGHTS_BANNER} ***\n")

    def target(category: str) -> CrossDataset:
        return CrossDataset(train=MVTecAD(root=root), test=MVTecAD(root=root, category=category),
                            train_categories=args.train_categories, train_batch_size=8, eval_batch_size=8,
                            num_workers=0, seed=args.seed)

    datamodules = {c: target(c) for c in args.test_categories}
    outputs = CollectedOutputs(max(args.heatmaps, 0))
    # Training validates on the first target category (anomalib sets the thresholds there); its
    # checkpoints go under training/.
    engine = Engine(max_epochs=args.epochs, default_root_dir=args.output / "training", logger=False,
                    callbacks=[outputs.callback])
    engine.fit(model, datamodule=datamodules[args.test_categories[0]])
    rows = []
    for category, datamodule in datamodules.items():
        outputs.category = category
        if hasattr(getattr(model, "visualizer", None), "output_dir"):
            # anomalib keeps the first test's folder and names files test/<defect>/<n>.png: one
            # folder per category, or the second category overwrites the first.
            model.visualizer.output_dir = args.output / category / "images"
        result = engine.test(model, datamodule=datamodule, verbose=False)[0]
        rows.append({"category": category, **{m: float(result[m]) for m in PAPER_METRICS}})
    rows.append({"category": "mean", **{m: sum(r[m] for r in rows) / len(rows) for m in PAPER_METRICS}})

    args.output.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    (args.output / "results.md").write_text(results_markdown(args, rows, command, date))
    (args.output / "results.csv").write_text(
        "category," + ",".join(PAPER_METRICS) + "\n"
        + "\n".join(f"{r['category']}," + ",".join(f"{r[m]:.4f}" for m in PAPER_METRICS) for r in rows) + "\n")
    if args.heatmaps > 0:
        draw_heatmaps(outputs, args.output / "heatmaps.png",
                      title=f"{MODEL_NAME} · {args.backbone} / {weights_description(args)} · {args.image_size} px · "
                            f"prompts learnt on {', '.join(args.train_categories)}, zero-shot on the others",
                      banner=RANDOM_WEIGHTS_BANNER if random_weights(args) else None,
                      image_threshold=_threshold(model, "image_threshold"),
                      pixel_threshold=_threshold(model, "pixel_threshold"))
    print(f"\n{MODEL_NAME} ({args.backbone} / {weights_description(args)}, {args.image_size} px), prompts learnt on "
          f"{', '.join(args.train_categories)}; zero-shot on the others (%):\n")
    print(markdown_table(rows))
    if random_weights(args):
        print(f"\n*** {RANDOM_WEIGHTS_BANNER} ***")
    print(f"\nwritten: {args.output / 'results.md'}, {args.output / 'results.csv'}"
          + (f", {args.output / 'heatmaps.png'}" if args.heatmaps > 0 else ""))
    print("anomalib's per-image visualisations: "
          + ", ".join(str(args.output / c / "images") for c in args.test_categories))
    return 0


if __name__ == "__main__":
    sys.exit(main())
