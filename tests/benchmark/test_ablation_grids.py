"""The ablation grids (configs/benchmark/ablations_*.yaml) expand to the intended cells (nothing is run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from anomalib_zsad.benchmark.generator import ZSADBenchmarkJobGenerator
from anomalib_zsad.benchmark.job import select_train_data
from anomalib_zsad.benchmark.resolve import DATA_NAMESPACES, MODEL_NAMESPACES, import_class

ROOT = Path(__file__).resolve().parents[2] / "configs" / "benchmark"
DEFAULTS = {"dpam": "vv", "object_aware": False, "shared_context": False, "abnormality_word": "damaged",
            "global_loss": True, "local_loss": True, "focal_loss": True, "dice_loss": True}


def rows(last: int, depth: int) -> dict[str, dict]:
    """Row name -> the AnomalyCLIP switches that differ from the paper's defaults (None: a baseline)."""
    return {
        "CLIP": None, "CLIP-AC": None, "CoOp": None,
        "AnomalyCLIP": {},
        "Tab4 base": {"dpam": "none", "object_aware": True, "prompt_depth": 1, "feature_layers": [last]},
        "Tab4 +T1 DPAM": {"object_aware": True, "prompt_depth": 1, "feature_layers": [last]},
        "Tab4 +T2 agnostic": {"prompt_depth": 1, "feature_layers": [last]},
        "Tab4 +T3 deep prompts": {"feature_layers": [last]},
        "-T1 no DPAM": {"dpam": "none"},
        "-T2 object-aware": {"object_aware": True},
        "-T3 no deep prompts": {"prompt_depth": 1},
        "-T4 last layer only": {"feature_layers": [last]},
        "DPAM Q-Q": {"dpam": "qq"}, "DPAM K-K": {"dpam": "kk"},
        "shared context": {"shared_context": True},
        "global loss only": {"local_loss": False}, "local loss only": {"global_loss": False},
        "global+focal": {"dice_loss": False}, "global+dice": {"focal_loss": False},
        "word flawed": {"abnormality_word": "flawed"},
    }, depth


@pytest.mark.parametrize(("name", "categories", "last", "depth", "backbone"), [
    ("ablations_demo.yaml", 3, 4, 2, "zsad-tiny"),
    ("papers_ablations.yaml", 15 + 12, 24, None, "ViT-L-14-336"),
])
def test_ablation_grid_expands_to_the_intended_cells(name: str, categories: int, last: int, depth: int | None,
                                                      backbone: str) -> None:
    config = yaml.safe_load((ROOT / name).read_text())
    jobs = list(ZSADBenchmarkJobGenerator("cpu")(config["benchmark"]))
    expected, demo_depth = rows(last, depth)
    entries = {job.model_entry["name"]: job.model_entry for job in jobs}
    assert list(entries) == list(expected)  # every row once, in the tables' order, no "#2" duplicates
    assert len(jobs) == len(expected) * categories
    for row, entry in entries.items():
        args = entry["init_args"]
        assert args["backbone"] == backbone
        import_class(entry["class_path"], MODEL_NAMESPACES)
        if expected[row] is None:
            continue
        assert entry["class_path"].endswith("AnomalyCLIP")
        # exactly the intended switches differ from the paper's defaults (prompt depth: the demo's stand-in)
        switches = {k: v for k, v in args.items() if k in DEFAULTS and v != DEFAULTS[k]}
        switches.update({k: args[k] for k in ("feature_layers",) if k in args})
        if args.get("prompt_depth", demo_depth) != demo_depth:
            switches["prompt_depth"] = args["prompt_depth"]
        assert switches == expected[row], row
    learnt = [job for job in jobs if expected[job.model_entry["name"]] is not None or job.model_entry["name"] == "CoOp"]
    for job in learnt:  # trained on auxiliary data, never on the target
        aux = select_train_data(job.model_entry["train_data"], job.data_config.get("name", ""),
                                job.data_config["class_path"])
        assert aux["class_path"].endswith("CrossDataset") and aux["init_args"]["test"] == "$target"
        import_class(job.data_config["class_path"], DATA_NAMESPACES)
    assert all(not job.model_entry.get("train_data") for job in jobs if job.model_entry["name"].startswith("CLIP"))


def test_every_ablation_row_builds() -> None:
    """Each demo row's arguments pass AnomalyCLIP's checks (no model is built: construction only)."""
    from anomalib_zsad.models import AnomalyCLIP

    config = yaml.safe_load((ROOT / "ablations_demo.yaml").read_text())
    for entry in config["benchmark"]["model"]["grid"]:
        if entry["class_path"].endswith("AnomalyCLIP"):
            AnomalyCLIP(**entry["init_args"])
