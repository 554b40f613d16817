"""Benchmark cells: regimes, and auxiliary training done once and reused across categories."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from anomalib_zsad.benchmark.job import ZSADBenchmarkJob, load_trained_state, trained_state

from .conftest import anomalyclip_entry


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(3, 3).requires_grad_(False)
        self.head = nn.Linear(3, 1)
        self.register_buffer("cache", torch.empty(0))


def test_trained_state_keeps_what_training_can_change() -> None:
    net = _Net()
    net.cache = torch.ones(5)
    state = trained_state(net)
    assert set(state) == {"head.weight", "head.bias", "cache"}  # frozen weights are rebuilt, not stored

    fresh = _Net()  # its cache buffer is empty: recomputed by the target's set-up, so skipped
    skipped = load_trained_state(fresh, state, trainable=["head.weight", "head.bias"])
    assert skipped == ["cache"]
    assert torch.equal(fresh.head.weight, net.head.weight)
    with pytest.raises(RuntimeError, match="trainable tensors"):
        load_trained_state(_Net(), {"cache": torch.ones(5)}, trainable=["head.weight"])


def _job(demo_root: Path, run_dir: Path, category: str, entry: dict) -> ZSADBenchmarkJob:
    data = {"class_path": "MVTecAD", "name": "demo",
            "init_args": {"root": str(demo_root), "category": category, "train_batch_size": 4,
                          "eval_batch_size": 4, "num_workers": 0}}
    return ZSADBenchmarkJob("cpu", 3, entry, data,
                            {"max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False}, run_dir)


@pytest.mark.slow
def test_auxiliary_training_happens_once_and_is_reused(demo_root: Path, tmp_path: Path) -> None:
    entry = anomalyclip_entry(demo_root)  # trained on 'grass' through CrossDataset
    first = _job(demo_root, tmp_path, "brick", entry).run()
    second = _job(demo_root, tmp_path, "coffee", entry).run()
    again = _job(demo_root, tmp_path / "other_run", "coffee", entry).run()
    for row in (first, second, again):
        assert row["status"] == "ok", row.get("traceback")
        assert row["regime"] == "auxiliary" and row["train_data"] == "anomalib_zsad.data.CrossDataset"
    assert first["fit_time_s"] > 0 and not first["fit_shared"]
    assert second["fit_shared"] and second["fit_time_s"] == 0
    assert len(list((tmp_path / "aux_weights").glob("*.pt"))) == 1
    # The reused weights give the same numbers as training afresh in another run folder.
    for metric in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
        assert math.isclose(second[metric], again[metric], abs_tol=1e-6), metric


def test_untrained_auxiliary_model_without_train_data_is_refused(demo_root: Path, tmp_path: Path) -> None:
    entry = {k: v for k, v in anomalyclip_entry(demo_root).items() if k != "train_data"}
    row = _job(demo_root, tmp_path, "brick", entry).run()
    assert row["status"].startswith("failed: ValueError") and "train_data" in row["status"]


def test_trained_state_keeps_extra_state_and_skips_frozen() -> None:
    """Modules may keep non-tensor extra state in their state dict (Bayes-PFL does)."""
    from anomalib_zsad.benchmark.job import load_trained_state, trained_state

    class WithExtraState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.learnt = torch.nn.Parameter(torch.ones(2))
            self.frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

        def get_extra_state(self) -> dict:
            return {"stage": 2}

        def set_extra_state(self, state: dict) -> None:
            self.stage = state["stage"]

    state = trained_state(WithExtraState())
    assert state["_extra_state"] == {"stage": 2}
    assert "frozen" not in state
    assert torch.equal(state["learnt"], torch.ones(2))
    fresh = WithExtraState()
    with torch.no_grad():
        fresh.learnt.zero_()
    assert load_trained_state(fresh, state, ["learnt"]) == []
    assert fresh.stage == 2 and torch.equal(fresh.learnt, torch.ones(2))
