"""The demo grid through the real ``anomalib benchmark`` command, in a subprocess."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from .conftest import default_grid_models, single_run_dir

PROJECT_ROOT = Path(__file__).resolve().parents[2]
METRIC_LABELS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AUPRO", "P-F1max")

# anomalib's console script is ``anomalib.cli.cli:main``. Before it, the line of the plugin's
# installed start-up hook (``anomalib_zsad_register.pth``) runs, as Python's site module runs it;
# the hook must route ``anomalib benchmark`` to the plugin's pipeline (docs/benchmark.md, "CLI hook").
# The child starts without the site module (``-S``), so no installed ``.pth`` runs; it adds
# site-packages by hand and runs the hook line of the source tree: the line under test, not an
# installed copy.
HOOK_LINE = (PROJECT_ROOT / "src" / "anomalib_zsad_register.pth").read_text().strip()
RUN_CLI = (
    "import sys, sysconfig\n"
    "sys.path.extend(dict.fromkeys([sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']]))\n"
    f"{HOOK_LINE}\n"
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
    return subprocess.run([sys.executable, "-S", "-c", RUN_CLI, *args], cwd=cwd, env=_env(),
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
def test_demo_grid_through_anomalib_benchmark(write_grid, demo_root: Path, tmp_path: Path) -> None:
    """The demo grid through ``anomalib benchmark`` started as the installed hook starts it (the
    plugin's pipeline writes the paper tables; anomalib's own would not), with one cell that fails:
    the command fails and names it, every other cell is measured and tabled."""
    broken = {"name": "Broken", "class_path": "anomalib_zsad.benchmark.WinClipFixed",
              "init_args": {"backbone": "no-such-clip", "pretrained": None}}
    config, out = write_grid(["brick"], [*default_grid_models(demo_root), broken])
    result = run_anomalib("benchmark", "--config", str(config), cwd=tmp_path)
    assert result.returncode != 0, "a failed cell must fail the command"
    assert "Broken / demo / brick" in result.stderr + result.stdout
    run = single_run_dir(out)

    raw = pd.read_csv(run / "raw_results.csv")
    assert raw.set_index("model").loc["Broken", "status"].startswith("failed: ValueError")
    raw = raw[raw["model"] != "Broken"]
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
    assert list(table.index) == [*models, "Broken"]  # the failed cell stays in the table, without figures
    assert table.loc["Broken", [f"demo/brick/{label}" for label in METRIC_LABELS]].isna().all()
    table = table.drop("Broken")
    for category in ("brick", "mean"):
        for label in METRIC_LABELS:
            values = table[f"demo/{category}/{label}"]
            assert values.between(0, 100).all(), (category, label, values)
    raw_by_model = raw.set_index("model")
    assert ((table["demo/brick/I-AUROC"] - 100 * raw_by_model["image_AUROC"]).abs() < 1e-2).all()
    assert (table["demo/time/train_s"] > 0).all()

    md = markdown_mean_table((run / "results.md").read_text())
    assert list(md) == [*models, "Broken"]
    assert all(math.isnan(value) for value in md.pop("Broken").values())
    for model in models:
        for label in METRIC_LABELS:
            assert math.isclose(md[model][label], table.loc[model, f"demo/mean/{label}"], abs_tol=0.06)

    import matplotlib.image

    image = matplotlib.image.imread(run / "results.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 200
