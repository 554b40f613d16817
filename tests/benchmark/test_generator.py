"""Config expansion and class resolution of the benchmark (fast: nothing is trained)."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalib_zsad.benchmark.generator import ZSADBenchmarkJobGenerator, normalise_args
from anomalib_zsad.benchmark.job import select_train_data
from anomalib_zsad.benchmark.resolve import ConfigResolutionError, import_class


def test_datasets_expand_to_one_cell_per_model_and_category(tmp_path: Path) -> None:
    args = {
        "output_dir": str(tmp_path),
        "trainer": {"max_epochs": 1},
        "model": {"grid": [{"class_path": "Patchcore"},
                           {"class_path": "WinClipFixed", "init_args": {"k_shot": 0}},
                           {"class_path": "WinClipFixed", "init_args": {"k_shot": 2}},
                           {"class_path": "WinClipFixed", "init_args": {"k_shot": 2}}]},
        "datasets": [{"class_path": "MVTecAD", "init_args": {"root": "a"}, "categories": ["bottle", "cable"]},
                     {"class_path": "Visa", "name": "VisA", "init_args": {"root": "b"}, "categories": ["candle"]}],
    }
    jobs = list(ZSADBenchmarkJobGenerator("cpu")(args))
    assert len(jobs) == 4 * 3
    names = list(dict.fromkeys(job.model_entry["name"] for job in jobs))
    assert names == ["Patchcore", "WinClipFixed", "WinClipFixed-2shot", "WinClipFixed-2shot#2"]
    cells = {(job.model_entry["name"], job.data_config["init_args"]["category"]) for job in jobs}
    assert ("Patchcore", "candle") in cells and ("WinClipFixed", "cable") in cells
    visa = next(job for job in jobs if job.data_config["init_args"]["category"] == "candle")
    assert visa.data_config == {"class_path": "Visa", "name": "VisA", "init_args": {"root": "b", "category": "candle"}}
    assert all(job.trainer_kwargs == {"max_epochs": 1} and job.seed == 42 for job in jobs)
    assert len({job.run_dir for job in jobs}) == 1 and jobs[0].run_dir.parent == tmp_path


def test_anomalib_benchmark_configs_still_work() -> None:
    """anomalib's own format: one data set, grid over its categories and over seeds."""
    args = {"seed": {"grid": [1, 2]}, "model": {"class_path": "Padim"},
            "data": {"class_path": "MVTecAD", "init_args": {"category": {"grid": ["bottle", "cable"]}}}}
    jobs = list(ZSADBenchmarkJobGenerator("cpu")(args))
    assert sorted((job.seed, job.data_config["init_args"]["category"]) for job in jobs) == [
        (1, "bottle"), (1, "cable"), (2, "bottle"), (2, "cable")]


def test_config_errors_are_explicit() -> None:
    with pytest.raises(ValueError, match="categories"):
        normalise_args({"model": {"class_path": "Padim"}, "datasets": [{"class_path": "MVTecAD"}]})
    with pytest.raises(ValueError, match="either 'data'"):
        normalise_args({"model": {"class_path": "Padim"}, "data": {}, "datasets": [{"class_path": "X", "categories": ["a"]}]})


def test_train_data_per_target_data_set() -> None:
    visa = {"class_path": "anomalib_zsad.data.CrossDataset", "init_args": {"train_categories": "all"}}
    assert select_train_data({"MVTecAD": visa}, "MVTecAD") is visa
    assert select_train_data(visa, "anything") is visa
    assert select_train_data(None, "MVTecAD") is None
    with pytest.raises(KeyError, match="Visa"):
        select_train_data({"MVTecAD": visa}, "Visa")


def test_class_resolution_whitelist_and_plugin_names() -> None:
    from anomalib.models import Patchcore, ReverseDistillation

    from anomalib_zsad.benchmark import WinClipFixed
    from anomalib_zsad.data import CrossDataset

    namespaces = ("anomalib.models", "anomalib_zsad.benchmark")
    assert import_class("Patchcore", namespaces) is Patchcore
    assert import_class("reverse_distillation", namespaces) is ReverseDistillation
    assert import_class("WinClipFixed", namespaces) is WinClipFixed
    assert import_class("anomalib_zsad.data.CrossDataset", ()) is CrossDataset
    with pytest.raises(ConfigResolutionError, match="refusing"):
        import_class("os.system", namespaces)
    with pytest.raises(ConfigResolutionError, match="unknown class"):
        import_class("NoSuchModel", namespaces)


def test_shipped_grids_expand_and_every_class_resolves() -> None:
    import yaml

    from anomalib_zsad.benchmark.resolve import DATA_NAMESPACES, MODEL_NAMESPACES

    root = Path(__file__).resolve().parents[2] / "configs" / "benchmark"
    counts = {}
    for name in ("demo_grid.yaml", "papers_grid.yaml"):
        config = yaml.safe_load((root / name).read_text())
        jobs = list(ZSADBenchmarkJobGenerator("cpu")(config["benchmark"]))
        for job in jobs:
            import_class(job.model_entry["class_path"], MODEL_NAMESPACES)
            import_class(job.data_config["class_path"], DATA_NAMESPACES)
            if job.model_entry.get("train_data"):  # as the job looks it up: label, then class name
                assert select_train_data(job.model_entry["train_data"], job.data_config.get("name", ""),
                                         job.data_config["class_path"])["class_path"].endswith("CrossDataset")
        counts[name] = len(jobs)
    assert counts == {"demo_grid.yaml": 10 * 3, "papers_grid.yaml": 11 * (15 + 12)}
