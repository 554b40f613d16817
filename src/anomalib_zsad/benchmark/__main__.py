"""``python -m anomalib_zsad.benchmark --config FILE``: the benchmark without the CLI hook.

Useful when the plugin's start-up registration is not active (e.g. running from a source tree
with ``PYTHONPATH=src``); it runs exactly what ``anomalib benchmark --config FILE`` runs.
"""

from __future__ import annotations

import sys

from jsonargparse import ArgumentParser


def main(argv: list[str] | None = None) -> None:
    """Parse ``--config`` and run :class:`~anomalib_zsad.benchmark.pipeline.ZSADBenchmark`."""
    from .pipeline import ZSADBenchmark

    parser: ArgumentParser = ZSADBenchmark.get_parser()
    ZSADBenchmark().run(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
