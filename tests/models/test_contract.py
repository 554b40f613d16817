"""The contract every registered plugin model fills in (see ``models/components/contract.py``):
one vocabulary, every argument checked before any work, help for every argument, safe official
weights, a CLIP built when needed and bound to the checkpoint that was trained on it."""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch
from anomalib.models.components import AnomalibModule
from docstring_parser import parse
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn

import anomalib_zsad.models as plugin_models
from anomalib_zsad.models.components.contract import IDENTITY_KEY, ClipModelContract
from conftest import PROJECT_ROOT

MODELS = [getattr(plugin_models, name) for name in plugin_models.__all__]
TINY = {"backbone": "zsad-tiny", "pretrained": None, "image_size": 64}
# Models that are not CLIP-based: their tiny settings (random timm backbone, small flows).
TINY_SETTINGS = {"BGAD": {"backbone": "resnet18", "layers": [1, 2], "pretrained": False, "image_size": 64,
                          "coupling_layers": 2, "pos_embed_dim": 16, "flow_batch_size": 256, "permute_soft": False},
                 "M3DM": {"backbone": "vit_small_patch8_224.dino", "pretrained": False, "point_checkpoint": None,
                          "image_size": 64, "num_group": 32, "group_size": 16}}
SHARED_VOCABULARY = ("backbone", "pretrained", "image_size", "official_checkpoint", "seed")
CLIP_VOCABULARY = ("activation", "allow_clip_mismatch")
# A second bad argument, beside image_size, per kind of model: CLIP's activation, BGAD's condition size.
SECOND_BAD = {"BGAD": ("pos_embed_dim", 6), "M3DM": ("num_group", 0)}
RENAMED = {"AnomalyCLIP": "prompt_checkpoint", "AdaCLIP": "weights", "Vand": "checkpoint", "BayesPFL": "checkpoint"}
ids = [model.__name__ for model in MODELS]


def tiny(model_class: type) -> dict:
    """Settings that build ``model_class`` small and offline (a tiny random CLIP, or its own)."""
    return dict(TINY_SETTINGS.get(model_class.__name__, TINY))


def is_clip(model_class: type) -> bool:
    return issubclass(model_class, ClipModelContract)


def model_inputs(model_class: type, count: int = 1, size: int = 64) -> tuple[torch.Tensor, ...]:
    """The torch model's inputs: images, and an organized point cloud per image for the models that
    take one (M3DM: rendered domes of the 3D demo set)."""
    images = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0))
    if not getattr(model_class, "needs_point_clouds", False):
        return (images,)
    import numpy as np

    from anomalib_zsad.data.demo3d import render_sample

    rng = np.random.default_rng(0)
    clouds = [torch.from_numpy(render_sample("dome", size, rng)[1]).permute(2, 0, 1) for _ in range(count)]
    return images, torch.stack(clouds)


def lightning_checkpoint(model: AnomalibModule) -> dict:
    """What Lightning writes for ``model`` (state dict and hyper-parameters, then the model's hook)."""
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    return checkpoint


@pytest.mark.parametrize("model_class", MODELS, ids=ids)
def test_is_a_direct_anomalib_module_with_the_shared_vocabulary(model_class: type) -> None:
    assert AnomalibModule in model_class.__bases__  # anomalib's get_model only sees direct subclasses
    parameters = inspect.signature(model_class.__init__).parameters
    assert {*SHARED_VOCABULARY, model_class.mismatch_flag} <= set(parameters)
    if is_clip(model_class):
        assert set(CLIP_VOCABULARY) <= set(parameters)
    if "class_name" in parameters:
        assert parameters["class_name"].default == "auto"


@pytest.mark.parametrize("model_class", MODELS, ids=ids)
def test_every_argument_has_help(model_class: type) -> None:
    """jsonargparse shows the docstring's ``Args`` entries as ``--model.help`` text."""
    documented = {p.arg_name for p in parse(model_class.__doc__).params if p.description}
    arguments = set(inspect.signature(model_class.__init__).parameters) - {"self"}
    assert arguments - documented == set()


@pytest.mark.parametrize("model_class", MODELS, ids=ids)
def test_construction_loads_no_clip(model_class: type) -> None:
    """The default (ViT-L/14@336, OpenAI weights, not available offline) constructs at once: the
    CLIP is only built when needed, so a checkpoint can still say which one it wants."""
    model = model_class()
    assert not model.is_built


@pytest.mark.parametrize("model_class", MODELS, ids=ids)
def test_bad_arguments_fail_at_construction_all_at_once(model_class: type) -> None:
    name, value = SECOND_BAD.get(model_class.__name__, ("activation", "relu"))
    with pytest.raises(ValueError, match="image_size") as error:
        model_class(**{**tiny(model_class), "image_size": 8, name: value})
    assert name in str(error.value)


@pytest.mark.parametrize("model_class", MODELS, ids=ids)
def test_image_size_off_the_patch_grid_warns(model_class: type) -> None:
    """A CLIP's patch size is known from its name (warned at construction); a CNN's strides once
    it is built (warned then)."""
    def construct_and_build() -> None:
        model = model_class(**{**tiny(model_class), "image_size": 70})
        if not is_clip(model_class):
            _ = model.model

    with pytest.warns(UserWarning, match="multiple of the patch size"):
        construct_and_build()


@pytest.mark.parametrize(("model_class", "arguments", "named"), [
    ("AnomalyCLIP", {"n_ctx": 0, "sigma": -1, "feature_layers": [5]}, ("n_ctx", "sigma", "feature_layers")),
    ("AnomalyCLIP", {"dpam_start": 9}, ("dpam_start",)),
    ("AdaCLIP", {"k_clusters": 0, "hsf_alpha": 2.0, "prompting_type": "X"}, ("k_clusters", "hsf_alpha", "prompting_type")),
    ("Vand", {"k_shot": -1, "feature_layers": [0]}, ("k_shot", "feature_layers")),
    ("AACLIP", {"levels": [7], "image_score": "mean", "blur_sigma": 0}, ("levels", "image_score", "blur_sigma")),
    ("BayesPFL", {"feature_layers": [5], "num_samples": 0, "score_alpha": 1.5}, ("feature_layers", "num_samples", "score_alpha")),
    ("CLIPBaseline", {"prompts": "winclip", "feature_layers": [5], "temperature": 0}, ("prompts", "feature_layers", "temperature")),
    ("CoOp", {"n_ctx": 0, "lam": -1, "dpam_start": 9}, ("n_ctx", "lam", "dpam_start")),
    ("BGAD", {"pos_beta": 1.5, "ml_loss": "x", "score_normalization": "y", "layers": []},
     ("pos_beta", "ml_loss", "score_normalization", "layers")),
    ("M3DM", {"f_coreset": 0, "coreset_eps": 1.5, "n_reweight": 1, "ocsvm_nu": 0, "backbone": "resnet18"},
     ("f_coreset", "coreset_eps", "n_reweight", "ocsvm_nu", "backbone")),
])
def test_model_specific_arguments_are_checked(model_class: str, arguments: dict, named: tuple) -> None:
    cls = getattr(plugin_models, model_class)
    with pytest.raises(ValueError) as error:
        cls(**{**tiny(cls), **arguments})
    for name in named:
        assert name in str(error.value)


@pytest.mark.parametrize("model_class", MODELS, ids=ids)
def test_non_finite_official_weights_are_refused(model_class: type, tmp_path: Path) -> None:
    """Refused at construction, naming the problem: NaN/Inf values, or any file for a model with
    nothing learnt (no official weights exist)."""
    path = tmp_path / "official.pth"
    torch.save({"prompt_learner": {"ctx_pos": torch.tensor([1.0, float("nan")])}, "head.weight": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="NaN or Inf" if model_class.has_learnt_parts else "no official weights"):
        model_class(**tiny(model_class), official_checkpoint=path)


@pytest.mark.parametrize("model_class", [m for m in MODELS if m.__name__ in RENAMED], ids=lambda m: m.__name__)
def test_old_official_weights_names_still_work_with_a_warning(model_class: type, tmp_path: Path) -> None:
    path = tmp_path / "missing.pth"
    with pytest.warns(FutureWarning, match="official_checkpoint"), pytest.raises(FileNotFoundError):
        model_class(**TINY, **{RENAMED[model_class.__name__]: path})


@pytest.mark.parametrize("model_class", MODELS, ids=ids)
def test_checkpoint_settings_are_adopted_and_conflicts_refused(model_class: type) -> None:
    settings = tiny(model_class)
    trained = model_class(**settings, seed=3)
    _ = trained.model  # trained: built
    trained.learnt_parts_trained.fill_(True)
    checkpoint = lightning_checkpoint(trained)
    assert checkpoint[IDENTITY_KEY]["backbone"] == settings["backbone"]
    assert not any(key.startswith(model_class.frozen_prefixes) for key in checkpoint["state_dict"])

    # --ckpt_path alone: every setting the user did not give comes from the checkpoint
    fresh = model_class()
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert fresh.settings["backbone"] == settings["backbone"]
    assert fresh.pre_processor.transform.transforms[0].size == [64, 64]
    inputs = model_inputs(model_class)
    trained.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(*inputs).anomaly_map, trained.model(*inputs).anomaly_map)

    # a setting the user did give, against the checkpoint: refused, naming what it needs
    with pytest.raises(ValueError, match="seed: checkpoint 3, now 1"):
        model_class(**settings, seed=1).on_load_checkpoint(lightning_checkpoint(trained))
    with pytest.raises(ValueError, match="image_size"):
        model_class(**{**settings, "image_size": 96}).on_load_checkpoint(lightning_checkpoint(trained))
    knowingly = model_class(**settings, seed=1, **{model_class.mismatch_flag: True})
    knowingly.on_load_checkpoint(lightning_checkpoint(trained))
    assert knowingly.settings["seed"] == 1


def test_weights_file_identity_is_its_content(tmp_path: Path) -> None:
    """A CLIP file is identified by its SHA-256: a renamed copy is the same CLIP, another file is not."""
    from anomalib_zsad.clip import load_clip
    from anomalib_zsad.models import AnomalyCLIP
    from clip.test_loading import openai_state_dict

    for seed, name in ((0, "clip.pt"), (1, "other.pt")):
        torch.save(openai_state_dict(load_clip("zsad-tiny", None, seed=seed)), tmp_path / name)
    (tmp_path / "copy.pt").write_bytes((tmp_path / "clip.pt").read_bytes())
    trained = AnomalyCLIP(backbone="zsad-tiny", pretrained=str(tmp_path / "clip.pt"), image_size=64)
    _ = trained.model
    checkpoint = lightning_checkpoint(trained)
    AnomalyCLIP(backbone="zsad-tiny", pretrained=str(tmp_path / "copy.pt"), image_size=64).on_load_checkpoint(
        lightning_checkpoint(trained))
    with pytest.raises(ValueError, match="pretrained"):
        AnomalyCLIP(backbone="zsad-tiny", pretrained=str(tmp_path / "other.pt"), image_size=64).on_load_checkpoint(
            checkpoint)


@pytest.mark.parametrize("model_class", MODELS, ids=ids)
def test_paper_epochs_unless_the_user_gives_a_limit(model_class: type) -> None:
    model = model_class(**tiny(model_class))
    paper = model.default_max_epochs()
    if not model_class.has_learnt_parts:  # nothing to train: Lightning's settings are left alone
        assert paper is None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.trainer = Trainer(logger=False, enable_checkpointing=False)
        model.use_paper_epochs()
        assert model.trainer.fit_loop.max_epochs in (None, 1000)
        return
    assert paper and paper < 1000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unset, given = Trainer(logger=False, enable_checkpointing=False), Trainer(max_epochs=2, logger=False)
    model.trainer = unset
    model.use_paper_epochs()
    assert unset.fit_loop.max_epochs == paper
    model.trainer = given
    model.use_paper_epochs()
    assert given.fit_loop.max_epochs == 2


@pytest.mark.parametrize("model_class", MODELS, ids=ids)
def test_untrained_learnt_parts_warn_at_inference(model_class: type, caplog: pytest.LogCaptureFixture) -> None:
    settings = tiny(model_class)
    model = model_class(**settings)
    if not model_class.has_learnt_parts:  # nothing to learn: ready as it is, nothing to warn about
        with caplog.at_level("WARNING"):
            model.ready_for_inference()
        assert "never trained" not in caplog.text
        return
    with caplog.at_level("WARNING"):
        model.ready_for_inference()
    assert "never trained nor loaded" in caplog.text
    caplog.clear()
    fitting = model_class(**settings)  # the sanity validation before training is not a warning case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitting.trainer = Trainer(logger=False, enable_checkpointing=False)
    fitting.trainer.state.fn = TrainerFn.FITTING
    with caplog.at_level("WARNING"):
        fitting.ready_for_inference()
    assert "never trained" not in caplog.text
    with caplog.at_level("WARNING"):
        model_class(**settings)._freeze_for_export()  # what every export runs first
    assert "never trained nor loaded" in caplog.text
    caplog.clear()
    trained = model_class(**settings)
    trained.learnt_parts_trained.fill_(True)
    with caplog.at_level("WARNING"):
        trained.ready_for_inference()
    assert "never trained" not in caplog.text


def test_every_torch_load_is_weights_only() -> None:
    """An untrusted file must not run code: no ``torch.load`` in the package or its scripts may
    fall back to pickle's full power."""
    offenders = []
    for path in [*(PROJECT_ROOT / "src").rglob("*.py"), *(PROJECT_ROOT / "benchmarks").rglob("*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for call in re.finditer(r"torch\.load\(", line):
                statement = line[call.start():]
                if "weights_only=True" not in statement and "``" not in line:
                    offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{number}")
    assert offenders == []


def test_torch_requirement_has_the_safe_default() -> None:
    """torch >= 2.6 loads with ``weights_only=True`` by default, also in code we do not control."""
    text = (PROJECT_ROOT / "pyproject.toml").read_text()
    version = re.search(r'"torch>=(\d+)\.(\d+)', text)
    assert version and (int(version[1]), int(version[2])) >= (2, 6)


class _Payload:
    """Unpickling this runs code: it writes a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_crafted_checkpoint_runs_no_code_through_anomalib_test(tmp_path: Path, demo_root: Path) -> None:
    """``anomalib test --ckpt_path evil.ckpt``: Lightning's loading (torch >= 2.6 defaults) refuses
    the pickled object instead of running it."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    marker = tmp_path / "pwned"
    crafted = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, crafted)
    engine = Engine(accelerator="cpu", default_root_dir=tmp_path / "run", logger=False)
    data = MVTecAD(root=demo_root, category="coffee", eval_batch_size=4, num_workers=0)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        engine.test(MODELS[0](**TINY), datamodule=data, ckpt_path=crafted)
    assert not marker.exists()


def test_labels_and_masks_use_the_learnt_raw_thresholds() -> None:
    """Scores stay un-normalised (paper metrics), and labels/masks compare them with the thresholds
    learnt on validation, not with anomalib's normalised 0.5."""
    from anomalib.data import InferenceBatch

    post = MODELS[0](**TINY).post_processor
    post._image_threshold.fill_(2.0)
    post._pixel_threshold.fill_(1.0)
    anomaly_map = torch.tensor([[[0.2, 0.8], [1.5, 3.9]]] * 2)
    out = post(InferenceBatch(pred_score=torch.tensor([1.5, 2.5]), anomaly_map=anomaly_map))
    assert out.pred_score.tolist() == [1.5, 2.5]  # not normalised
    assert out.pred_label.tolist() == [False, True]
    assert out.pred_mask[0].tolist() == [[False, False], [True, True]]


@pytest.mark.parametrize("model_class", MODELS, ids=ids)
def test_same_settings_same_model(model_class: type) -> None:
    """The learnt parts start from ``seed``: two models built alike give the same numbers."""
    inputs = model_inputs(model_class)
    settings = tiny(model_class)
    first, second = model_class(**settings, seed=5).eval(), model_class(**settings, seed=5).eval()
    with torch.no_grad():
        torch.testing.assert_close(first.model(*inputs).anomaly_map, second.model(*inputs).anomaly_map, atol=0, rtol=0)
