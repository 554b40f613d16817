"""Reading the official methods' released weight files: one safe loader, one style of error.

Each method's ``checkpoint.py`` checks the content (keys, shapes) of its own format and exposes the
same two functions: ``read_official_checkpoint(path)`` (the file's learnt tensors, checked, read
once when the model is constructed so that a wrong file fails before any work) and
``load_official_checkpoint(torch_model, path)`` (copy them in). Opening the file is the same for
all: ``torch.load(weights_only=True)`` on the CPU, so an untrusted file cannot run code; tensors
holding NaN or Inf are refused (they would make every score NaN, silently); errors name the file
and the format expected.
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
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        msg = (f"could not read {method} checkpoint {path} ({type(error).__name__}: {str(error)[:300]}). "
               f"Expected {expected}; is the download complete?")
        raise ValueError(msg) from error
    bad = non_finite_tensors(content)
    if bad:
        msg = (f"{method} checkpoint {path} holds NaN or Inf values in {', '.join(bad[:5])}"
               f"{' and more' if len(bad) > 5 else ''}: the file is damaged or was saved after training diverged")
        raise ValueError(msg)
    return content


def non_finite_tensors(content: Any, prefix: str = "") -> list[str]:  # noqa: ANN401
    """Names of the floating-point tensors in a (nested) checkpoint that hold NaN or Inf."""
    if isinstance(content, torch.Tensor):
        finite = not content.is_floating_point() or bool(torch.isfinite(content).all())
        return [] if finite else [prefix or "<tensor>"]
    if isinstance(content, dict):
        items = content.items()
    elif isinstance(content, (list, tuple)):
        items = enumerate(content)
    else:
        return []
    return [name for key, value in items
            for name in non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))]
