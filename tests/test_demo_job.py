"""The README's main job: the offline stop, the heat-map figure, and a smoke run with a random tiny CLIP."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch
from PIL import Image

from anomalib_zsad import demo
from anomalib_zsad.demo import (
    RANDOM_WEIGHTS_BANNER,
    CollectedOutputs,
    draw_heatmaps,
    main,
)
from anomalib_zsad.models.components.lightning import PAPER_METRICS


def test_missing_weights_stop_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("ZSAD_OFFLINE", "1")
    monkeypatch.setenv("ZSAD_CLIP_CACHE", str(tmp_path / "cache"))
    code = main(["--root", str(tmp_path / "data"), "--output", str(tmp_path / "results")])
    assert code == 2
    assert "ViT-B-16.pt" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _batch(tmp_path: Path, labels: list[int], scores: list[float], maps: torch.Tensor, first: int = 0) -> ImageBatch:
    """An anomalib test batch as the model returns it, with real image files behind its paths."""
    paths = []
    for i, label in enumerate(labels):
        path = tmp_path / ("bad" if label else "good") / f"{first + i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((48, 48, 3), 40 * i, dtype=np.uint8)).save(path)
        paths.append(str(path))
    masks = torch.zeros(len(labels), 32, 32, dtype=torch.bool)
    masks[torch.tensor(labels, dtype=torch.bool), 8:20, 8:20] = True
    return ImageBatch(image=torch.rand(len(labels), 3, 32, 32), gt_label=torch.tensor(labels), gt_mask=masks,
                      anomaly_map=maps, pred_score=torch.tensor(scores), image_path=paths)


@pytest.mark.parametrize("banner", [RANDOM_WEIGHTS_BANNER, None])
def test_heatmap_figure_one_colour_scale_scores_and_banner(tmp_path: Path, banner: str | None) -> None:
    outputs = CollectedOutputs(per_kind=1)
    outputs.category = "tissue"
    maps = torch.rand(3, 32, 32)
    maps[2, 0, 0] = 9.0  # the extreme of the whole test set is in an image the figure does not show
    outputs.add(_batch(tmp_path, [1, 0, 1], [0.7, 0.2, 0.9], maps))
    outputs.category = "coffee"
    maps = torch.rand(2, 32, 32)
    maps[1, 0, 0] = -3.0
    outputs.add(_batch(tmp_path, [0, 1], [0.6, 0.4], maps, first=3))

    drawn = draw_heatmaps(outputs, tmp_path / "heatmaps.png", title="AnomalyCLIP test", banner=banner,
                          image_threshold=0.5, pixel_threshold=1.0)
    assert (tmp_path / "heatmaps.png").stat().st_size > 10_000
    assert drawn["rows"] == [("tissue", "anomalous", 1), ("tissue", "normal", 1),
                             ("coffee", "anomalous", 1), ("coffee", "normal", 1)]
    # one colour scale for the model: every map panel and the colour bar, from the whole test set
    assert len(drawn["heatmap_clims"]) == 4
    assert {tuple(c) for c in drawn["heatmap_clims"]} == {(-3.0, 9.0)}
    assert tuple(drawn["colourbar_clim"]) == (-3.0, 9.0)
    # each image's score and predicted label (right or wrong) in its panel title
    titles = drawn["panel_titles"]
    for title in ("score 0.700 → anomalous ✓", "score 0.200 → normal ✓", "score 0.600 → anomalous ✗",
                  "score 0.400 → normal ✗"):
        assert title in titles
    assert "score 0.900" not in " ".join(titles)  # only per_kind images of each kind
    assert "image threshold 0.500" in drawn["title"]
    assert drawn["banner"] == banner


@pytest.mark.slow
def test_smoke_run_two_categories_nothing_overwritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = []

    def spy(*args, **kwargs) -> dict:  # the real figure, its description kept
        drawn.append(draw_heatmaps(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(demo, "draw_heatmaps", spy)
    argv = ["--root", str(tmp_path / "data"), "--output", str(tmp_path / "results"), "--backbone", "zsad-tiny",
            "--pretrained", "none", "--image-size", "64", "--epochs", "1", "--heatmaps", "1", "--seed", "3",
            "--train-categories", "brick", "grass", "--test-categories", "coffee", "tissue"]
    assert main(argv) == 0
    results = tmp_path / "results"
    with (results / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["category"] for r in rows] == ["coffee", "tissue", "mean"]
    assert all(0.0 <= float(r[m]) <= 1.0 for r in rows for m in PAPER_METRICS)

    # anomalib's per-image pictures: one folder per category, every test image of both there
    # (anomalib names them <defect>/<n>.png, the same names in both categories)
    pictures = {}
    for category in ("coffee", "tissue"):
        tests = sorted(p.parts[-2:] for p in (tmp_path / "data" / category / "test").rglob("*.png"))
        pictures[category] = {p.parts[-2:]: p for p in (results / category / "images").rglob("*.png")}
        assert tests and sorted(pictures[category]) == tests
    good = ("good", "000.png")
    assert pictures["coffee"][good].read_bytes() != pictures["tissue"][good].read_bytes()

    report = (results / "results.md").read_text()
    for line in ("| model | AnomalyCLIP |", "| backbone | zsad-tiny |",
                 "| pretrained weights | none: random CLIP weights", "| image size | 64 px |", "| seed | 3 ",
                 "| date | 20", "--test-categories coffee tissue`",
                 RANDOM_WEIGHTS_BANNER, "| coffee | ", "| tissue | "):
        assert line in report

    [figure] = drawn
    assert figure["banner"] == RANDOM_WEIGHTS_BANNER
    assert [r[:2] for r in figure["rows"]] == [("coffee", "anomalous"), ("coffee", "normal"),
                                               ("tissue", "anomalous"), ("tissue", "normal")]
    assert len(set(figure["heatmap_clims"])) == 1 and len(figure["heatmap_clims"]) == 4
    assert figure["heatmap_clims"][0] == figure["colourbar_clim"]
    assert "zsad-tiny" in figure["title"] and "random" in figure["title"]
    assert (results / "heatmaps.png").stat().st_size > 10_000
