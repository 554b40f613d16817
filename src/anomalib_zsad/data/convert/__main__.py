"""``python -m anomalib_zsad.data.convert <name> <downloaded folder> <out> [options]`` (``--list``: the converters)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from anomalib_zsad.data.convert import CONVERTERS, MANIFEST, convert
from anomalib_zsad.data.errors import DatasetError


def _value(text: str) -> object:
    lowered = text.lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _listing() -> str:
    lines = []
    for c in CONVERTERS.values():
        kind = "masks" if c.masks == "yes" else "image labels only"
        normals = "" if c.normals else ", anomalous images only"
        options = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in c.options.items())
        lines += [f"{c.name:9s} {c.title} ({kind}{normals}): {c.summary}",
                  f"{'':9s} reads {c.layout}", f"{'':9s} options: {options}" if options else ""]
    return "\n".join(line for line in lines if line)


def main(argv: Sequence[str] | None = None) -> Path | None:
    """Command-line entry point; exits with status 2 and one line on a data error."""
    parser = argparse.ArgumentParser(
        prog="python -m anomalib_zsad.data.convert",
        description="Convert a downloaded data set into the MVTec AD layout (read by anomalib_zsad.data.MVTecLayout).",
        epilog="Converter options: --name value, e.g. `sdd ... --pieces 3`, `ksdd2 ... --balanced true`.")
    parser.add_argument("name", nargs="?", choices=sorted(CONVERTERS), metavar="name", help="converter (see --list)")
    parser.add_argument("source", nargs="?", help="folder the download was unpacked into")
    parser.add_argument("out", nargs="?", help="new output folder")
    parser.add_argument("--list", action="store_true", help="list the converters, the layouts they read, their options")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier conversion at <out>")
    args, extra = parser.parse_known_args(argv)
    if args.list:
        print(_listing())
        return None
    if not (args.name and args.source and args.out):
        parser.error("give a converter name, the downloaded folder and the output folder (or --list)")
    options: dict[str, object] = {}
    while extra:
        flag = extra.pop(0)
        if not flag.startswith("--") or not extra:
            parser.error(f"unexpected argument {flag!r}; converter options are --name value")
        options[flag[2:].replace("-", "_")] = _value(extra.pop(0))
    try:
        out = convert(args.name, args.source, args.out, overwrite=args.overwrite, **options)
    except DatasetError as error:
        parser.exit(2, f"error: {error}\n")
    manifest = json.loads((out / MANIFEST).read_text())
    for category, counts in manifest["categories"].items():
        print(f"{out / category}: {counts['test_normal']} normal + {counts['test_anomalous']} anomalous test images, "
              f"{counts['masks']} masks, {counts['train_normal']} normal training images")
    sys.stdout.flush()
    return out


if __name__ == "__main__":
    main()
