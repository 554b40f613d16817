"""benchmarks/throughput.py: every kind of plugin model (CLIP, BGAD, M3DM with fitted banks) is
timed at several batch sizes and lands in one table of images per second."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
TINY = ["--backbone", "zsad-tiny", "--image-size", "64", "--bgad-backbone", "resnet18", "--bgad-image-size", "64",
        "--m3dm-backbone", "vit_tiny_patch16_224", "--m3dm-image-size", "64", "--m3dm-groups", "64", "--m3dm-train", "2",
        "--batch-sizes", "1", "2", "--runs", "1"]


@pytest.fixture(scope="module")
def throughput():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["Vand", "BGAD", "M3DM"])
def test_worker_times_each_batch_size(throughput, name: str) -> None:
    result = throughput.worker(name, throughput.parse_args([*TINY, "--models", name]))
    assert set(result["seconds"]) == {"1", "2"}
    assert all(len(t) == 1 and t[0] > 0 for t in result["seconds"].values())
    assert result["peak_mib"] > 0
    if name == "M3DM":
        assert "banks of 2 samples" in result["setting"]


def test_main_prints_one_row_per_model(throughput, capsys: pytest.CaptureFixture) -> None:
    assert throughput.main([*TINY, "--models", "Vand"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| Vand |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "zsad-tiny, 64x64"
    assert all(float(c) > 0 for c in cells[2:])


def test_bad_batch_size_is_refused_before_any_work(throughput) -> None:
    with pytest.raises(SystemExit):
        throughput.parse_args(["--batch-sizes", "0"])
