"""Reading the official methods' released weight files: one safe loader, one style of error.

Each method's ``checkpoint.py`` checks the content (keys, shapes) of its own format; opening the
file is the same for all: ``torch.load(weights_only=True)`` on the CPU, so an untrusted file cannot
run code, and an error that names the file and the format expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def load_official_file(path: str | os.PathLike, method: str, expected: str) -> Any:  # noqa: ANN401
    """The content of ``path``; ``FileNotFoundError`` or a ``ValueError`` that says what was expected.

    Args:
        path: the file.
        method: the method's name for messages (``"AnomalyCLIP"``).
        expected: what the official file holds (``"{'prompt_learner': state_dict}, as train.py saves"``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"{method} checkpoint not found: {path}"
        raise FileNotFoundError(msg)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        msg = (f"could not read {method} checkpoint {path} ({type(error).__name__}: {str(error)[:300]}). "
               f"Expected {expected}; is the download complete?")
        raise ValueError(msg) from error
