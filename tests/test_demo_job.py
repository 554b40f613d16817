"""The README's main job: the offline stop, and a smoke run with a random tiny CLIP."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from anomalib_zsad.demo import PAPER_METRICS, main


def test_missing_weights_stop_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("ZSAD_OFFLINE", "1")
    monkeypatch.setenv("ZSAD_CLIP_CACHE", str(tmp_path / "cache"))
    code = main(["--root", str(tmp_path / "data"), "--output", str(tmp_path / "results")])
    assert code == 2
    assert "ViT-B-16.pt" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smoke_run_writes_table_and_heatmaps(tmp_path: Path) -> None:
    code = main(["--root", str(tmp_path / "data"), "--output", str(tmp_path / "results"), "--backbone", "zsad-tiny",
                 "--pretrained", "none", "--image-size", "64", "--epochs", "1", "--heatmaps", "1",
                 "--train-categories", "brick", "grass", "--test-categories", "coffee"])
    assert code == 0
    with (tmp_path / "results" / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["category"] for r in rows] == ["coffee", "mean"]
    assert all(0.0 <= float(rows[0][m]) <= 1.0 for m in PAPER_METRICS)
    assert (tmp_path / "results" / "heatmaps.png").stat().st_size > 10_000
