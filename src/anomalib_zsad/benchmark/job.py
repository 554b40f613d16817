"""One benchmark cell: a model evaluated on one category of one data set.

Why a new job instead of anomalib's ``BenchmarkJob``: that job calls
``engine.fit(self.model, self.datamodule)``, which binds the datamodule to ``train_dataloaders``.
For zero-/few-shot models ``Engine.fit`` then runs ``trainer.validate(model, None,
datamodule=None)``: no data, so WinCLIP fails before testing. It also builds the model before
seeding, evaluates normalised (clipped) scores, reports no AP/AUPRO/F1-max and no per-image
latency. Here the training regime follows the model:

``zero-shot``  - ``learning_type`` ZERO_SHOT and no ``train_data``: no training, test only.
``few-shot``   - FEW_SHOT: the model draws its k normal references from the target's train split
                 in its ``setup`` hook (WinCLIP); no gradient training.
``auxiliary``  - the model entry has ``train_data`` (e.g. ``anomalib_zsad.data.CrossDataset``):
                 train on that datamodule with Lightning whatever the learning type, then test on
                 the target, which the model never saw. The trained weights are cached in the run
                 folder and reused for every category that shares the same auxiliary config.
``full-shot``  - anything else (PatchCore, Reverse Distillation): ``Engine.fit`` on the target's
                 normal training images, then test.
``supervised`` - a model that learns from a few anomalies of the target (BGAD,
                 ``learns_from_anomalies``): ``Engine.fit`` on the target's normal training images
                 plus ``k`` anomalous test images with masks
                 (:class:`~anomalib_zsad.data.few_anomalies.FewAnomalies`, k = 10 by default), then
                 test on the test split without them.

``few_anomalies: {k, seed, per_defect_type, reuse, copy_paste}`` (in the ``benchmark`` section for
the whole grid, or in a model entry) sets the draw; where it is given, every model of the grid is
evaluated on the same test images (the draw left out), so supervised and unsupervised rows compare
alike. The draw of each cell is written to ``<run>/few_anomalies/``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
import traceback
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import pandas as pd
import torch
from anomalib import LearningType
from anomalib.callbacks import ModelCheckpoint
from anomalib.pipelines.components import Job
from filelock import FileLock
from lightning import seed_everything

from anomalib_zsad.models.components import PluginModuleMixin
from anomalib_zsad.models.components.lightning import PAPER_METRIC_FIELDS as PAPER_METRICS

from .evaluation import BenchmarkEngine, InferenceTimer, use_raw_scores
from .report import write_report
from .resolve import MODEL_NAMESPACES, build_datamodule, build_model, import_class

logger = logging.getLogger(__name__)

#: Keys of a model entry that configure the benchmark rather than the model's constructor.
BENCHMARK_KEYS = ("name", "train_data", "trainer", "image_size", "few_anomalies")
#: ``few_anomalies`` keys passed to :class:`~anomalib_zsad.data.few_anomalies.FewAnomalies` (default k: 10).
FEW_ANOMALY_KEYS = ("k", "seed", "per_defect_type", "reuse", "copy_paste")


def _resize_sizes(transform: Any) -> list[tuple[int, ...]]:  # noqa: ANN401
    """Sizes of the ``Resize`` steps in a (possibly composed) torchvision transform."""
    steps = getattr(transform, "transforms", [transform])
    return [tuple(step.size) for step in steps if type(step).__name__ == "Resize" and step.size is not None]


def sized_pre_processor(model_cls: type, size: int | list[int]) -> Any:  # noqa: ANN401
    """The model class's default pre-processor at ``size`` (model entry key ``image_size``).

    anomalib's baselines take their input size only from the pre-processor, and some (Reverse
    Distillation) size their internals from it in ``__init__``, so it is passed to the constructor
    rather than swapped in afterwards. Raises if the class ignores the size (WinCLIP-style models
    whose input size is fixed by their backbone: set their own ``init_args.image_size``).
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    pre_processor = model_cls.configure_pre_processor(image_size=size)
    if size not in _resize_sizes(getattr(pre_processor, "transform", None)):
        msg = (f"{model_cls.__name__}.configure_pre_processor ignores image_size={size}; "
               "set the size through the model's init_args instead")
        raise ValueError(msg)
    return pre_processor


class BenchmarkFailedError(RuntimeError):
    """At least one cell of the grid failed; the table marks which (``status`` column)."""


def select_train_data(train_data: dict | None, *target_names: str) -> dict | None:
    """The auxiliary datamodule config for a target data set.

    ``train_data`` is either one datamodule config (``{class_path, init_args}``) used for every
    target, or a mapping ``{<target data set>: config}`` keyed by the data set's ``name`` label in
    the config or its datamodule class name (``MVTecAD``, ``Visa``): the papers' protocol trains on
    VisA when testing MVTec AD and vice versa. A mapping without the target raises, so a grid
    cannot silently evaluate a model that was never trained.
    """
    if not train_data:
        return None
    if "class_path" in train_data:
        return train_data
    for name in target_names:
        if name and name in train_data:
            return train_data[name]
    target = " / ".join(n for n in target_names if n)
    msg = f"train_data has no entry for target data set {target!r} (keys: {sorted(train_data)})"
    raise KeyError(msg)


def regime_of(model: Any, train_data: dict | None) -> str:  # noqa: ANN401
    """``supervised`` / ``auxiliary`` / ``zero-shot`` / ``few-shot`` / ``full-shot`` (see module doc)."""
    if getattr(model, "learns_from_anomalies", False):
        return "supervised"
    if train_data:
        return "auxiliary"
    if model.learning_type == LearningType.ZERO_SHOT:
        return "zero-shot"
    if model.learning_type == LearningType.FEW_SHOT:
        return "few-shot"
    return "full-shot"


def _digest(*parts: Any) -> str:  # noqa: ANN401
    return hashlib.sha1(  # noqa: S324  (a cache key, not security)
        json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state that training can have changed: trainable parameters and all buffers.

    Frozen parameters are left out (1.7 GB of CLIP ViT-L/14@336 for AnomalyCLIP): training does
    not change them, and the job rebuilds the model from the same config under the same seed, so
    the fresh model already holds identical values.
    """
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # ``state_dict`` may also hold a module's extra state (any picklable value, e.g. Bayes-PFL's)
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in model.state_dict().items() if k not in frozen}


def load_trained_state(model: torch.nn.Module, state: dict[str, torch.Tensor], trainable: list[str]) -> list[str]:
    """Load cached weights into a freshly built model.

    Tensors whose shape differs (buffers filled by ``setup`` for the *auxiliary* data, e.g. text
    embeddings of its class names) are skipped so the target's ``setup`` recomputes them; every
    parameter that was trainable must load, or the cache is not the trained model and we raise.
    Returns the skipped keys.
    """
    own = model.state_dict()
    usable = {k: v for k, v in state.items()
              if k in own and (not isinstance(v, torch.Tensor) or own[k].shape == v.shape)}
    lost = sorted(set(trainable) - set(usable))
    if lost:
        msg = f"cached weights do not fit the model: trainable tensors {lost[:5]} missing or reshaped"
        raise RuntimeError(msg)
    model.load_state_dict(usable, strict=False)
    return sorted(set(state) - set(usable))


class ZSADBenchmarkJob(Job):
    """Evaluate one model on one category. Holds configs only (models are built inside ``run``,
    after seeding), so it pickles cheaply for anomalib's parallel runner."""

    name = "benchmark"  # the section of the config file this job reads, as in anomalib

    def __init__(
        self,
        accelerator: str,
        seed: int,
        model_entry: dict[str, Any],
        data_config: dict[str, Any],
        trainer_kwargs: dict[str, Any],
        run_dir: str | Path,
        few_anomalies: dict[str, Any] | None = None,
        grid_index: int | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        self.accelerator = accelerator
        self.seed = seed
        self.model_entry = copy.deepcopy(model_entry)
        self.data_config = copy.deepcopy(data_config)
        self.trainer_kwargs = dict(trainer_kwargs)
        self.run_dir = Path(run_dir)
        self.few_anomalies = copy.deepcopy(few_anomalies) if few_anomalies else None
        self.grid_index = grid_index  # the cell's place in the grid: the table's order under any runner
        self.threads = threads  # torch threads of this cell (parallel cells on CPU share the cores)

    # ----------------------------------------------------------------------------------- helpers
    @property
    def model_config(self) -> dict[str, Any]:
        """The entry minus benchmark-only keys: what the model's constructor receives."""
        return {k: v for k, v in self.model_entry.items() if k not in BENCHMARK_KEYS}

    def _engine(self, root: str, devices: Any, callbacks: list | None = None) -> BenchmarkEngine:  # noqa: ANN401
        kwargs = {**self.trainer_kwargs, **(self.model_entry.get("trainer") or {})}
        # A checkpoint callback that saves nothing: without one the Engine adds its own, which
        # writes every fitted model to disk (300 MB for a WideResNet-50 Reverse Distillation)
        # only for the temporary folder to be deleted. Cached auxiliary weights are saved apart.
        no_checkpoints = ModelCheckpoint(dirpath=root, save_top_k=0, save_last=False)
        return BenchmarkEngine(accelerator=self.accelerator, devices=devices, default_root_dir=root,
                               callbacks=[no_checkpoints, *(callbacks or [])], **kwargs)

    def _fresh_model(self) -> Any:  # noqa: ANN401
        seed_everything(self.seed, workers=True)
        config = self.model_config
        if self.model_entry.get("image_size"):
            model_cls = import_class(str(config["class_path"]), MODEL_NAMESPACES)
            size = self.model_entry["image_size"]
            # A plugin model takes the size itself (its CLIP pre-processor, and the size recorded
            # in its checkpoints); other models get their own pre-processor at that size.
            sized = {"image_size": size} if issubclass(model_cls, PluginModuleMixin) else {
                "pre_processor": sized_pre_processor(model_cls, size)}
            config = {**config, "init_args": {**(config.get("init_args") or {}), **sized}}
        model = build_model(config)
        if isinstance(model, PluginModuleMixin):
            _ = model.model  # built now, under the job's seed, so cached weights have a model to fit
        use_raw_scores(model)
        return model

    def _train_auxiliary(self, model: Any, aux_config: dict, target: Any, root: str, devices: Any) -> tuple[Any, float, bool]:  # noqa: ANN401, E501
        """Train on auxiliary data once per (model, aux data, target set, trainer, seed); reuse after.

        ``"$target"`` in ``aux_config`` is the target datamodule (``CrossDataset(test=...)`` needs
        it to validate on the target and to check that no training image is a test image).
        """
        key = _digest(self.model_config, aux_config, target.name, self.trainer_kwargs,
                      self.model_entry.get("trainer"), self.seed)
        cache = self.run_dir / "aux_weights" / f"{self.model_entry['name']}-{key}"
        weights, meta = cache.with_suffix(".pt"), cache.with_suffix(".json")
        weights.parent.mkdir(parents=True, exist_ok=True)
        # Under anomalib's ParallelRunner the cells that share these weights run at once: the first
        # trains, the others wait for its weights instead of training the same thing again.
        with FileLock(str(cache.with_suffix(".lock"))):
            shared = weights.exists() and meta.exists()
            if not shared:
                logger.info("Training %s on auxiliary data %s", self.model_entry["name"], aux_config.get("class_path"))
                aux = build_datamodule(aux_config, target=target)
                start = time.perf_counter()
                self._engine(root, devices).fit_ignoring_learning_type(model, aux)
                seconds = time.perf_counter() - start
                trainable = [n for n, p in model.named_parameters() if p.requires_grad]
                torch.save(trained_state(model), weights.with_suffix(".tmp"))
                weights.with_suffix(".tmp").replace(weights)  # atomic
                meta.write_text(json.dumps({"train_seconds": seconds, "trainable": trainable,
                                            "train_data": aux_config}))
        info = json.loads(meta.read_text())
        # Always test a fresh model with the trained weights, so the first category is evaluated
        # exactly like the ones that reuse the cache (no state left over from the aux set-up).
        model = self._fresh_model()
        state = torch.load(weights, map_location="cpu", weights_only=True)
        skipped = load_trained_state(model, state, info["trainable"])
        if skipped:
            logger.info("%s: recomputing %d set-up buffers for the target: %s", self.model_entry["name"],
                        len(skipped), skipped[:5])
        return model, (0.0 if shared else float(info["train_seconds"])), shared

    # -------------------------------------------------------------------------------------- run
    def run(self, task_id: int | None = None) -> dict[str, Any]:
        """Train as the model's regime requires, test, and return one result row (never raises)."""
        # anomalib's ParallelRunner passes each worker's index: the GPU of that worker. On CPU a worker
        # is one process (Lightning's CPU accelerator takes a count, not an index).
        devices: Any = "auto" if task_id is None else [task_id] if self.accelerator in {"cuda", "gpu"} else 1
        if self.threads:
            torch.set_num_threads(self.threads)
        row: dict[str, Any] = {
            "model": self.model_entry["name"],
            "model_class": self.model_entry.get("class_path"),
            "dataset": self.data_config.get("name") or str(self.data_config.get("class_path", "")).rsplit(".", 1)[-1],
            "category": (self.data_config.get("init_args") or {}).get("category", ""),
            "seed": self.seed,
            "accelerator": self.accelerator,
            "run_dir": str(self.run_dir),
            "grid_index": self.grid_index,
        }
        try:
            row.update(self._run(devices))
            row["status"] = "ok"
        except Exception as error:
            logger.exception("Benchmark cell %s / %s / %s failed", row["model"], row["dataset"], row["category"])
            row["status"] = f"failed: {type(error).__name__}: {error}"
            row["traceback"] = traceback.format_exc()
        return row

    def _few_anomaly_settings(self, regime: str) -> dict[str, Any] | None:
        """The draw of the few-anomaly protocol for this cell (model entry over grid), or None."""
        given = {**(self.few_anomalies or {}), **(self.model_entry.get("few_anomalies") or {})}
        if not given and regime != "supervised":
            return None
        unknown = sorted(set(given) - set(FEW_ANOMALY_KEYS))
        if unknown:
            msg = f"few_anomalies: unknown key(s) {unknown}; known: {list(FEW_ANOMALY_KEYS)}"
            raise ValueError(msg)
        return {"k": 10, "seed": self.seed, **given}

    def _few_anomaly_data(self, datamodule: Any, regime: str, settings: dict[str, Any]) -> Any:  # noqa: ANN401
        """The target wrapped in the few-anomaly protocol: trained on (supervised) or only left out."""
        from anomalib_zsad.data.few_anomalies import FewAnomalies

        dataset = self.data_config.get("name") or datamodule.name
        cell = f"{dataset}-{datamodule.category or 'all'}-{self.model_entry['name']}"
        record = self.run_dir / "few_anomalies" / f"{cell}.json"
        return FewAnomalies(datamodule, in_training=regime == "supervised", record_path=record, **settings)

    def _run(self, devices: Any) -> dict[str, Any]:  # noqa: ANN401
        model = self._fresh_model()
        data_config = {k: v for k, v in self.data_config.items() if k != "name"}
        datamodule = build_datamodule(data_config)
        aux_config = select_train_data(self.model_entry.get("train_data"), self.data_config.get("name", ""),
                                       datamodule.name)
        regime = regime_of(model, aux_config)
        few = self._few_anomaly_settings(regime)
        if few is not None:
            datamodule = self._few_anomaly_data(datamodule, regime, few)
        if (regime == "full-shot" and hasattr(model, "learnt_parts_trained")
                and not getattr(model, "trains_on_target_normals", False)):
            # anomalib_zsad's CLIP methods report ONE_CLASS until trained; fitting them on the
            # target's normal images would be neither their protocol nor zero-shot (M3DM's memory
            # banks are: its protocol is PatchCore's).
            msg = (f"{self.model_entry['name']} learns on auxiliary data: give it 'train_data' (e.g. "
                   "anomalib_zsad.data.CrossDataset) or trained weights (e.g. official_checkpoint)")
            raise ValueError(msg)
        fit_seconds, shared = 0.0, False
        with TemporaryDirectory() as root:
            if regime == "auxiliary":
                model, fit_seconds, shared = self._train_auxiliary(model, aux_config, datamodule, root, devices)
            elif regime in {"full-shot", "supervised"}:
                start = time.perf_counter()
                self._engine(root, devices).fit(model, datamodule=datamodule)
                fit_seconds = time.perf_counter() - start
            timer = InferenceTimer()
            results = self._engine(root, devices, [timer]).test(model, datamodule=datamodule, verbose=False)
        metrics = results[0] if results else {}
        drawn = getattr(datamodule, "drawn", None)
        return {
            "regime": regime,
            "anomalies_held_out": 0 if drawn is None else len(drawn),
            "train_data": (aux_config or {}).get("class_path", ""),
            "category": datamodule.category or datamodule.name,  # Folder, Kolektor: one category
            **{column: float(metrics.get(column, float("nan"))) for column in PAPER_METRICS},
            "fit_time_s": fit_seconds,
            "fit_shared": shared,
            "setup_time_s": timer.setup_seconds,
            "train_time_s": fit_seconds + timer.setup_seconds,
            "infer_ms_per_image": timer.ms_per_image,
            "n_timed_images": timer.images,
        }

    # ------------------------------------------------------------------------ collect and save
    @staticmethod
    def collect(results: list[dict[str, Any]]) -> pd.DataFrame:
        """One row per cell, in grid order (anomalib's ParallelRunner gathers them as they finish)."""
        frame = pd.DataFrame(results)
        if "grid_index" in frame and frame["grid_index"].notna().all():
            frame = frame.sort_values("grid_index", kind="stable").reset_index(drop=True)
        return frame

    @staticmethod
    def save(results: pd.DataFrame) -> None:
        """Write ``raw_results.csv``, ``results.csv``/``.md`` and ``results.png`` to the run folder.

        Raises :class:`BenchmarkFailedError` afterwards if any cell failed, so the command exits
        non-zero while the partial table is still on disk.
        """
        if results.empty:
            msg = "the benchmark grid produced no jobs (check the model/data sections of the config)"
            raise BenchmarkFailedError(msg)
        run_dir = Path(results["run_dir"].iloc[0])
        paths = write_report(results, run_dir)
        print(f"Benchmark results: {', '.join(str(p) for p in paths)}")
        failed = results[results["status"] != "ok"]
        if len(failed):
            lines = [f"{r.model} / {r.dataset} / {r.category}: {r.status}" for r in failed.itertuples()]
            msg = f"{len(failed)} of {len(results)} benchmark cells failed:\n" + "\n".join(lines)
            raise BenchmarkFailedError(msg)
