"""The benchmark's ``supervised`` regime: BGAD trained on k anomalies of the target, an unsupervised
baseline evaluated on the same test images; the shipped supervised grids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from anomalib_zsad.benchmark.generator import ZSADBenchmarkJobGenerator
from anomalib_zsad.benchmark.job import ZSADBenchmarkJob
from anomalib_zsad.benchmark.resolve import DATA_NAMESPACES, MODEL_NAMESPACES, import_class
from conftest import PROJECT_ROOT

GRIDS = {"demo_supervised_grid.yaml": (5, 3), "papers_supervised_grid.yaml": (5, 15 + 3)}


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_supervised_grids_expand_and_every_class_resolves(name: str) -> None:
    config = yaml.safe_load((PROJECT_ROOT / "configs" / "benchmark" / name).read_text())
    jobs = list(ZSADBenchmarkJobGenerator("cpu")(config["benchmark"]))
    models, cells = GRIDS[name]
    assert len(jobs) == models * cells
    assert {job.model_entry["name"] for job in jobs} == {"BGAD", "PatchCore", "PaDiM", "DRAEM", "CFlow"}
    for job in jobs:
        assert job.few_anomalies["k"] == config["benchmark"]["few_anomalies"]["k"]
        import_class(job.model_entry["class_path"], MODEL_NAMESPACES)
        import_class(job.data_config["class_path"], DATA_NAMESPACES)


def _job(demo_root: Path, run_dir: Path, entry: dict) -> ZSADBenchmarkJob:
    data = {"class_path": "MVTecAD", "name": "demo",
            "init_args": {"root": str(demo_root), "category": "coffee", "train_batch_size": 4, "eval_batch_size": 4,
                          "num_workers": 0}}
    return ZSADBenchmarkJob("cpu", 3, entry, data, {"max_epochs": 1, "enable_progress_bar": False,
                                                   "enable_model_summary": False}, run_dir, few_anomalies={"k": 2})


@pytest.mark.slow
def test_supervised_cell_and_baseline_on_the_same_test_images(demo_root: Path, tmp_path: Path) -> None:
    bgad = {"name": "BGAD", "class_path": "anomalib_zsad.models.BGAD",
            "init_args": {"backbone": "resnet18", "layers": [1, 2], "pretrained": False, "image_size": 64,
                          "coupling_layers": 2, "pos_embed_dim": 16, "flow_batch_size": 256, "permute_soft": False,
                          "meta_epochs": 1, "sub_epochs": 1}}  # the loss itself: test_model.py
    patchcore = {"name": "PatchCore", "class_path": "Patchcore", "image_size": 64,
                 "init_args": {"backbone": "resnet18", "pre_trained": False, "layers": ["layer2"],
                               "coreset_sampling_ratio": 0.5}}
    rows = {entry["name"]: _job(demo_root, tmp_path, entry).run() for entry in (bgad, patchcore)}
    for row in rows.values():
        assert row["status"] == "ok", row.get("traceback")
        assert row["anomalies_held_out"] == 2
        assert 0.0 <= row["image_AUROC"] <= 1.0
    assert rows["BGAD"]["regime"] == "supervised" and rows["BGAD"]["fit_time_s"] > 0
    assert rows["PatchCore"]["regime"] == "full-shot"
    records = {path.stem.rsplit("-", 1)[-1]: json.loads(path.read_text())
               for path in (tmp_path / "few_anomalies").glob("*.json")}
    assert records["BGAD"]["in_training"] and not records["PatchCore"]["in_training"]
    assert records["BGAD"]["drawn"] == records["PatchCore"]["drawn"]  # the same images left out for both
