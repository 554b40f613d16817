"""Aggregation and output files of the results table (no models involved: fast)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from anomalib_zsad.benchmark.report import results_table, write_report

METRICS = ("image_AUROC", "image_AUPR", "image_F1Max", "pixel_AUROC", "pixel_AUPRO", "pixel_F1Max")


def row(model: str, dataset: str, category: str, value: float, status: str = "ok", **extra: float) -> dict:
    return {"model": model, "dataset": dataset, "category": category, "status": status,
            **dict.fromkeys(METRICS, value), "train_time_s": 2.0, "infer_ms_per_image": 10.0,
            "n_timed_images": 4, **extra}


def test_means_are_per_data_set_over_categories_in_percent() -> None:
    rows = pd.DataFrame([
        row("A", "MVTecAD", "bottle", 0.9), row("A", "MVTecAD", "cable", 0.7),
        row("A", "Visa", "candle", 0.5),
        row("B", "MVTecAD", "bottle", 0.6), row("B", "MVTecAD", "cable", 0.8),
        row("B", "Visa", "candle", 0.4, infer_ms_per_image=30.0, n_timed_images=12),
    ])
    table = results_table(rows)
    assert list(table.index) == ["A", "B"]  # config order, not alphabetical
    assert math.isclose(table.loc["A", ("MVTecAD", "mean", "I-AUROC")], 80.0)
    assert math.isclose(table.loc["B", ("MVTecAD", "mean", "P-AUPRO")], 70.0)
    assert math.isclose(table.loc["A", ("MVTecAD", "cable", "P-F1max")], 70.0)
    assert math.isclose(table.loc["B", ("Visa", "mean", "I-AP")], 40.0)
    assert math.isclose(table.loc["A", ("MVTecAD", "time", "train_s")], 4.0)  # summed over categories
    assert math.isclose(table.loc["B", ("Visa", "time", "infer_ms/img")], 30.0)
    assert ("Visa", "bottle", "I-AUROC") not in table.columns  # each data set keeps its own categories


def test_a_failed_category_makes_the_mean_unavailable_not_optimistic() -> None:
    rows = pd.DataFrame([
        row("A", "demo", "x", 0.9), row("A", "demo", "y", float("nan"), status="failed: boom"),
        row("B", "demo", "x", 0.5), row("B", "demo", "y", 0.7),
    ])
    table = results_table(rows)
    assert math.isnan(table.loc["A", ("demo", "mean", "I-AUROC")])
    assert math.isclose(table.loc["B", ("demo", "mean", "I-AUROC")], 60.0)


def test_written_files_parse(tmp_path: Path) -> None:
    rows = pd.DataFrame([row("A", "demo", "x", 0.9), row("B", "demo", "x", 0.25, status="failed: RuntimeError: x")])
    rows.loc[1, list(METRICS)] = float("nan")
    paths = write_report(rows, tmp_path / "run")
    assert [p.name for p in paths] == ["raw_results.csv", "results.csv", "results.md", "results.png"]
    csv = pd.read_csv(tmp_path / "run" / "results.csv", index_col="model")
    assert math.isclose(csv.loc["A", "demo/x/I-AUROC"], 90.0)
    assert math.isnan(csv.loc["B", "demo/mean/P-AUROC"])
    md = (tmp_path / "run" / "results.md").read_text()
    assert "| A | 90.0 | 90.0 | 90.0 | 90.0 | 90.0 | 90.0 |" in md
    assert "## Failed cells" in md and "B / demo / x: failed: RuntimeError: x" in md
    assert (tmp_path / "run" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
