"""Benchmark grid for anomalib-zsad: ``anomalib benchmark`` that handles zero-shot models.

``install_pipeline()`` swaps the plugin's :class:`ZSADBenchmark` into anomalib's CLI pipeline
registry; ``python -m anomalib_zsad.benchmark --config FILE`` runs the same pipeline without it.
:class:`WinClipFixed` is anomalib's WinCLIP with the fixes a benchmark needs (see its module).

Heavy imports (torch, anomalib) happen on first attribute access, so that a start-up hook can
import this package cheaply.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BenchmarkFailedError",
    "WinClipFixed",
    "WinClipFixedModel",
    "ZSADBenchmark",
    "ZSADBenchmarkJob",
    "ZSADBenchmarkJobGenerator",
    "install_pipeline",
]

_LAZY = {
    "BenchmarkFailedError": ".job",
    "ZSADBenchmarkJob": ".job",
    "ZSADBenchmarkJobGenerator": ".generator",
    "ZSADBenchmark": ".pipeline",
    "WinClipFixed": ".winclip_fixed",
    "WinClipFixedModel": ".winclip_fixed",
}


def install_pipeline(registry: dict | None = None, name: str = "benchmark") -> None:
    """Register :class:`ZSADBenchmark` as ``anomalib <name>`` (default: replaces ``benchmark``).

    ``registry`` defaults to ``anomalib.cli.pipelines.PIPELINE_REGISTRY``; the CLI imported that
    dict by reference, so mutating it is enough as long as it happens before the CLI parser is
    built (i.e. at interpreter start-up or right after ``anomalib.cli.pipelines`` is imported).
    It is a no-op when anomalib was installed without its pipelines (registry is ``None``).
    """
    if registry is None:
        from anomalib.cli import pipelines

        registry = pipelines.PIPELINE_REGISTRY
    if registry is None:
        return
    from .pipeline import ZSADBenchmark

    registry[name] = ZSADBenchmark


def __getattr__(name: str) -> Any:  # noqa: ANN401
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
