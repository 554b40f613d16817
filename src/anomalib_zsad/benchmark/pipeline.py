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

    Run ``anomalib benchmark --config configs/benchmark/demo_grid.yaml``.
    """

    @staticmethod
    def _setup_runners(args: dict) -> list[Runner]:
        accelerators = args.get("accelerator", "cpu")
        accelerators = accelerators if isinstance(accelerators, list) else [accelerators]
        runners: list[Runner] = []
        for accelerator in accelerators:
            if accelerator not in {"cpu", "cuda", "gpu"}:
                msg = f"Unsupported accelerator: {accelerator} (use cpu or cuda)"
                raise ValueError(msg)
            device_count = torch.cuda.device_count()
            generator = ZSADBenchmarkJobGenerator(accelerator)
            if device_count <= 1 or accelerator == "cpu":
                runners.append(SerialRunner(generator))
            else:
                runners.append(ParallelRunner(generator, n_jobs=device_count))
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
