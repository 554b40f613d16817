"""Threshold sources (components/thresholds.py) through the plugin's post-processor: each source's
thresholds, their place in checkpoints, predict on unlabelled images, calibrated scores, exports."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from anomalib import LearningType
from anomalib.data import InferenceBatch, MVTecAD
from anomalib.engine import Engine
from anomalib.metrics import F1Max

from anomalib_zsad.data import CrossDataset
from anomalib_zsad.models import AnomalyCLIP
from anomalib_zsad.models.components.post_processing import RawScorePostProcessor
from anomalib_zsad.models.components.thresholds import (
    HOLDOUT_ATTRIBUTE,
    AuxiliaryThresholds,
    FixedThresholds,
    NormalImageThresholds,
    ThresholdStatistics,
    ValidationThresholds,
    describe_checkpoint,
    run_model,
    source_from_config,
)

TINY = {"backbone": "zsad-tiny", "pretrained": None, "image_size": 64}


def _model(source=None, trained: bool = True) -> AnomalyCLIP:
    post = RawScorePostProcessor(threshold_source=source) if source is not None else True
    model = AnomalyCLIP(**TINY, post_processor=post)
    if trained:  # as with official weights: learnt parts count as trained, thresholds unknown
        model.learnt_parts_trained.fill_(True)
    return model


def _cross(root: Path, target: str = "coffee") -> CrossDataset:
    return CrossDataset(train=MVTecAD(root=root), test=MVTecAD(root=root, category=target),
                        train_categories=["brick", "grass"], train_batch_size=4, eval_batch_size=4, num_workers=0,
                        seed=0)


def _unlabelled_folder(demo_root: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for index, path in enumerate(sorted((demo_root / "coffee" / "test").rglob("*.png"))):
        shutil.copy(path, folder / f"{index:03d}.png")  # no labels: no good/defect folders, no masks
    return folder


def _engine(tmp_path: Path, **kwargs) -> Engine:
    return Engine(accelerator="cpu", default_root_dir=tmp_path / "results", logger=False,
                  enable_progress_bar=False, **kwargs)


def _predictions(predictions: list) -> dict[str, torch.Tensor]:
    return {key: torch.cat([getattr(batch, key).reshape(len(batch.pred_score), -1) for batch in predictions])
            for key in ("pred_score", "pred_label", "anomaly_map", "pred_mask")}


# ---------------------------------------------------------------------- the sources and their settings
def test_sources_from_names_dicts_and_instances() -> None:
    assert isinstance(source_from_config(None), ValidationThresholds)
    assert isinstance(source_from_config("auxiliary"), AuxiliaryThresholds)
    normal = source_from_config({"source": "normal_images", "k": 3, "image_quantile": 1.0})
    assert isinstance(normal, NormalImageThresholds) and normal.k == 3 and normal.image_quantile == 1.0
    assert source_from_config(normal.config()) == normal
    fixed = FixedThresholds(image=0.4, pixel=1.5)
    assert source_from_config(fixed) is fixed and fixed.config() == {"source": "fixed", "image": 0.4, "pixel": 1.5}
    with pytest.raises(ValueError, match="must be one of"):
        source_from_config("oracle")
    with pytest.raises(ValueError, match="holdout"):
        AuxiliaryThresholds(holdout=1.0)
    with pytest.raises(ValueError, match="k must"):
        NormalImageThresholds(k=0)
    with pytest.raises(ValueError, match="finite"):
        FixedThresholds(image=math.nan, pixel=1.0)


def test_cli_takes_and_prints_the_source() -> None:
    """`--model.post_processor RawScorePostProcessor --model.post_processor.threshold_source ...`:
    the short class names parse, the dumped config (what --print_config prints) shows the source."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(AnomalyCLIP, "model")
    config = parser.parse_args(["--model.backbone", "zsad-tiny", "--model.image_size", "64",
                                "--model.post_processor", "RawScorePostProcessor",
                                "--model.post_processor.threshold_source", "NormalImageThresholds",
                                "--model.post_processor.threshold_source.k", "3"])
    printed = parser.dump(config)
    assert "NormalImageThresholds" in printed and "k: 3" in printed and "image_quantile: 0.99" in printed
    model = parser.instantiate_classes(config).model
    assert isinstance(model.post_processor, RawScorePostProcessor)
    assert model.post_processor.threshold_source == NormalImageThresholds(k=3)
    by_name = parser.parse_args(["--model.backbone", "zsad-tiny", "--model.post_processor", "RawScorePostProcessor",
                                 "--model.post_processor.threshold_source", "auxiliary"])
    source = parser.instantiate_classes(by_name).model.post_processor.threshold_source
    assert source == AuxiliaryThresholds()


# ---------------------------------------------------------------------- (c) fixed values
def test_fixed_thresholds_label_an_unlabelled_folder(demo_root: Path, tmp_path: Path) -> None:
    """`anomalib predict` on a folder without labels, no checkpoint: no validation is needed, and
    pred_label / pred_mask are the raw score / map against the given thresholds."""
    model = _model(FixedThresholds(image=0.5, pixel=1.0))
    assert model.learning_type == LearningType.ONE_CLASS  # Engine.predict runs no validation
    assert _model().learning_type == LearningType.ZERO_SHOT  # the validation source would need one
    folder = _unlabelled_folder(demo_root, tmp_path)
    out = _predictions(_engine(tmp_path).predict(model, data_path=folder))
    scores = out["pred_score"].reshape(-1)
    probe = float(scores.median())  # a threshold in the middle of these scores: both labels occur
    model.post_processor.threshold_source = FixedThresholds(image=probe, pixel=float(out["anomaly_map"].median()))
    out = _predictions(_engine(tmp_path).predict(model, data_path=folder))
    labels = out["pred_label"].reshape(-1)
    assert labels.dtype == torch.bool and 0 < int(labels.sum()) < len(labels)
    assert torch.equal(labels, out["pred_score"].reshape(-1) > probe)
    assert torch.equal(out["pred_mask"], out["anomaly_map"] > float(out["anomaly_map"].median()))


# ---------------------------------------------------------------------- (b) k normal target images
def test_normal_images_thresholds_are_quantiles_of_target_train_images(demo_root: Path) -> None:
    source = NormalImageThresholds(k=2, image_quantile=1.0, pixel_quantile=0.9, seed=1)
    model = _model(source)
    datamodule = _cross(demo_root)
    stats = model.post_processor.calibrate(model, datamodule)
    train_names = {p.name for p in (demo_root / "coffee" / "train" / "good").glob("*.png")}
    assert stats.info["images"] == 2 and set(stats.info["image_paths"]) <= train_names  # never test images
    batches = list(run_model(model, source.images(datamodule)))
    scores = torch.cat([b.pred_score.reshape(-1) for b in batches])
    maps = torch.cat([b.anomaly_map.flatten() for b in batches])
    assert stats.image_threshold == pytest.approx(float(scores.max()), abs=1e-6)
    assert stats.pixel_threshold == pytest.approx(float(np.quantile(maps.numpy(), 0.9)), abs=1e-6)
    post = model.post_processor
    assert float(post.image_threshold) == pytest.approx(stats.image_threshold)
    assert float(post.pixel_threshold) == pytest.approx(stats.pixel_threshold)
    assert (float(post.image_min), float(post.image_max)) == pytest.approx((float(scores.min()), float(scores.max())))


def test_normal_images_from_a_folder_at_predict_start(demo_root: Path, tmp_path: Path) -> None:
    """An official checkpoint and two folders (a few good images, the images to label): one
    `anomalib predict`, no validation, thresholds computed when predict starts."""
    source = NormalImageThresholds(k=2, folder=str(demo_root / "coffee" / "train" / "good"))
    model = _model(source)
    assert model.learning_type == LearningType.ONE_CLASS and not model.post_processor.thresholds_known
    out = _predictions(_engine(tmp_path).predict(model, data_path=_unlabelled_folder(demo_root, tmp_path)))
    threshold = float(model.post_processor.image_threshold)
    assert math.isfinite(threshold) and model.post_processor.threshold_statistics["images"] == 2
    assert torch.equal(out["pred_label"].reshape(-1), out["pred_score"].reshape(-1) > threshold)
    assert torch.equal(out["pred_mask"], out["anomaly_map"] > float(model.post_processor.pixel_threshold))


# ---------------------------------------------------------------------- (a) held-out auxiliary data
def test_auxiliary_thresholds_from_a_held_out_part_kept_in_the_checkpoint(demo_root: Path, tmp_path: Path) -> None:
    model = _model(AuxiliaryThresholds(holdout=0.5, seed=0), trained=False)
    datamodule = _cross(demo_root)
    engine = _engine(tmp_path, max_epochs=1, num_sanity_val_steps=0)
    engine.fit(model, datamodule=datamodule)

    held = getattr(datamodule, HOLDOUT_ATTRIBUTE)
    train_paths = set(datamodule.train_data.samples["image_path"])
    held_paths = set(held["dataset"].samples["image_path"])
    assert held["trained"] and not train_paths & held_paths  # never trained on
    assert len(train_paths | held_paths) == 2 * (2 + 4)  # brick + grass test splits, all used
    assert set(held["dataset"].samples["label_index"]) == {0, 1}  # drawn per label: both kinds
    assert not any("coffee" in str(p) for p in held_paths)  # the target is never used

    # the thresholds are F1-optimal on the hold-out: F1 there equals anomalib's F1-max
    post = model.post_processor
    stats = post.threshold_statistics
    batches = list(run_model(model, held["dataset"]))
    scores = torch.cat([b.pred_score.reshape(-1) for b in batches])
    labels = torch.cat([b.gt_label.reshape(-1) for b in batches]).int()
    f1max = F1Max(fields=["pred_score", "gt_label"])
    f1max.update(SimpleNamespace(pred_score=scores, gt_label=labels))
    assert stats["image_f1"] == pytest.approx(float(f1max.compute()), abs=1e-4)
    assert math.isfinite(float(post._pixel_threshold)) and "pixel_f1" in stats

    checkpoint = Path(engine.trainer.checkpoint_callback.best_model_path)
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert stored["anomalib_post_processor_config"]["threshold_source"] == AuxiliaryThresholds(holdout=0.5).config()
    described = describe_checkpoint(checkpoint)
    assert "'source': 'auxiliary'" in described and f"image_threshold: {float(post.image_threshold)}" in described
    reloaded = AnomalyCLIP.load_from_checkpoint(checkpoint, weights_only=True)
    assert reloaded.post_processor.threshold_source == AuxiliaryThresholds(holdout=0.5)
    assert float(reloaded.post_processor.image_threshold) == float(post.image_threshold)
    assert float(reloaded.post_processor.pixel_threshold) == float(post.pixel_threshold)
    assert reloaded.post_processor.threshold_statistics["image_f1"] == stats["image_f1"]
    assert reloaded.learning_type == LearningType.ONE_CLASS  # test/predict run at once

    # a source given with the checkpoint wins over the checkpoint's
    given = AnomalyCLIP.load_from_checkpoint(
        checkpoint, weights_only=True, post_processor=RawScorePostProcessor(threshold_source=FixedThresholds(7, 8)))
    assert (float(given.post_processor.image_threshold), float(given.post_processor.pixel_threshold)) == (7.0, 8.0)


def test_auxiliary_needs_anomalous_training_images(demo_root: Path) -> None:
    model = _model(AuxiliaryThresholds(holdout=0.5))
    datamodule = MVTecAD(root=demo_root, category="coffee", eval_batch_size=4, num_workers=0)
    datamodule.setup("fit")  # a one-class train split: normal images only
    with pytest.raises(ValueError, match="normal and anomalous"):
        model.post_processor.calibrate(model, datamodule)


# ---------------------------------------------------------------------- calibrated score
def test_calibrated_scores_keep_the_labels_and_the_benchmark_keeps_raw_scores() -> None:
    from anomalib_zsad.benchmark.evaluation import use_raw_scores

    model = _model(ValidationThresholds())
    post = model.post_processor
    post.apply_statistics(ThresholdStatistics(image_threshold=2.0, pixel_threshold=1.0, image_min=0.0, image_max=4.0,
                                              pixel_min=0.0, pixel_max=2.0))
    batch = InferenceBatch(pred_score=torch.tensor([1.0, 2.5, 9.0]), anomaly_map=torch.tensor([[[0.5, 1.5]]] * 3))
    raw = post(batch)
    post.enable_normalization = True
    calibrated = post(batch)
    assert calibrated.pred_score.tolist() == pytest.approx([0.25, 0.625, 1.0])  # (x - 2) / 4 + 0.5, clipped
    assert torch.equal(calibrated.pred_label, raw.pred_label) and torch.equal(calibrated.pred_mask, raw.pred_mask)
    assert raw.pred_label.tolist() == [False, True, True]
    post.threshold_source = FixedThresholds(image=2.0, pixel=1.0)  # no score range: scores stay raw
    assert torch.equal(post(batch).pred_score, batch.pred_score) and torch.equal(post(batch).pred_label, raw.pred_label)
    use_raw_scores(model)
    assert not post.enable_normalization
    assert torch.equal(post(batch).pred_score, batch.pred_score)


# ---------------------------------------------------------------------- the thresholds travel
@pytest.mark.slow
def test_exported_graphs_carry_the_thresholds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch, ONNX and OpenVINO exports give the torch model's labels and masks."""
    from anomalib.deploy import TorchInferencer

    from conftest import export_every_kind, openvino_predict

    model = _model(FixedThresholds(image=0.0, pixel=0.0)).eval()
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = model(images)
    ordered = raw.pred_score.sort().values  # half-way between two scores: no image sits at the threshold
    model.post_processor.threshold_source = FixedThresholds(image=float(ordered[1] + ordered[2]) / 2,
                                                            pixel=float(raw.anomaly_map.median()))
    with torch.no_grad():
        expected = model(images)
    assert 0 < int(expected.pred_label.sum()) < 4
    paths = {kind.value: path for kind, path in export_every_kind(model, tmp_path).items()}
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    results = {"torch": TorchInferencer(path=paths["torch"], device="cpu").predict(images),
               "openvino": openvino_predict(paths["openvino"], images.numpy())}
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    onnx = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
    labels = {name: np.asarray(result.pred_label).reshape(-1) for name, result in results.items()}
    labels["onnx"] = onnx["pred_label"].reshape(-1)
    masks = {name: np.asarray(result.pred_mask).reshape(4, -1) for name, result in results.items()}
    masks["onnx"] = onnx["pred_mask"].reshape(4, -1)
    for name in labels:
        np.testing.assert_array_equal(labels[name].astype(bool), expected.pred_label.numpy(), err_msg=name)
        agree = (masks[name].astype(bool) == expected.pred_mask.reshape(4, -1).numpy()).mean()
        assert agree > 0.999, (name, agree)  # float differences of ~1e-6 may flip a pixel at the threshold


def test_auxiliary_hold_out_mixes_sources_with_and_without_masks(demo_root: Path) -> None:
    """A source without masks (Folder, labels only) beside one with masks: image threshold from all
    held-out images, pixel threshold from the masked ones."""
    from anomalib.data import Folder

    no_masks = Folder(name="grass_labels_only", root=demo_root / "grass" / "test", normal_dir="good",
                      abnormal_dir=["color", "hole", "patch", "scratch"])
    datamodule = CrossDataset(train=[MVTecAD(root=demo_root), no_masks], test=MVTecAD(root=demo_root, category="coffee"),
                              train_categories=["brick"], eval_batch_size=4, num_workers=0)
    with pytest.warns(UserWarning, match="without masks"):
        datamodule.setup("fit")
    model = _model(AuxiliaryThresholds(holdout=0.5))
    stats = model.post_processor.calibrate(model, datamodule)
    held = getattr(datamodule, HOLDOUT_ATTRIBUTE)["dataset"].samples
    assert set(held["has_mask"]) == {True, False} and stats.info["images"] == len(held)
    assert math.isfinite(stats.image_threshold) and math.isfinite(stats.pixel_threshold)


@pytest.mark.slow
def test_benchmark_script_prints_the_transfer_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    """benchmarks/thresholds.py end to end, small: one row per (category, source), the oracle at its
    F1-max. Its ``main`` runs in this process (a subprocess would import torch and anomalib again)."""
    import importlib.util

    from conftest import PROJECT_ROOT

    spec = importlib.util.spec_from_file_location("thresholds_script", PROJECT_ROOT / "benchmarks" / "thresholds.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.chdir(tmp_path)
    code = script.main(["--epochs", "1", "--train-categories", "brick", "grass", "--test-categories", "coffee",
                        "--test-good", "3", "--test-defect", "3", "--n-train", "3", "--k", "2", "--holdout", "0.5",
                        "--root", str(tmp_path / "demo"), "--output", str(tmp_path / "out")])
    assert code == 0
    done = capsys.readouterr()
    assert "RANDOM CLIP WEIGHTS" in done.out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in done.out.splitlines()
            if line.startswith("| coffee |")]
    assert [row[1] for row in rows] == ["auxiliary", "normal_images", "fixed", "oracle"]
    for row in rows:
        assert all(0 <= float(row[i]) <= 1 for i in (3, 4, 5, 6, 8, 9, 10, 11))
    oracle = rows[-1]
    assert oracle[5] == oracle[6] and oracle[10] == oracle[11]  # F1 at the oracle threshold is the F1-max
    assert (tmp_path / "out" / "thresholds.md").is_file()
