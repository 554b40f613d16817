"""Import of the official AA-CLIP checkpoints (github.com/Mwxinnn/AA-CLIP).

``train.py`` saves two files per run: ``text_adapter.pth`` =
``{"epoch", "text_adapter": state_dict, "text_optimizer": ...}`` and ``image_adapter_<epoch>.pth``
(``image_adapter.pth`` in some releases) = ``{"epoch", "image_adapter": state_dict, ...}``.
Their parameter names are this model's (``text_adapter.*``, ``image_adapter.*``), so importing is
a check of keys and shapes and a copy. Files are read with ``torch.load(weights_only=True)``: a
checkpoint cannot run code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from anomalib_zsad.models.components.checkpoints import load_official_file

from .torch_model import AACLIPModel

_PARTS = {"text_adapter": "text_adapter.pth", "image_adapter": "image_adapter_<epoch>.pth"}


def _expand(path: Path) -> list[Path]:
    """A directory stands for its ``text_adapter.pth`` and its latest ``image_adapter*.pth``."""
    if not path.is_dir():
        return [path]
    files = []
    if (path / "text_adapter.pth").is_file():
        files.append(path / "text_adapter.pth")
    images = sorted(path.glob("image_adapter*.pth"),
                    key=lambda p: int(m.group(1)) if (m := re.search(r"_(\d+)\.pth$", p.name)) else -1)
    if images:
        files.append(images[-1])
    if not files:
        msg = f"{path} holds no official AA-CLIP checkpoint (expected text_adapter.pth and image_adapter_<epoch>.pth)"
        raise ValueError(msg)
    return files


def _read(path: Path) -> dict:
    expected = "a file saved by the official train.py (text_adapter.pth or image_adapter_<epoch>.pth)"
    content = load_official_file(path, "AA-CLIP", expected)
    if not isinstance(content, dict) or not any(part in content for part in _PARTS):
        keys = list(content)[:6] if isinstance(content, dict) else type(content).__name__
        msg = (f"{path} is not an official AA-CLIP checkpoint: expected a dict with a 'text_adapter' or "
               f"'image_adapter' state dict (as train.py saves), got {keys}")
        raise ValueError(msg)
    return content


def _check(path: Path, part: str, state: object, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    expected = module.state_dict()
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        msg = f"{path}: '{part}' is not a state dict of tensors"
        raise ValueError(msg)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        msg = (f"{path}: '{part}' does not fit this AA-CLIP model (CLIP widths, adapter counts, levels, "
               f"relu must match the run that saved it): missing {missing[:4]}, unexpected {unexpected[:4]}, "
               f"wrong shapes {wrong[:4]}; expected keys {list(expected)[:4]}...")
        raise ValueError(msg)
    return {k: v.to(expected[k].dtype) for k, v in state.items()}


def read_official_checkpoint(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[Path, dict]:
    """The content of each official file (a folder stands for its files), format checked."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files = [f for p in paths for f in _expand(Path(p).expanduser())]
    if not files:
        msg = "an AA-CLIP official checkpoint needs at least one file or folder"
        raise ValueError(msg)
    return {path: _read(path) for path in files}


def load_official_checkpoint(model: AACLIPModel, *paths: str | os.PathLike) -> dict[str, int | None]:
    """Load official ``text_adapter.pth`` / ``image_adapter_<epoch>.pth`` files (or a folder
    holding them) into ``model``. Every file is checked before anything is copied.

    Returns the epoch each part was saved at, e.g. ``{"text_adapter": 5, "image_adapter": 20}``.
    Raises ``ValueError`` naming the file on a wrong, corrupt or mismatched checkpoint.
    """
    flat = [q for p in paths for q in ([p] if isinstance(p, (str, os.PathLike)) else p)]
    loaded: dict[str, tuple[dict, int | None]] = {}
    for path, content in read_official_checkpoint(flat).items():
        for part in _PARTS:
            if part in content:
                state = _check(path, part, content[part], getattr(model, part))
                epoch = content.get("epoch")
                loaded[part] = (state, int(epoch) if isinstance(epoch, int) else None)
    for part, (state, _) in loaded.items():
        getattr(model, part).load_state_dict(state)
    model.set_class_name(model.class_name)  # unfreezes; the copy above already changed the cache key
    return {part: epoch for part, (_, epoch) in loaded.items()}
