"""The plugin is found by anomalib itself: real ``anomalib`` processes, no extra import flag."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def run(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd, check=False)


# One fresh interpreter for both checks below (each costs anomalib's ~10 s import): first what
# importing anomalib.models did to anomalib, then the registry lookups.
FRESH_PROBE = (
    "import sys\n"
    "import anomalib.models\n"
    "from PIL import Image\n"
    "import anomalib.data.utils.image as image_module\n"
    "from anomalib.data.datasets.base import image as base\n"
    "from anomalib.data import predict\n"
    "from anomalib.visualization.image import item_visualizer\n"
    "own = image_module.read_image\n"
    "print(own.__module__, base.read_image is own, predict.read_image is own,\n"
    "      item_visualizer.Image is Image, 'anomalib_zsad.data.cross_dataset' in sys.modules)\n"
    "from anomalib.models import get_model, list_models\n"
    "m = get_model('AnomalyCLIP', backbone='zsad-tiny', pretrained=None)\n"
    "n = get_model({'class_path': 'anomalib_zsad.models.AnomalyCLIP',"
    " 'init_args': {'backbone': 'zsad-tiny', 'pretrained': None}})\n"
    "print(type(m).__module__, type(n).__name__, 'anomaly_c_l_i_p' in list_models())\n"
)


@pytest.fixture(scope="module")
def fresh_probe() -> list[list[str]]:
    """The probe's two output lines, split into words."""
    result = run(sys.executable, "-c", FRESH_PROBE)
    assert result.returncode == 0, result.stderr[-3000:]
    return [line.split() for line in result.stdout.strip().splitlines()[-2:]]


def test_get_model_finds_the_plugin_by_short_name_and_path(fresh_probe: list[list[str]]) -> None:
    assert fresh_probe[1] == ["anomalib_zsad.models.anomalyclip.lightning_model", "AnomalyCLIP", "True"]


def test_cli_resolves_the_short_names_of_a_non_clip_model_and_its_datamodule() -> None:
    result = run("anomalib", "train", "--model", "BGAD", "--data", "FewAnomalies", "--data.datamodule", "MVTecAD",
                 "--print_config")
    assert result.returncode == 0, result.stderr[-3000:]
    for path in ("anomalib_zsad.models.BGAD", "anomalib_zsad.data.FewAnomalies", "anomalib.data.MVTecAD"):
        assert f"class_path: {path}" in result.stdout, path


def test_importing_anomalib_models_changes_nothing_in_anomalib(fresh_probe: list[list[str]]) -> None:
    """The hook registers the plugin (models, datamodules) but rebinds none of anomalib's functions."""
    assert fresh_probe[0] == ["anomalib.data.utils.image", "True", "True", "True", "True"]


def test_nothing_heavy_is_imported_at_interpreter_start() -> None:
    """The .pth hook only installs a finder: plain Python start-up does not import anomalib."""
    result = run(sys.executable, "-c", "import sys; print('anomalib' in sys.modules, 'torch' in sys.modules)")
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.slow
def test_cli_train_then_test_with_checkpoint(demo_root: Path, tmp_path: Path) -> None:
    """``anomalib train --model AnomalyCLIP`` on the demo set (fit, then test on the target), then
    ``anomalib test --ckpt_path`` with the checkpoint alone."""
    common = ["--model", "AnomalyCLIP", "--model.backbone", "zsad-tiny", "--model.pretrained", "null",
              "--model.image_size", "64",
              "--data", "anomalib_zsad.data.CrossDataset",
              "--data.train", "MVTecAD", "--data.train.root", str(demo_root),
              "--data.train_categories", "[brick, grass]",
              "--data.test", "MVTecAD", "--data.test.root", str(demo_root), "--data.test.category", "coffee",
              "--data.train_batch_size", "4", "--data.eval_batch_size", "4", "--data.num_workers", "0",
              "--trainer.accelerator", "cpu", "--default_root_dir", str(tmp_path / "results")]
    trained = run("anomalib", "train", *common, "--trainer.max_epochs", "1", "--logging.log_graph", "false")
    assert trained.returncode == 0, trained.stderr[-4000:]
    results = tmp_path / "results"
    checkpoints = sorted(results.rglob("*.ckpt"))
    assert checkpoints, trained.stdout[-2000:]
    # the run is named after the target datamodule, as anomalib names its own runs (issue 13)
    assert all(c.relative_to(results).parts[:3] == ("AnomalyCLIP", "MVTecAD", "coffee") for c in checkpoints)
    assert "pixel_AUPRO" in trained.stdout + trained.stderr  # `train` tested on the target with the paper metrics
    # `anomalib test --ckpt_path` on the target itself (anomalib's datamodule, no auxiliary data)
    # writes into the same tree as the cross-data-set run, with the same image layout
    own = ["--model", "AnomalyCLIP", "--model.backbone", "zsad-tiny", "--model.pretrained", "null",
           "--model.image_size", "64", "--data", "MVTecAD", "--data.root", str(demo_root),
           "--data.category", "coffee", "--data.eval_batch_size", "4", "--data.num_workers", "0",
           "--trainer.accelerator", "cpu", "--default_root_dir", str(tmp_path / "own")]
    tested_own = run("anomalib", "test", *own, "--ckpt_path", str(checkpoints[-1]))
    assert tested_own.returncode == 0, tested_own.stderr[-4000:]
    assert "pixel_AUPRO" in tested_own.stdout + tested_own.stderr

    def images(root: Path) -> set[tuple[str, ...]]:
        return {p.relative_to(root).parts[:3] + p.relative_to(root).parts[4:] for p in root.rglob("images/**/*.png")}

    assert images(results) == images(tmp_path / "own") != set()
