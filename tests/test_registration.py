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
