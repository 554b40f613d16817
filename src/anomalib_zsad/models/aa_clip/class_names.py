"""Each image's class name, read from its path: AA-CLIP's anchors are per class.

anomalib batches carry no category, but ``image_path`` does: MVTec AD layout
``<root>/<category>/{train,test}/...``, VisA ``<root>/<category>/Data/Images/...``.
(AdaCLIP has the same helper; the lead may move one copy into ``models/components``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath

SPLIT_FOLDERS = ("train", "test", "Data", "ground_truth", "validation")


def class_name_from_path(path: str, default: str = "object") -> str:
    """The folder above the split folder closest to the file, else ``default``."""
    parts = PurePath(path).parts
    for index in range(len(parts) - 2, 0, -1):
        if parts[index] in SPLIT_FOLDERS:
            return parts[index - 1]
    return default


def class_names_for(paths: Sequence[str] | None, setting: str, default: str = "object") -> list[str] | None:
    """Per-image names for ``setting == "auto"`` (None without paths), else None (fixed name)."""
    if setting != "auto" or not paths:
        return None
    return [class_name_from_path(str(p), default) for p in paths]
