"""The run's results table (CSV + Markdown) and heat-table plot.

Conventions, chosen to match how the zero-shot papers report numbers:

* every metric is computed **per category on raw scores** (no cross-category normalisation);
* the data-set figure is the **arithmetic mean over categories** (a failed category makes the
  mean NaN instead of silently averaging fewer categories);
* metrics are shown in percent.

``train_s`` is the total over a data set's categories of fitting time plus the model's test-time
set-up (text / reference embeddings); a model trained once on auxiliary data counts that training
once. ``infer_ms/img`` is pre-processing + forward time per test image, pooled over categories.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from anomalib_zsad.models.components.lightning import PAPER_METRIC_FIELDS as PAPER_METRICS

METRICS: tuple[str, ...] = tuple(PAPER_METRICS)
LABELS: dict[str, str] = {
    "image_AUROC": "I-AUROC",
    "image_AUPR": "I-AP",
    "image_F1Max": "I-F1max",
    "pixel_AUROC": "P-AUROC",
    "pixel_AUPRO": "P-AUPRO",
    "pixel_F1Max": "P-F1max",
    "pixel_AUPR": "P-AP",
}
MEAN = "mean"


def _ordered(values: pd.Series) -> list:
    """Unique values in order of first appearance (the config's order, not alphabetical)."""
    return list(dict.fromkeys(values.tolist()))


def _mean_no_skip(values: pd.Series) -> float:
    return float(values.mean(skipna=False)) if len(values) else math.nan


def results_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows = models; columns = ``(dataset, category | "mean", metric)`` in percent, plus timing.

    Timing columns are ``(dataset, "time", "train_s")`` and ``(dataset, "time", "infer_ms/img")``.
    """
    rows = rows.copy()
    for column in (*METRICS, "train_time_s", "infer_ms_per_image", "n_timed_images"):
        if column not in rows:  # e.g. every cell failed before producing numbers
            rows[column] = math.nan
    models = _ordered(rows["model"])
    columns: dict[tuple[str, str, str], list[float]] = {}
    for dataset in _ordered(rows["dataset"]):
        in_set = rows[rows["dataset"] == dataset]
        categories = _ordered(in_set["category"])
        for category in [*categories, MEAN]:
            for metric in METRICS:
                values = []
                for model in models:
                    mine = in_set[in_set["model"] == model]
                    cells = mine[metric] if category == MEAN else mine[mine["category"] == category][metric]
                    if category == MEAN and len(mine["category"].unique()) < len(categories):
                        values.append(math.nan)  # a model that skipped a category has no mean
                    else:
                        values.append(100.0 * _mean_no_skip(cells.astype(float)))
                columns[(dataset, category, LABELS[metric])] = values
        train, infer = [], []
        for model in models:
            mine = in_set[in_set["model"] == model]
            train.append(float(mine["train_time_s"].astype(float).sum(min_count=1)))
            images = mine["n_timed_images"].astype(float).sum()
            pooled = (mine["infer_ms_per_image"].astype(float) * mine["n_timed_images"].astype(float)).sum()
            infer.append(float(pooled / images) if images else math.nan)
        columns[(dataset, "time", "train_s")] = train
        columns[(dataset, "time", "infer_ms/img")] = infer
    table = pd.DataFrame(columns, index=pd.Index(models, name="model"))
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["dataset", "category", "metric"])
    return table


def flat_csv_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The table with ``dataset/category/metric`` column names, as written to ``results.csv``."""
    flat = table.copy()
    flat.columns = ["/".join(parts) for parts in table.columns]
    return flat.round(3)


def _fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _markdown_table(frame: pd.DataFrame, digits: dict[str, int] | None = None) -> str:
    digits = digits or {}
    head = "| model | " + " | ".join(frame.columns) + " |"
    rule = "|---|" + "|".join("---:" for _ in frame.columns) + "|"
    body = ["| " + str(model) + " | " + " | ".join(_fmt(v, digits.get(c, 1)) for c, v in row.items()) + " |"
            for model, row in frame.iterrows()]
    return "\n".join([head, rule, *body])


def undefined_metric_notes(rows: pd.DataFrame, dataset: str) -> list[str]:
    """Lines saying why a data set's image or pixel metrics are ``n/a`` for every model that ran.

    The evaluator reports nothing where a metric is undefined (``components/metrics.py``): pixel metrics
    on a set without masks (HeadCT, BrainMRI, Br35H, COVID-19: image labels only), image metrics on a
    set of anomalous images only (ISIC, the polyp sets, TN3K: the papers report pixel metrics there).
    """
    ok = rows[(rows["dataset"] == dataset) & (rows["status"] == "ok")] if "status" in rows else rows.iloc[0:0]
    notes = []
    for kind, reason in (("image", "its test set has one class of images only (anomalous images, no normal ones)"),
                         ("pixel", "its test images have no masks (image labels only)")):
        columns = [m for m in METRICS if m.startswith(kind) and m in ok]
        if len(ok) and columns and ok[columns].astype(float).isna().all().all():
            notes += [f"*{kind.capitalize()} metrics n/a for {dataset}: {reason}; undefined there, not failed.*", ""]
    return notes


def markdown_report(table: pd.DataFrame, rows: pd.DataFrame, title: str = "Benchmark results") -> str:
    """Per data set: the mean table (with timing), then one table per category."""
    lines = [f"# {title}", "",
             ("Metrics in percent, computed per category on raw (un-normalised) scores; "
              "`mean` is the arithmetic mean over categories. `train_s` = total fit + set-up seconds "
              "over the data set; `infer_ms/img` = pre-processing + forward per test image."), ""]
    failed = rows[rows["status"] != "ok"] if "status" in rows else rows.iloc[0:0]
    for dataset in table.columns.get_level_values("dataset").unique():
        sub = table[dataset]
        mean = sub[MEAN].join(sub["time"])
        lines += [f"## {dataset}: mean over categories", "",
                  _markdown_table(mean, {"train_s": 1, "infer_ms/img": 2}), ""]
        lines += undefined_metric_notes(rows, dataset)
        for category in sub.columns.get_level_values("category").unique():
            if category in (MEAN, "time"):
                continue
            lines += [f"### {dataset} / {category}", "", _markdown_table(sub[category]), ""]
    if len(failed):
        lines += ["## Failed cells", ""]
        lines += [f"- {r.model} / {r.dataset} / {r.category}: {r.status}" for r in failed.itertuples()]
        lines.append("")
    return "\n".join(lines)


def plot_heat_table(table: pd.DataFrame, path: Path, title: str = "Benchmark (mean over categories, %)") -> Path:
    """One heat table per data set: models x the paper metrics (category means), values annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    datasets = list(table.columns.get_level_values("dataset").unique())
    models = list(table.index)
    labels = [LABELS[m] for m in METRICS]
    size = (1.2 * len(labels) * len(datasets) + 2.5, 0.5 * len(models) + 1.8)
    fig, axes = plt.subplots(1, len(datasets), figsize=size,
                             squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        values = table[dataset][MEAN][labels].to_numpy(dtype=float)
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")  # n/a cells grey
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_yticks(range(len(models)), models)
        ax.set_title(dataset)
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, _fmt(value), ha="center", va="center", fontsize=8,
                    color="white" if not math.isnan(value) and value < 60 else "black")
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03)
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(rows: pd.DataFrame, run_dir: Path, title: str = "Benchmark results") -> Sequence[Path]:
    """Write raw rows, the table (CSV + Markdown) and the plot into ``run_dir``; return the paths."""
    run_dir.mkdir(parents=True, exist_ok=True)
    raw = run_dir / "raw_results.csv"
    rows.drop(columns=["traceback"], errors="ignore").to_csv(raw, index=False)
    table = results_table(rows)
    csv = run_dir / "results.csv"
    flat_csv_frame(table).to_csv(csv)
    md = run_dir / "results.md"
    md.write_text(markdown_report(table, rows, title), encoding="utf-8")
    png = plot_heat_table(table, run_dir / "results.png")
    return [raw, csv, md, png]
