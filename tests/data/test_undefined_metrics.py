"""Targets without masks or without normal images: metrics that are undefined there report nothing (n/a),
the benchmark table says why, and single-category datamodules are benchmark cells."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from anomalib_zsad.benchmark.generator import expand_datasets
from anomalib_zsad.benchmark.report import markdown_report, results_table
from anomalib_zsad.models.components.lightning import paper_evaluator

from . import fake_layouts as fake


def _metrics() -> dict:
    return {metric.name: metric for metric in paper_evaluator().test_metrics}


def _batch(labels: list[int], masks: bool) -> SimpleNamespace:
    gt_mask = None
    if masks:
        gt_mask = torch.zeros(len(labels), 8, 8, dtype=torch.bool)
        for i, label in enumerate(labels):
            gt_mask[i, 2:5, 2:5] = bool(label)
    return SimpleNamespace(pred_score=torch.linspace(0, 1, len(labels)), gt_label=torch.tensor(labels),
                           anomaly_map=torch.rand(len(labels), 8, 8), gt_mask=gt_mask)


@pytest.mark.parametrize(("labels", "masks", "defined"), [
    ([0, 1, 0, 1], True, {"image", "pixel"}),   # MVTec AD: everything
    ([0, 1, 0, 1], False, {"image"}),           # HeadCT, BrainMRI, Br35H, COVID-19: labels only
    ([1, 1, 1], True, {"pixel"}),               # ISIC, polyps, TN3K: anomalous images only
    ([0, 0, 0], True, set()),                   # normal images only: nothing is defined
])
def test_undefined_metrics_report_nothing(labels: list[int], masks: bool, defined: set[str],
                                          caplog: pytest.LogCaptureFixture) -> None:
    metrics = _metrics()
    for metric in metrics.values():
        metric.update(_batch(labels, masks))
    with caplog.at_level(logging.WARNING):
        values = {name: metric.compute() for name, metric in metrics.items()}
    assert {name for name, value in values.items() if value is not None} == {
        name for name in values if name.split("_")[0] in defined}
    if masks and "image" not in defined:
        assert "image_AUROC not computed: the test set has no" in caplog.text
    for metric in metrics.values():  # a new epoch starts clean
        metric.reset()
        assert int(metric.target_counts.sum()) == 0


def _row(dataset: str, image: float, pixel: float) -> dict:
    return {"model": "M", "dataset": dataset, "category": "c", "status": "ok", "train_time_s": 0.0,
            "infer_ms_per_image": 1.0, "n_timed_images": 1,
            **{f"image_{m}": image for m in ("AUROC", "AUPR", "F1Max")},
            **{f"pixel_{m}": pixel for m in ("AUROC", "AUPRO", "F1Max")}}


def test_the_table_says_why_metrics_are_missing() -> None:
    rows = pd.DataFrame([_row("HeadCT", 0.9, math.nan), _row("ColonDB", math.nan, 0.8), _row("MVTecAD", 0.9, 0.9)])
    report = markdown_report(results_table(rows), rows)
    assert "*Pixel metrics n/a for HeadCT: its test images have no masks (image labels only)" in report
    assert "*Image metrics n/a for ColonDB: its test set has one class of images only" in report
    assert "n/a for MVTecAD" not in report


def test_single_category_datamodules_are_one_benchmark_cell() -> None:
    configs = expand_datasets([{"class_path": "Kolektor", "init_args": {"root": "datasets/kolektor"}},
                               {"class_path": "MVTecLayout", "init_args": {"root": "datasets/HeadCT"},
                                "categories": ["brain"]}])
    assert configs == [{"class_path": "Kolektor", "init_args": {"root": "datasets/kolektor"}},
                       {"class_path": "MVTecLayout", "init_args": {"root": "datasets/HeadCT", "category": "brain"}}]
    with pytest.raises(ValueError, match="needs a non-empty 'categories' list"):
        expand_datasets([{"class_path": "MPDD", "init_args": {}}])


@pytest.mark.slow
def test_anomalib_test_on_converted_medical_sets(tmp_path: Path) -> None:
    """``Engine.test`` on HeadCT (labels only) gives image metrics only, on ColonDB (anomalous images) pixel
    metrics only; neither fails."""
    from anomalib.engine import Engine

    from anomalib_zsad.data import MVTecLayout
    from anomalib_zsad.data.convert import convert
    from anomalib_zsad.models import CLIPBaseline

    fake.headct(tmp_path / "headct")
    fake.polyps(tmp_path / "colondb")
    sets = {"brain": convert("headct", tmp_path / "headct", tmp_path / "HeadCT"),
            "colon": convert("colondb", tmp_path / "colondb", tmp_path / "ColonDB")}
    results = {}
    for category, root in sets.items():
        engine = Engine(default_root_dir=tmp_path / "runs", accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False)
        model = CLIPBaseline(backbone="zsad-tiny", pretrained=None, image_size=64)
        datamodule = MVTecLayout(root=root, category=category, num_workers=0, eval_batch_size=8)
        results[category] = set(engine.test(model, datamodule=datamodule, verbose=False)[0])
    assert results["brain"] == {"image_AUROC", "image_AUPR", "image_F1Max"}
    assert results["colon"] == {"pixel_AUROC", "pixel_AUPRO", "pixel_F1Max", "pixel_AUPR"}
