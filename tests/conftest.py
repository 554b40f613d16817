"""Fixtures shared by the whole suite: parity-set discovery and tiny random CLIPs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch loads OpenMP: threads that wait sleep instead of spinning. With ``-n 2`` two workers
# (and their anomalib subprocesses) share 2 cores; spinning OpenMP threads then take the cores from
# the threads that work, and the suite ran twice as long (the same tests: 63 s default, 32 s passive).
# Set by the suite, not the package: a user's single process is not affected. Results do not change.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch

from anomalib_zsad.clip import ClipModel, load_clip

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def parity_root() -> Path:
    """``$ZSAD_PARITY_DIR``, else ``../shared/parity`` beside the project."""
    return Path(os.environ.get("ZSAD_PARITY_DIR", PROJECT_ROOT.parent / "shared" / "parity")).resolve()


def require_parity_set(method: str, *files: str) -> Path:
    """The folder of one method's parity set, with ``files`` in it.

    Where it is missing (a user's clone has no ``../shared``) the test is skipped with the reason;
    with ``ZSAD_REQUIRE_PARITY=1`` (CI) it fails instead, so a lost set cannot pass silently.
    """
    folder = parity_root() / method
    missing = [name for name in files if not (folder / name).is_file()]
    if folder.is_dir() and not missing:
        return folder
    reason = (f"parity set {folder} is missing" if not folder.is_dir() else f"{folder} lacks {missing}") + (
        ": set $ZSAD_PARITY_DIR to the folder that holds the official reference outputs")
    if os.environ.get("ZSAD_REQUIRE_PARITY") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def load_parity_tensors(folder: Path, name: str) -> dict:
    """Reference files hold small dicts and strings besides tensors (see the sets' README)."""
    return torch.load(folder / name, map_location="cpu", weights_only=False)


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    """Results are compared at 1e-6: fix the thread count like the reference runs did."""
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_clip() -> ClipModel:
    """A 4-block, width-64 random CLIP (224 px, patch 16): builds in milliseconds."""
    return load_clip("zsad-tiny", pretrained=None, seed=0)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated demo set (3 texture categories, 64 px, MVTec AD layout) for model flows."""
    from anomalib_zsad.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "zsad_demo", seed=0,
                             categories=("brick", "grass", "coffee"), image_size=64,
                             n_train=2, n_test_good=2, n_test_defect=4)


def assert_reloads_identically(model, checkpoint: Path, size: int = 64):
    """A Lightning checkpoint of a plugin model leaves the frozen backbone out, says the learnt parts
    were trained, and reloads to bit-identical scores and maps. Returns the reloaded model."""
    stored = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert not any(k.startswith(model.frozen_prefixes) for k in stored), "the frozen backbone was stored"
    reloaded = type(model).load_from_checkpoint(checkpoint, weights_only=True)
    assert bool(reloaded.learnt_parts_trained)
    # the object word of the prompts comes from the data at test time (class_name="auto"): compare alike
    word, set_word = getattr(model.model, "class_name", None), getattr(reloaded.model, "set_class_name", None)
    if word is not None and set_word is not None:
        set_word(word)
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        expected, actual = model.model(images), reloaded.model(images)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, atol=0, rtol=0)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, atol=0, rtol=0)
    return reloaded


def export_every_kind(model, root: Path, size: int = 64) -> dict:
    """torch, OpenVINO and ONNX exports of ``model``, by export type.

    torch and ONNX go through ``Engine.export``. anomalib's OpenVINO export is its ONNX export
    converted by ``openvino.convert_model`` and saved uncompressed; tracing a model to ONNX is the
    slow part (half a minute for AdaCLIP), so the OpenVINO file is converted here from the ONNX one
    exactly that way. ``tests/models/test_export_any_size.py`` runs anomalib's own OpenVINO path.
    """
    import openvino
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine

    engine = Engine(accelerator="cpu", default_root_dir=root, logger=False)
    paths = {kind: engine.export(model, export_type=kind, export_root=root / kind.value, input_size=(size, size))
             for kind in (ExportType.TORCH, ExportType.ONNX)}
    xml = root / ExportType.OPENVINO.value / "weights" / "openvino" / "model.xml"
    xml.parent.mkdir(parents=True)
    openvino.save_model(openvino.convert_model(paths[ExportType.ONNX]), xml, compress_to_fp16=False)
    return {**paths, ExportType.OPENVINO: xml}


def assert_torch_inferencer_matches(model, path: str | Path, size: int = 64, tolerance: float = 1e-4) -> None:
    """anomalib's TorchInferencer runs the torch export and gives the model's score.
    The caller sets ``TRUST_REMOTE_CODE=1`` (anomalib refuses pickled models otherwise)."""
    from anomalib.deploy import TorchInferencer

    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    result = TorchInferencer(path=path, device="cpu").predict(image)
    with torch.no_grad():
        expected = model(image[None])
    torch.testing.assert_close(result.pred_score.reshape(1), expected.pred_score, atol=tolerance, rtol=0)


def run_export(path: str | Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores and maps of an exported file on a batch in [0, 1]: an OpenVINO ``.xml`` through
    anomalib's ``OpenVINOInferencer``, an ``.onnx`` through onnxruntime (what ONNX users run)."""
    if Path(path).suffix == ".onnx":
        onnxruntime = pytest.importorskip(
            "onnxruntime", reason="onnxruntime is not installed (pip install -e '.[test]'): ONNX files not run")

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images}), strict=True))
        return outputs["pred_score"], outputs["anomaly_map"]
    result = openvino_predict(path, images)
    return np.asarray(result.pred_score), np.asarray(result.anomaly_map)


def openvino_predict(path: str | Path, images: np.ndarray | str | Path):
    """anomalib's ``OpenVINOInferencer`` on CPU, built and run in a scratch folder: it points OpenVINO's
    model cache at ``openvino_cache/`` in the working folder (a relative path, written to at compile
    and at inference), which filled the checkout (75 MB a run)."""
    import contextlib
    import tempfile

    from anomalib.deploy import OpenVINOInferencer

    scratch = Path(tempfile.gettempdir()) / "zsad-tests-openvino"
    scratch.mkdir(exist_ok=True)
    images = str(Path(images).resolve()) if isinstance(images, str | Path) else images
    with contextlib.chdir(scratch):
        return OpenVINOInferencer(path=Path(path).resolve(), device="CPU").predict(images)


def assert_export_equals_torch(model, path: str | Path, size: int = 64, tolerance: float = 1e-4) -> None:
    """The exported model (OpenVINO or ONNX) gives the torch model's scores and maps within
    ``tolerance``, for one image and for two (the exported batch size stays dynamic)."""
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images)
    for count in (1, 2):
        scores, maps = run_export(path, images[:count].numpy())
        np.testing.assert_allclose(scores.reshape(count), expected.pred_score[:count].numpy(), atol=tolerance)
        np.testing.assert_allclose(maps.reshape(count, size, size), expected.anomaly_map[:count].numpy(),
                                   atol=tolerance)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests and tests grouped on one worker (``xdist_group``: they share an expensive module
    fixture) first, stable order otherwise: with ``-n 2`` a two-minute flow left for the end would
    run alone on one core while the other waits."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None and item.get_closest_marker("xdist_group") is None)
