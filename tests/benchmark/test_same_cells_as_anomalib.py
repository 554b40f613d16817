"""An anomalib-only grid gives the same cells through the plugin's ``anomalib benchmark`` pipeline
as through anomalib's own: the plugin replaces anomalib's pipeline in the CLI, so it must not
change what anomalib users already run."""

from __future__ import annotations

from pathlib import Path

import pytest
from anomalib.pipelines.benchmark.generator import BenchmarkJobGenerator
from lightning import seed_everything

from anomalib_zsad.benchmark.generator import ZSADBenchmarkJobGenerator

PATCHCORE = {"class_path": "Patchcore", "init_args": {"backbone": "resnet18", "pre_trained": False,
                                                      "layers": ["layer2", "layer3"], "coreset_sampling_ratio": 0.05}}


def anomalib_format_grid(demo_root: Path) -> dict:
    """anomalib's own benchmark format: one model, one data set, a grid over categories and seeds."""
    return {"seed": {"grid": [3]}, "model": PATCHCORE,
            "data": {"class_path": "MVTecAD",
                     "init_args": {"root": str(demo_root), "category": {"grid": ["brick", "coffee"]},
                                   "train_batch_size": 4, "eval_batch_size": 4, "num_workers": 0}}}


@pytest.mark.slow
def test_anomalib_only_grid_gives_the_same_cells(demo_root: Path, tmp_path: Path) -> None:
    grid = anomalib_format_grid(demo_root)
    theirs, jobs = {}, BenchmarkJobGenerator("cpu")(grid)
    while True:  # anomalib builds each model when its job is drawn: seed there, as the plugin does
        seed_everything(3)
        job = next(jobs, None)
        if job is None:
            break
        theirs[(job.model.__class__.__name__, job.datamodule.category, job.seed)] = job.run()
    ours = {}
    for job in ZSADBenchmarkJobGenerator("cpu")(grid):
        job.run_dir = tmp_path
        ours[(job.model_entry["class_path"], job.data_config["init_args"]["category"], job.seed)] = job.run()
    assert sorted((model, category, seed) for model, category, seed in theirs) == sorted(
        (model, category, seed) for model, category, seed in ours)
    for (model, category, seed), row in ours.items():
        assert row["status"] == "ok", row.get("traceback")
        # Image AUROC ranks the scores, which anomalib min-max normalises first and the plugin keeps raw
        # (as the papers). Pixel metrics are not compared: anomalib clips maps outside the validation range
        # to 0 or 1, which ties pixels that the raw maps still rank (0.7 points of pixel AUROC seen here).
        assert row["image_AUROC"] == pytest.approx(theirs[(model, category, seed)]["image_AUROC"], abs=1e-6)
