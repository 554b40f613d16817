"""Compare two parity sets of one method leaf by leaf (e.g. a remade set against the shared one).

    python tools/parity/compare_sets.py ../shared/parity/aa_clip /tmp/parity_seeds/seed100/aa_clip

Prints every tensor leaf that is not bitwise equal with its max abs difference (and the max |value|
of the reference), and every non-tensor leaf that differs; ``meta``/``run_info`` entries are skipped
unless ``--meta``. Exit status 1 when a leaf differs by more than ``--atol``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


def leaves(value, prefix: str = ""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in value):
        for index, item in enumerate(value):
            yield from leaves(item, f"{prefix}[{index}]")
    else:
        yield prefix, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=Path)
    parser.add_argument("other", type=Path)
    parser.add_argument("--atol", type=float, default=0.0)
    parser.add_argument("--meta", action="store_true", help="compare meta entries too")
    args = parser.parse_args()
    worst, failed, count = 0.0, False, 0
    for path in sorted(args.reference.iterdir()):
        if path.suffix not in (".pt", ".pth"):
            continue
        other = args.other / path.name
        if not other.exists():
            print(f"{path.name}: missing in {args.other}")
            failed = True
            continue
        ref = dict(leaves(torch.load(path, weights_only=False, map_location="cpu")))
        new = dict(leaves(torch.load(other, weights_only=False, map_location="cpu")))
        for key in sorted(set(ref) | set(new)):
            if not args.meta and (key.startswith("meta") or ".meta" in key):
                continue
            name = f"{path.name}:{key}"
            if key not in ref or key not in new:
                print(f"{name}: only in {'reference' if key in ref else 'other'}")
                failed = True
                continue
            a, b = ref[key], new[key]
            count += 1
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                if a.shape != b.shape or a.dtype != b.dtype:
                    print(f"{name}: shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
                    failed = True
                    continue
                if torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                         and torch.equal(a.nan_to_num(), b.nan_to_num())):
                    continue
                diff = (a.double() - b.double()).abs().nan_to_num(nan=float("inf")).max().item()
                scale = a.double().abs().nan_to_num().max().item()
                worst = max(worst, diff)
                failed |= diff > args.atol
                print(f"{name}: max|diff| {diff:.3g} (max|ref| {scale:.3g})")
            elif isinstance(a, float) and isinstance(b, float) and (a == b or (np.isnan(a) and np.isnan(b))):
                continue
            elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True):
                    print(f"{name}: arrays differ")
                    failed = True
            elif a != b:
                print(f"{name}: {a!r} vs {b!r}"[:300])
                failed |= not (isinstance(a, (int, float)) and abs(a - b) <= args.atol)
    print(f"{count} leaves compared; worst tensor difference {worst:.3g}")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
