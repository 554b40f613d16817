"""configs/benchmark/m3dm_demo.yaml expands to M3DM's official settings beside PatchCore on the RGB
image, on the 3D demo set (nothing is run: the grid's run and table are in docs/models/m3dm.md)."""

from __future__ import annotations

from pathlib import Path

import yaml

from anomalib_zsad.benchmark.generator import ZSADBenchmarkJobGenerator
from anomalib_zsad.benchmark.resolve import DATA_NAMESPACES, MODEL_NAMESPACES, import_class
from anomalib_zsad.models.m3dm.torch_model import METHODS

GRID = Path(__file__).resolve().parents[3] / "configs" / "benchmark" / "m3dm_demo.yaml"


def test_m3dm_grid_has_every_implemented_setting_beside_patchcore() -> None:
    config = yaml.safe_load(GRID.read_text())
    jobs = list(ZSADBenchmarkJobGenerator("cpu")(config["benchmark"]))
    entries = {job.model_entry["name"]: job.model_entry for job in jobs}
    assert list(entries) == ["PatchCore (RGB)", "M3DM DINO", "M3DM Point_MAE", "M3DM Fusion",
                             "M3DM DINO+Point_MAE", "M3DM"]
    assert len(jobs) == len(entries) * 3  # dome, ring, tablet
    methods = [entry["init_args"]["method_name"] for name, entry in entries.items() if name.startswith("M3DM")]
    assert methods == list(METHODS)
    for entry in entries.values():
        import_class(entry["class_path"], MODEL_NAMESPACES)
    for dataset in config["benchmark"]["datasets"]:
        assert import_class(dataset["class_path"], DATA_NAMESPACES).__name__ == "MVTec3DFixed"
