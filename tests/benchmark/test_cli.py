"""The demo grid through the real ``anomalib benchmark`` command, in a subprocess."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from .conftest import single_run_dir

PROJECT_ROOT = Path(__file__).resolve().parents[2]
METRIC_LABELS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AUPRO", "P-F1max")

# anomalib's console script is ``anomalib.cli.cli:main``; the plugin's start-up hook is replaced
# here by an explicit install_pipeline() so the test does not depend on a pip install.
RUN_CLI = (
    "import sys\n"
    "from anomalib_zsad.benchmark import install_pipeline\n"
    "install_pipeline()\n"
    "from anomalib.cli.cli import main\n"
    "sys.argv = ['anomalib', *sys.argv[1:]]\n"
    "main()\n"
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT / "src"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run_anomalib(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_CLI, *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=900, check=False)


def markdown_mean_table(text: str) -> dict[str, dict[str, float]]:
    """Parse the table under the first '## <data set>: mean over categories' of results.md."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## ") and "mean over categories" in line)
    block: list[str] = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            break
    header = [cell.strip() for cell in block[0].strip("|").split("|")]
    assert header[:7] == ["model", *METRIC_LABELS], header
    rows = {}
    for line in block[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = {h: float("nan") if c == "n/a" else float(c) for h, c in zip(header[1:], cells[1:], strict=True)}
    return rows


@pytest.mark.slow
def test_demo_grid_through_anomalib_benchmark(write_grid, tmp_path: Path) -> None:
    config, out = write_grid(["brick"])
    result = run_anomalib("benchmark", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = single_run_dir(out)

    raw = pd.read_csv(run / "raw_results.csv")
    assert set(raw["status"]) == {"ok"}, raw[["model", "category", "status"]]
    models = ["PatchCore", "RD", "WinCLIP-0shot", "WinCLIP-1shot", "AnomalyCLIP"]
    assert list(raw["model"]) == models
    assert dict(zip(raw["model"], raw["regime"], strict=True)) == {
        "PatchCore": "full-shot", "RD": "full-shot", "WinCLIP-0shot": "zero-shot",
        "WinCLIP-1shot": "few-shot", "AnomalyCLIP": "auxiliary"}
    assert (raw["infer_ms_per_image"] > 0).all() and (raw["n_timed_images"] > 0).all()
    trained = raw["regime"].isin(["full-shot", "auxiliary"])
    assert (raw[trained]["fit_time_s"] > 0).all()
    assert (raw[~trained]["fit_time_s"] == 0).all()  # zero-/few-shot: nothing is trained
    assert (raw[~trained]["setup_time_s"] > 0).all()  # text / reference embeddings

    table = pd.read_csv(run / "results.csv", index_col="model")
    assert list(table.index) == models
    for category in ("brick", "mean"):
        for label in METRIC_LABELS:
            values = table[f"demo/{category}/{label}"]
            assert values.between(0, 100).all(), (category, label, values)
    raw_by_model = raw.set_index("model")
    assert ((table["demo/brick/I-AUROC"] - 100 * raw_by_model["image_AUROC"]).abs() < 1e-2).all()
    assert (table["demo/time/train_s"] > 0).all()

    md = markdown_mean_table((run / "results.md").read_text())
    assert list(md) == models
    for model in models:
        for label in METRIC_LABELS:
            assert math.isclose(md[model][label], table.loc[model, f"demo/mean/{label}"], abs_tol=0.06)

    import matplotlib.image

    image = matplotlib.image.imread(run / "results.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 200


@pytest.mark.slow
def test_failed_cell_fails_the_command_but_keeps_the_table(write_grid, tmp_path: Path) -> None:
    broken = [{"name": "Broken", "class_path": "anomalib_zsad.benchmark.WinClipFixed",
               "init_args": {"backbone": "no-such-clip", "pretrained": None}}]
    config, out = write_grid(["brick"], broken)
    result = run_anomalib("benchmark", "--config", str(config), cwd=tmp_path)
    assert result.returncode != 0
    assert "Broken / demo / brick" in result.stderr + result.stdout
    raw = pd.read_csv(single_run_dir(out) / "raw_results.csv")
    assert raw.loc[0, "status"].startswith("failed: ValueError")


@pytest.mark.slow
def test_startup_hook_makes_anomalib_benchmark_the_plugin_pipeline() -> None:
    """What the installed ``anomalib_zsad_register.pth`` runs at start-up must route
    ``anomalib benchmark`` to the plugin's pipeline (see docs/benchmark.md, "CLI hook")."""
    pth_line = (PROJECT_ROOT / "src" / "anomalib_zsad_register.pth").read_text().strip()
    probe = (pth_line + "\nimport anomalib.cli.cli\nfrom anomalib.cli.pipelines import PIPELINE_REGISTRY\n"
             "print(PIPELINE_REGISTRY['benchmark'].__module__)\n")
    result = subprocess.run([sys.executable, "-c", probe], env=_env(), capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "anomalib_zsad.benchmark.pipeline", (
        "anomalib benchmark still runs anomalib's own pipeline: the plugin's start-up hook "
        "(_register.install) must call anomalib_zsad.benchmark.install_pipeline() once "
        "anomalib.cli.pipelines is imported")
