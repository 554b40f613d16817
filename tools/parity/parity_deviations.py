"""Run parity tests and report the largest deviation each comparison in them measured.

    ZSAD_PARITY_DIR=/tmp/parity_seeds/seed1 python tools/parity/parity_deviations.py \
        tests/models/aa_clip/test_parity.py [--json out.json] [pytest args ...]

The tests' difference helpers (module-level ``max_diff``, ``rel_diff``, ``rel``, ``absdiff``) are
wrapped; every call is recorded under (test, source line[, the caller's ``name``/``key`` when that
line uses it]) and the maximum per key is printed after the run, so the numbers the assertions
compare against their tolerances can be quoted (e.g. in a model README).
"""

from __future__ import annotations

import json
import linecache
import re
import sys
from pathlib import Path

import pytest

HELPERS = ("max_diff", "rel_diff", "rel", "absdiff")


class Recorder:
    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def wrap(self, function):
        def recorded(*args, **kwargs):
            value = function(*args, **kwargs)
            frame = sys._getframe(1)
            caller = frame
            test = None
            while frame is not None:
                if frame.f_code.co_name.startswith("test_"):
                    test = frame.f_code.co_name
                    break
                frame = frame.f_back
            line = linecache.getline(caller.f_code.co_filename, caller.f_lineno).strip()
            label = next((caller.f_locals.get(var) for var in ("name", "key")
                          if re.search(rf"\b{var}\b", line)), None)
            key = f"{test or caller.f_code.co_name} | {line}" + (f" | {label}" if isinstance(label, str) else "")
            self.values[key] = max(self.values.get(key, 0.0), float(value))
            return value
        return recorded

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session) -> None:
        seen = set()
        for item in session.items:
            module = getattr(item, "module", None)
            if module is None or id(module) in seen:
                continue
            seen.add(id(module))
            for helper in HELPERS:
                if callable(getattr(module, helper, None)):
                    setattr(module, helper, self.wrap(getattr(module, helper)))


def main() -> int:
    args = sys.argv[1:]
    out = None
    if "--json" in args:
        at = args.index("--json")
        out = Path(args[at + 1])
        del args[at:at + 2]
    recorder = Recorder()
    status = pytest.main(["-q", "-p", "no:cacheprovider", *args], plugins=[recorder])
    width = max((len(k) for k in recorder.values), default=0)
    for key, value in recorder.values.items():
        print(f"{key:<{width}}  {value:.3g}")
    if out is not None:
        out.write_text(json.dumps(recorder.values, indent=1))
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
