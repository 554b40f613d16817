"""``anomalib benchmark`` for zero-shot, few-shot, auxiliary-trained and full-shot models.

:class:`ZSADBenchmark` is a subclass of anomalib's :class:`~anomalib.pipelines.Benchmark` that
only swaps the job generator (and so the job) and makes failures visible:

* anomalib's ``Pipeline.run`` catches every exception of a runner and prints a hint, so a grid in
  which every cell crashed still exits 0. Here the tables are written first, then the command
  fails (non-zero exit) naming the failed cells.
* the pipeline log goes to ``<output_dir>/pipeline.log`` instead of ``./runs/pipeline.log``.

The CLI finds pipelines in ``anomalib.cli.pipelines.PIPELINE_REGISTRY`` (a plain dict that
``anomalib.cli.cli`` imports by reference); :func:`install_pipeline` puts this class there under
``"benchmark"``. See ``docs/benchmark.md`` for how the plugin calls it at start-up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from anomalib.pipelines import Benchmark
from anomalib.pipelines.components.base import Runner
from anomalib.pipelines.components.runners import ParallelRunner, SerialRunner
from anomalib.utils.logging import redirect_logs

from .generator import DEFAULT_OUTPUT_DIR, ZSADBenchmarkJobGenerator
from .job import BenchmarkFailedError, ZSADBenchmarkJob

if TYPE_CHECKING:
    from jsonargparse import Namespace


class ZSADBenchmark(Benchmark):
    """Benchmark grid of zero-/few-shot, auxiliary-trained and full-shot anomaly models.

    Run ``anomalib benchmark --config configs/benchmark/demo_grid.yaml``. Runners as anomalib's:
    serial on CPU or one GPU, anomalib's ``ParallelRunner`` (one cell per GPU at a time) on several
    GPUs; ``n_jobs: N`` beside ``accelerator: cpu`` runs CPU cells in N processes too. Any runner
    gives the same table (docs/distributed.md).
    """

    @staticmethod
    def _setup_runners(args: dict) -> list[Runner]:
        accelerators = args.get("accelerator", "cpu")
        accelerators = accelerators if isinstance(accelerators, list) else [accelerators]
        cpu_jobs = args.get("n_jobs", 1)
        if isinstance(cpu_jobs, bool) or not isinstance(cpu_jobs, int) or cpu_jobs < 1:
            msg = f"n_jobs must be a positive number of parallel CPU cells, got {args.get('n_jobs')!r}"
            raise ValueError(msg)
        runners: list[Runner] = []
        for accelerator in accelerators:
            if accelerator not in {"cpu", "cuda", "gpu"}:
                msg = f"Unsupported accelerator: {accelerator} (use cpu or cuda)"
                raise ValueError(msg)
            device_count = torch.cuda.device_count()
            if accelerator == "cpu" and cpu_jobs > 1:  # cells in n_jobs processes sharing the cores
                threads = max(1, (os.cpu_count() or 1) // cpu_jobs)
                runners.append(ParallelRunner(ZSADBenchmarkJobGenerator(accelerator, threads), n_jobs=cpu_jobs))
            elif device_count <= 1 or accelerator == "cpu":
                runners.append(SerialRunner(ZSADBenchmarkJobGenerator(accelerator)))
            else:  # anomalib's rule: one cell per GPU at a time
                runners.append(ParallelRunner(ZSADBenchmarkJobGenerator(accelerator), n_jobs=device_count))
        return runners

    def run(self, args: Namespace | None = None) -> None:
        """Run every runner; raise :class:`BenchmarkFailedError` at the end if any cell failed."""
        pipeline_args = self._get_args(args)
        runners = self._setup_runners(pipeline_args)
        section = pipeline_args.get(ZSADBenchmarkJob.name) or {}
        redirect_logs(str(Path(section.get("output_dir", DEFAULT_OUTPUT_DIR)) / "pipeline.log"))
        errors: list[str] = []
        previous = None
        for runner in runners:
            try:
                previous = runner.run(section, previous)
            except Exception as error:  # noqa: BLE001 - finish the other runners, then fail
                errors.append(f"{runner.generator.accelerator}: {error}")  # type: ignore[attr-defined]
        if errors:
            raise BenchmarkFailedError("\n".join(errors))
