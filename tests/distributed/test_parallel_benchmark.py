"""The benchmark grid on several processes: anomalib's ``ParallelRunner`` gives the serial table.

anomalib's benchmark pipeline runs a grid with its ``SerialRunner`` on CPU or one GPU, and with its
``ParallelRunner`` (a process pool, one cell per GPU at a time) on several GPUs. The plugin's
pipeline takes ``n_jobs`` for CPU too (cells in ``n_jobs`` processes sharing the cores), which is
how the parallel path is exercised here without a GPU: the same grid through both runners gives the
same cells in the same order and the same metrics, and the auxiliary training that two targets share
happens once, also when both cells start at the same time (docs/distributed.md).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
from anomalib.pipelines.components.runners import ParallelRunner, SerialRunner

from anomalib_zsad.benchmark import ZSADBenchmark, ZSADBenchmarkJobGenerator
from anomalib_zsad.benchmark.report import METRICS

TINY_CLIP = {"backbone": "zsad-tiny", "pretrained": None, "image_size": 64}


def grid(demo_root: Path, output_dir: Path) -> dict:
    """AnomalyCLIP trained once on grass for two targets (first, so that both cells start together
    in the pool), and the zero-shot CLIP baseline."""
    aux = {"class_path": "anomalib_zsad.data.CrossDataset",
           "init_args": {"train": {"class_path": "MVTecAD", "init_args": {"root": str(demo_root)}},
                         "test": "$target", "train_categories": ["grass"], "train_batch_size": 4,
                         "eval_batch_size": 4, "num_workers": 0}}
    return {
        "seed": 7,
        "output_dir": str(output_dir),
        "trainer": {"max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"grid": [
            {"name": "AnomalyCLIP", "class_path": "anomalib_zsad.models.AnomalyCLIP",
             "init_args": {**TINY_CLIP, "prompt_depth": 2}, "trainer": {"limit_val_batches": 0}, "train_data": aux},
            {"name": "CLIP", "class_path": "anomalib_zsad.models.CLIPBaseline", "init_args": TINY_CLIP},
        ]},
        "datasets": [{"name": "demo", "class_path": "MVTecAD",
                      "init_args": {"root": str(demo_root), "train_batch_size": 4, "eval_batch_size": 4,
                                    "num_workers": 0},
                      "categories": ["brick", "coffee"]}],
    }


def test_n_jobs_gives_a_parallel_runner_on_cpu() -> None:
    (serial,) = ZSADBenchmark._setup_runners({"accelerator": "cpu"})
    (parallel,) = ZSADBenchmark._setup_runners({"accelerator": "cpu", "n_jobs": 2})
    assert isinstance(serial, SerialRunner) and isinstance(parallel, ParallelRunner) and parallel.n_jobs == 2
    assert parallel.generator.threads_per_job >= 1
    with pytest.raises(ValueError, match="n_jobs"):
        ZSADBenchmark._setup_runners({"accelerator": "cpu", "n_jobs": 0})


def test_cells_are_gathered_in_grid_order() -> None:
    rows = [{"grid_index": 2, "model": "c"}, {"grid_index": 0, "model": "a"}, {"grid_index": 1, "model": "b"}]
    assert list(ZSADBenchmarkJobGenerator("cpu").job_class.collect(rows)["model"]) == ["a", "b", "c"]


def run_dir(output: Path) -> Path:
    (folder,) = [p for p in output.iterdir() if p.is_dir()]
    return folder


@pytest.mark.slow
def test_parallel_runner_gives_the_serial_table(demo_root: Path, tmp_path: Path) -> None:
    serial_args, parallel_args = grid(demo_root, tmp_path / "serial"), grid(demo_root, tmp_path / "parallel")
    SerialRunner(ZSADBenchmarkJobGenerator("cpu")).run(copy.deepcopy(serial_args))
    (runner,) = ZSADBenchmark._setup_runners({"accelerator": "cpu", "n_jobs": 2})
    runner.run(copy.deepcopy(parallel_args))

    serial, parallel = (run_dir(tmp_path / name) for name in ("serial", "parallel"))
    one, two = (pd.read_csv(folder / "raw_results.csv") for folder in (serial, parallel))
    assert set(one["status"]) == set(two["status"]) == {"ok"}
    cells = ["model", "dataset", "category", "regime", "grid_index"]
    assert one[cells].equals(two[cells])  # the same cells, in grid order
    for metric in METRICS:
        pd.testing.assert_series_equal(one[metric], two[metric], check_exact=False, atol=1e-5, rtol=0)
    table_one, table_two = (pd.read_csv(folder / "results.csv", index_col="model") for folder in (serial, parallel))
    figures = [c for c in table_one.columns if "/time/" not in c]  # timings differ, figures do not
    pd.testing.assert_frame_equal(table_one[figures], table_two[figures], check_exact=False, atol=1e-3)

    # auxiliary training once per target data set: one cell trained, the other reused its weights
    for raw, folder in ((one, serial), (two, parallel)):
        trained = raw[raw["model"] == "AnomalyCLIP"]
        assert sorted(trained["fit_shared"].tolist()) == [False, True]
        assert len(list((folder / "aux_weights").glob("*.pt"))) == 1
