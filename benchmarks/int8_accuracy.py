"""What INT8 costs in accuracy: image and pixel AUROC of the OpenVINO FP32 and INT8 exports on the demo set.

    python benchmarks/int8_accuracy.py                                  # AnomalyCLIP, random zsad-tiny CLIP, 224 px
    python benchmarks/int8_accuracy.py --model Vand --backbone ViT-B-16 --pretrained openai   # with real weights
    python benchmarks/int8_accuracy.py --compression int8_ptq int8_acq  # compare anomalib's two INT8 modes

The zero-shot protocol end to end, through anomalib only: the learnable parts are trained on the
demo set's auxiliary categories (``Engine.fit`` on a ``CrossDataset``), the model is exported with
``Engine.export(export_type="openvino")`` once in FP32 and once per ``--compression`` type (NNCF
post-training quantisation, calibrated on the **auxiliary** categories' images, never on the test
category), and every export is run by anomalib's ``OpenVINOInferencer`` on the held-out
categories' test images. The table gives image and pixel AUROC (%), their change against FP32 in
points, Spearman's rank correlation of the INT8 scores and maps with the FP32 ones (1 = the same
ranking, so the same AUROC on any labels: meaningful even where the AUROC itself is not), and the
time per image.

The demo set used here is larger than the default one (``--test-good``/``--test-defect`` per
category) so that a change of half a point is above the resolution of the metric. Without
pretrained CLIP weights (none can be downloaded here) the CLIP is random: its AUROC says little of
the method, but the change under quantisation is still the change of this network.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

GENERIC = "int8_ptq_generic"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="AnomalyCLIP", help="a model of anomalib_zsad.models")
    parser.add_argument("--backbone", default="zsad-tiny")
    parser.add_argument("--pretrained", default="none", help="open_clip tag, checkpoint path, or 'none' (random)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("datasets/zsad_int8"), help="demo set folder (made if absent)")
    parser.add_argument("--output", type=Path, default=Path("results/int8_accuracy"))
    parser.add_argument("--train-categories", nargs="+", default=["brick", "grass", "gravel"])
    parser.add_argument("--test-categories", nargs="+", default=["tissue", "coffee"])
    parser.add_argument("--test-good", type=int, default=20, help="normal test images per category")
    parser.add_argument("--test-defect", type=int, default=30, help="anomalous test images per category")
    parser.add_argument("--compression", nargs="+", default=["int8_ptq"], choices=["int8_ptq", "int8_acq", "int8", GENERIC],
                        help="anomalib compression types (int8 = weights only); "
                             f"{GENERIC}: NNCF's generic preset, what anomalib itself would do")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace):
    import anomalib_zsad.models

    pretrained = None if args.pretrained.lower() in {"none", "random"} else args.pretrained
    return getattr(anomalib_zsad.models, args.model)(backbone=args.backbone, pretrained=pretrained,
                                                     image_size=args.image_size)


def evaluate(xml: Path, datamodules: dict, threads: int) -> dict:
    """Image and pixel AUROC over all test categories pooled per category then averaged, and the
    median time per image, for one exported model run by anomalib's OpenVINOInferencer."""
    import torch
    from anomalib.deploy import OpenVINOInferencer
    from torchmetrics.functional.classification import binary_auroc

    inferencer = OpenVINOInferencer(path=xml, device="CPU", config={"INFERENCE_NUM_THREADS": threads})
    image_aurocs, pixel_aurocs, per_image, all_scores, all_maps = [], [], [], [], []
    for datamodule in datamodules.values():
        scores, labels, maps, masks = [], [], [], []
        for batch in datamodule.test_dataloader():
            start = time.perf_counter()
            result = inferencer.predict(batch.image.numpy())
            per_image.append((time.perf_counter() - start) / len(batch.image))
            amap = torch.as_tensor(result.anomaly_map).reshape(len(batch.image), *result.anomaly_map.shape[-2:])
            scores.append(torch.as_tensor(result.pred_score).reshape(-1))
            labels.append(batch.gt_label.int())
            masks.append(torch.nn.functional.interpolate(batch.gt_mask[:, None].float(), size=amap.shape[-2:],
                                                         mode="nearest")[:, 0].int())
            maps.append(amap)
        all_scores.append(torch.cat(scores))
        all_maps.append(torch.cat(maps).flatten())
        image_aurocs.append(float(binary_auroc(torch.cat(scores), torch.cat(labels))))
        pixel_aurocs.append(float(binary_auroc(torch.cat(maps).flatten(), torch.cat(masks).flatten())))
    return {"image_AUROC": 100 * statistics.mean(image_aurocs), "pixel_AUROC": 100 * statistics.mean(pixel_aurocs),
            "ms_per_image": 1000 * statistics.median(per_image),
            "scores": torch.cat(all_scores).numpy(), "maps": torch.cat(all_maps).numpy()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    from anomalib.data import MVTecAD
    from anomalib.deploy import CompressionType, ExportType
    from anomalib.engine import Engine

    from anomalib_zsad.data import CrossDataset, make_demo_dataset

    torch.manual_seed(0)
    model = build_model(args)
    root = make_demo_dataset(args.root, seed=0, categories=[*args.train_categories, *args.test_categories],
                             image_size=args.image_size, n_test_good=args.test_good, n_test_defect=args.test_defect)

    def cross(category: str) -> CrossDataset:
        return CrossDataset(train=MVTecAD(root=root), test=MVTecAD(root=root, category=category),
                            train_categories=args.train_categories, train_batch_size=8, eval_batch_size=8,
                            num_workers=0)

    targets = {category: cross(category) for category in args.test_categories}
    engine = Engine(max_epochs=args.epochs, default_root_dir=args.output, logger=False, accelerator="cpu")
    print(f"training {args.model} ({args.backbone}, {args.image_size} px) on {', '.join(args.train_categories)} ...",
          flush=True)
    engine.fit(model, datamodule=targets[args.test_categories[0]])
    for datamodule in targets.values():
        datamodule.setup("test")

    # Calibration data: the test split of an auxiliary category (images the model was trained on), never a target.
    calibration = MVTecAD(root=root, category=args.train_categories[0], val_split_mode="same_as_test",
                          eval_batch_size=8, num_workers=0)
    size = (args.image_size, args.image_size)
    print("exporting fp32 ...", flush=True)
    fp32_xml = Path(engine.export(model, ExportType.OPENVINO, export_root=args.output / "fp32", input_size=size))
    rows = [{"export": "fp32", **evaluate(fp32_xml, targets, args.threads)}]
    for name in args.compression:
        print(f"exporting {name} ...", flush=True)
        if name == GENERIC:  # anomalib's own PTQ: nncf.quantize with no preset, same calibration images, FP32 save
            import nncf
            import openvino as ov

            calibration.setup("fit")
            quantized = nncf.quantize(ov.Core().read_model(str(fp32_xml)),
                                      nncf.Dataset(calibration.val_dataloader(), lambda batch: batch.image))
            xml = args.output / name / "model.xml"
            ov.save_model(quantized, str(xml), compress_to_fp16=False)
        else:
            xml = engine.export(model, ExportType.OPENVINO, export_root=args.output / name, input_size=size,
                                compression_type=CompressionType(name), datamodule=calibration)
        rows.append({"export": name, **evaluate(Path(xml), targets, args.threads)})

    from scipy.stats import spearmanr

    base = rows[0]
    lines = ["| export | image AUROC | change | pixel AUROC | change | rank corr. with FP32 scores / maps | ms / image |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        agreement = (f"{spearmanr(row['scores'], base['scores']).statistic:.4f} / "
                     f"{spearmanr(row['maps'], base['maps']).statistic:.4f}")
        lines.append(f"| {row['export']} | {row['image_AUROC']:.2f} | {row['image_AUROC'] - base['image_AUROC']:+.2f} "
                     f"| {row['pixel_AUROC']:.2f} | {row['pixel_AUROC'] - base['pixel_AUROC']:+.2f} "
                     f"| {agreement} | {row['ms_per_image']:.1f} |")
    table = "\n".join(lines)
    print(f"\n{args.model}, {args.backbone} ({args.pretrained}), {args.image_size} px, trained on "
          f"{', '.join(args.train_categories)}, tested on {', '.join(args.test_categories)}; {args.threads} threads\n")
    print(table)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "int8_accuracy.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
