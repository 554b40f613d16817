"""How each threshold source transfers to unseen categories: precision, recall and F1 at its threshold.

    python benchmarks/thresholds.py --backbone zsad-tiny --pretrained none          # offline smoke run (random CLIP)
    python benchmarks/thresholds.py --backbone ViT-B-16 --pretrained openai --image-size 224 --epochs 5   # real weights

The zero-shot protocol through anomalib: the model is trained on the demo set's auxiliary categories
(``Engine.fit`` on a ``CrossDataset``) with ``AuxiliaryThresholds`` as its threshold source, so that
``--holdout`` of the auxiliary images is held out of training and gives the F1-optimal thresholds.
Then, for each unseen test category, the thresholds of every source are applied to its test images
(never seen in training, never used by any source):

* ``auxiliary``: the thresholds from the held-out auxiliary images (one pair for all categories);
* ``normal_images``: a quantile of the scores / map values of ``--k`` normal images of the category's
  train split (``--image-quantile``, ``--pixel-quantile``);
* ``fixed``: ``--fixed IMAGE PIXEL`` on the model's raw scale;
* ``oracle``: anomalib's default, F1-optimal on the labelled test images themselves (what
  validation on the target gives, an upper bound no zero-shot user has).

For each: image-level and pixel-level precision, recall and F1 of ``score > threshold``, against the
F1-max (the best F1 any threshold reaches on those images). Random CLIP weights (``--pretrained
none``) make every number meaningless as a measure of the method; the run says so in its output.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from pathlib import Path

RANDOM = {"none", "random"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="AnomalyCLIP", help="a model of anomalib_zsad.models")
    parser.add_argument("--backbone", default="zsad-tiny")
    parser.add_argument("--pretrained", default="none", help="open_clip tag, checkpoint path, or 'none' (random)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("datasets/zsad_thresholds"), help="demo set (made if absent)")
    parser.add_argument("--output", type=Path, default=Path("results/thresholds"))
    parser.add_argument("--train-categories", nargs="+", default=["brick", "grass", "gravel"])
    parser.add_argument("--test-categories", nargs="+", default=["tissue", "coffee", "moon"])
    parser.add_argument("--n-train", type=int, default=8, help="normal train images per category (normal_images)")
    parser.add_argument("--test-good", type=int, default=10)
    parser.add_argument("--test-defect", type=int, default=10)
    parser.add_argument("--holdout", type=float, default=0.2, help="auxiliary hold-out fraction")
    parser.add_argument("--k", type=int, default=8, help="normal target images of normal_images")
    parser.add_argument("--image-quantile", type=float, default=0.99)
    parser.add_argument("--pixel-quantile", type=float, default=0.999)
    parser.add_argument("--fixed", nargs=2, type=float, default=[0.5, 2.0], metavar=("IMAGE", "PIXEL"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def scores_of(model, dataset) -> tuple:
    """Scores, labels, map values and mask values of a dataset's images (as Engine.test sees them)."""
    import torch

    from anomalib_zsad.models.components.thresholds import run_model

    scores, labels, maps, masks = [], [], [], []
    for batch in run_model(model, dataset):
        scores.append(batch.pred_score.reshape(-1).float().cpu())
        labels.append(batch.gt_label.reshape(-1).int().cpu())
        maps.append(batch.anomaly_map.float().cpu().flatten())
        masks.append((batch.gt_mask.cpu() > 0).int().flatten())
    return torch.cat(scores), torch.cat(labels), torch.cat(maps), torch.cat(masks)


def at_threshold(values, truth, threshold: float) -> tuple[float, float, float]:
    predicted, truth = values > threshold, truth.bool()
    tp, fp, fn = int((predicted & truth).sum()), int((predicted & ~truth).sum()), int((~predicted & truth).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return precision, recall, (2 * tp / (2 * tp + fp + fn) if tp else 0.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    import anomalib_zsad.models
    from anomalib_zsad.data import CrossDataset, make_demo_dataset
    from anomalib_zsad.models.components.post_processing import RawScorePostProcessor
    from anomalib_zsad.models.components.thresholds import (
        AuxiliaryThresholds,
        NormalImageThresholds,
        f1_optimal_threshold,
    )

    torch.manual_seed(args.seed)
    random_weights = args.pretrained.lower() in RANDOM
    root = make_demo_dataset(args.root, seed=args.seed, categories=[*args.train_categories, *args.test_categories],
                             image_size=args.image_size, n_train=args.n_train, n_test_good=args.test_good,
                             n_test_defect=args.test_defect)
    model = getattr(anomalib_zsad.models, args.model)(
        backbone=args.backbone, pretrained=None if random_weights else args.pretrained, image_size=args.image_size,
        post_processor=RawScorePostProcessor(threshold_source=AuxiliaryThresholds(holdout=args.holdout,
                                                                                  seed=args.seed)))

    def cross(category: str) -> CrossDataset:
        return CrossDataset(train=MVTecAD(root=root), test=MVTecAD(root=root, category=category),
                            train_categories=args.train_categories, train_batch_size=8, eval_batch_size=8,
                            num_workers=0, seed=args.seed)

    engine = Engine(max_epochs=args.epochs, default_root_dir=args.output, logger=False, accelerator="cpu",
                    enable_progress_bar=False)
    print(f"training {args.model} ({args.backbone}, {args.pretrained}, {args.image_size} px) on "
          f"{', '.join(args.train_categories)}, {args.holdout:.0%} of them held out for thresholds ...", flush=True)
    engine.fit(model, datamodule=cross(args.test_categories[0]))
    post = model.post_processor
    auxiliary = (float(post.image_threshold), float(post.pixel_threshold))
    normal = NormalImageThresholds(k=args.k, image_quantile=args.image_quantile, pixel_quantile=args.pixel_quantile,
                                   seed=args.seed)

    rows = []
    for category in args.test_categories:
        datamodule = cross(category)
        datamodule.setup("test")
        scores, labels, maps, masks = scores_of(model, datamodule.test_data)
        normal_stats = normal.compute(model, datamodule)
        sources = {
            "auxiliary": auxiliary,
            "normal_images": (normal_stats.image_threshold, normal_stats.pixel_threshold),
            "fixed": tuple(args.fixed),
            "oracle": (f1_optimal_threshold(scores, labels), f1_optimal_threshold(maps, masks)),
        }
        best_image = at_threshold(scores, labels, sources["oracle"][0])[2]
        best_pixel = at_threshold(maps, masks, sources["oracle"][1])[2]
        for name, (image_threshold, pixel_threshold) in sources.items():
            rows.append((category, name, image_threshold, *at_threshold(scores, labels, image_threshold), best_image,
                         pixel_threshold, *at_threshold(maps, masks, pixel_threshold), best_pixel))

    header = ("| category | source | image thr. | P | R | F1 | F1-max | pixel thr. | P | R | F1 | F1-max |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for category, name, it, ip, ir, if1, ibest, pt, pp, pr, pf1, pbest in rows:
        lines.append(f"| {category} | {name} | {it:.4g} | {ip:.2f} | {ir:.2f} | {if1:.2f} | {ibest:.2f} "
                     f"| {pt:.4g} | {pp:.2f} | {pr:.2f} | {pf1:.2f} | {pbest:.2f} |")
    means = []
    for name in ("auxiliary", "normal_images", "fixed", "oracle"):
        chosen = [row for row in rows if row[1] == name]
        mean = [sum(row[i] for row in chosen) / len(chosen) for i in (5, 6, 10, 11)]
        means.append(f"| mean | {name} | | | | {mean[0]:.2f} | {mean[1]:.2f} | | | | {mean[2]:.2f} | {mean[3]:.2f} |")
    table = "\n".join(lines + means)
    command = "python benchmarks/thresholds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    banner = ("**RANDOM CLIP WEIGHTS: smoke run of the flow, the numbers say nothing of the method.**\n\n"
              if random_weights else "")
    provenance = (f"{args.model}, {args.backbone} ({args.pretrained}), {args.image_size} px, {args.epochs} epochs on "
                  f"{', '.join(args.train_categories)} ({args.holdout:.0%} held out), tested on "
                  f"{', '.join(args.test_categories)} ({args.test_good} good + {args.test_defect} defective each); "
                  f"normal_images k={args.k}, quantiles {args.image_quantile} / {args.pixel_quantile}; fixed "
                  f"{args.fixed[0]} / {args.fixed[1]}; seed {args.seed}; "
                  f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}; `{command.strip()}`")
    text = f"{banner}{provenance}\n\n{table}\n"
    print("\n" + text)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "thresholds.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
