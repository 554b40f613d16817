"""Fixtures for the benchmark tests: a tiny grid over the shared generated demo set.

The demo set comes from the session fixture ``demo_root`` (tests/conftest.py, made with
:func:`anomalib_zsad.data.make_demo_dataset`: categories brick, grass, coffee; 64 px).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

TINY_CLIP = {"backbone": "zsad-tiny", "pretrained": None}


def default_grid_models(demo_root: Path) -> list[dict]:
    """The models of configs/benchmark/demo_grid.yaml, shrunk to seconds per cell."""
    return [
        {"name": "PatchCore", "class_path": "Patchcore", "image_size": 64,
         "init_args": {"backbone": "resnet18", "pre_trained": False, "layers": ["layer2", "layer3"],
                       "coreset_sampling_ratio": 0.02}},
        {"name": "RD", "class_path": "ReverseDistillation", "image_size": 64,
         "init_args": {"backbone": "resnet18", "pre_trained": False}},
        {"name": "WinCLIP-0shot", "class_path": "anomalib_zsad.benchmark.WinClipFixed",
         "init_args": {**TINY_CLIP, "image_size": 64}},
        {"name": "WinCLIP-1shot", "class_path": "WinClipFixed",
         "init_args": {**TINY_CLIP, "image_size": 64, "k_shot": 1}},
        anomalyclip_entry(demo_root),
    ]


def tiny_grid(demo_root: Path, output_dir: Path, categories: list[str], models: list[dict] | None = None) -> dict:
    """The demo grid (by default :func:`default_grid_models`) over ``categories`` of the demo set."""
    if models is None:
        models = default_grid_models(demo_root)
    return {
        "accelerator": "cpu",
        "benchmark": {
            "seed": 7,
            "output_dir": str(output_dir),
            "trainer": {"max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False},
            "model": {"grid": models},
            "datasets": [{"name": "demo", "class_path": "MVTecAD",
                          "init_args": {"root": str(demo_root), "train_batch_size": 4, "eval_batch_size": 4,
                                        "num_workers": 0},
                          "categories": categories}],
        },
    }


def anomalyclip_entry(demo_root: Path) -> dict[str, Any]:
    """AnomalyCLIP trained on the demo's grass category, tested zero-shot on the others."""
    return {
        "name": "AnomalyCLIP", "class_path": "anomalib_zsad.models.AnomalyCLIP",
        "init_args": {**TINY_CLIP, "image_size": 64, "prompt_depth": 2},
        "trainer": {"limit_val_batches": 0},
        "train_data": {"class_path": "anomalib_zsad.data.CrossDataset",
                       "init_args": {"train": {"class_path": "MVTecAD", "init_args": {"root": str(demo_root)}},
                                     "test": "$target", "train_categories": ["grass"],
                                     "train_batch_size": 4, "eval_batch_size": 4, "num_workers": 0}},
    }


def write_config(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture
def write_grid(demo_root: Path, tmp_path: Path):
    """``write_grid(categories, models=None) -> (config path, output dir)``."""

    def _write(categories: list[str], models: list[dict] | None = None) -> tuple[Path, Path]:
        out = tmp_path / "out"
        return write_config(tiny_grid(demo_root, out, categories, models), tmp_path / "grid.yaml"), out

    return _write


def single_run_dir(output_dir: Path) -> Path:
    """The one timestamped run folder a benchmark wrote under ``output_dir``."""
    runs = [p for p in output_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run folder in {output_dir}, found {runs}"
    return runs[0]
