"""Expand the ``benchmark:`` section of a config into :class:`ZSADBenchmarkJob` cells.

Accepted on top of anomalib's own benchmark format (``seed``, ``model``/``data`` with ``grid``
lists, so existing anomalib configs keep working):

* ``datasets:`` - a list of data sets, each ``{class_path, init_args, categories: [...], name?}``.
  anomalib's ``data: {init_args: {category: {grid: [...]}}}`` can only vary the category of *one*
  data set; MVTec AD and VisA have different category lists, hence this key.
* ``trainer:`` - Engine/Lightning arguments for every cell (``max_epochs``, ``enable_progress_bar``
  ...); anomalib's job passes none, so e.g. Reverse Distillation would train for Lightning's
  default 1000 epochs. A model entry may carry its own ``trainer:`` on top.
* ``output_dir:`` - where the timestamped run folder goes (default ``runs/zsad_benchmark``).
* in a model entry: ``name`` (the table's row label), ``train_data`` (auxiliary training data,
  see :mod:`anomalib_zsad.benchmark.job`).
* ``few_anomalies:`` - ``{k, seed, ...}``: the few-anomaly (supervised) protocol for every cell
  (a model entry may carry its own): BGAD trains on k anomalous test images, every model is
  evaluated without them (see :mod:`anomalib_zsad.benchmark.job`).
"""

from __future__ import annotations

import copy
from collections.abc import Generator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from anomalib.pipelines.components import JobGenerator
from anomalib.pipelines.components.utils import get_iterator_from_grid_dict
from anomalib.pipelines.types import PREV_STAGE_RESULT

from .job import ZSADBenchmarkJob

DEFAULT_OUTPUT_DIR = "runs/zsad_benchmark"


def _default_name(entry: dict[str, Any]) -> str:
    name = str(entry.get("class_path", "model")).rsplit(".", 1)[-1]
    k_shot = (entry.get("init_args") or {}).get("k_shot")
    return f"{name}-{k_shot}shot" if k_shot else name


def name_models(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every model entry a unique ``name`` (explicit names win; clashes get ``#2``, ``#3``)."""
    named, seen = [], {}
    for entry in models:
        entry = {"class_path": entry} if isinstance(entry, str) else copy.deepcopy(dict(entry))
        base = str(entry.get("name") or _default_name(entry))
        seen[base] = seen.get(base, 0) + 1
        entry["name"] = base if seen[base] == 1 else f"{base}#{seen[base]}"
        named.append(entry)
    return named


def _takes_category(class_path: str) -> bool:
    """Whether the datamodule's constructor has a ``category`` (``Folder`` and ``Kolektor`` are one category)."""
    import inspect

    from .resolve import DATA_NAMESPACES, import_class

    try:
        return "category" in inspect.signature(import_class(class_path, DATA_NAMESPACES)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return True  # unknown here: let the datamodule's own error speak when it is built


def expand_datasets(datasets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{class_path, init_args, categories, name?}]`` -> one data config per category.

    A datamodule without a ``category`` argument (``Folder``, ``Kolektor``) is one cell and takes no
    ``categories``."""
    configs = []
    for dataset in datasets:
        categories = dataset.get("categories")
        single = not _takes_category(str(dataset.get("class_path", "")))
        if not categories and not single:
            msg = f"data set {dataset.get('class_path')!r} in 'datasets' needs a non-empty 'categories' list"
            raise ValueError(msg)
        for category in [None] if single else categories:
            extra = {} if category is None else {"category": category}
            config = {"class_path": dataset["class_path"],
                      "init_args": {**copy.deepcopy(dataset.get("init_args") or {}), **extra}}
            if dataset.get("name"):
                config["name"] = dataset["name"]
            configs.append(config)
    return configs


def normalise_args(args: dict[str, Any]) -> dict[str, Any]:
    """Name the models and turn ``datasets`` into a ``data`` grid; other keys pass through."""
    args = copy.deepcopy(dict(args))
    model = args.get("model")
    if isinstance(model, dict) and "grid" in model:
        model["grid"] = name_models(list(model["grid"]))
    elif model is not None:
        args["model"] = name_models([model])[0]
    else:
        msg = "the benchmark config needs a 'model' entry (or 'model: {grid: [...]}')"
        raise ValueError(msg)
    datasets = args.pop("datasets", None)
    if datasets:
        if "data" in args:
            msg = "use either 'data' (anomalib's format) or 'datasets', not both"
            raise ValueError(msg)
        args["data"] = {"grid": expand_datasets(list(datasets))}
    if "data" not in args:
        msg = "the benchmark config needs 'datasets' or 'data'"
        raise ValueError(msg)
    args.setdefault("seed", 42)
    return args


class ZSADBenchmarkJobGenerator(JobGenerator):
    """Yields one :class:`ZSADBenchmarkJob` per (model, data set, category, other grid values)."""

    def __init__(self, accelerator: str, threads_per_job: int | None = None) -> None:
        self.accelerator = accelerator
        self.threads_per_job = threads_per_job

    @property
    def job_class(self) -> type:
        """:class:`ZSADBenchmarkJob`."""
        return ZSADBenchmarkJob

    def generate_jobs(
        self,
        args: dict | None = None,
        prev_stage_result: PREV_STAGE_RESULT = None,
    ) -> Generator[ZSADBenchmarkJob, None, None]:
        """Cells in config order (anomalib's grid product: models outermost, categories innermost),
        numbered so that a parallel runner's table keeps that order."""
        del prev_stage_result
        args = dict(args or {})
        output_dir = Path(args.pop("output_dir", DEFAULT_OUTPUT_DIR))
        stamp = datetime.now(tz=timezone.utc).strftime("%Y-%m-%d-%H_%M_%S")
        run_dir = output_dir / f"{stamp}-{self.accelerator}"
        for index, container in enumerate(get_iterator_from_grid_dict(normalise_args(args))):
            yield ZSADBenchmarkJob(
                accelerator=self.accelerator,
                seed=int(container["seed"]),
                model_entry=container["model"],
                data_config=container["data"],
                trainer_kwargs=container.get("trainer") or {},
                run_dir=run_dir,
                few_anomalies=container.get("few_anomalies"),
                grid_index=index,
                threads=self.threads_per_job,
            )
