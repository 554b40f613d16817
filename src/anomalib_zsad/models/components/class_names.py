"""Each image's class name, read from its path, for the methods whose prompts name the object.

The official AdaCLIP, AA-CLIP and Bayes-PFL code put each image's class name into their prompts
(``"a bad photo of a damaged candle."``), also when training on all categories of an auxiliary
data set. anomalib batches carry no category, but their ``image_path`` does: MVTec AD layout
``<root>/<category>/{train,test}/...`` and VisA layout ``<root>/<category>/Data/Images/...``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

SPLIT_FOLDERS = ("train", "test", "Data", "ground_truth", "validation")


def class_name_from_path(path: str, default: str = "object") -> str:
    """The folder above the split folder closest to the file (``bottle`` of
    ``.../bottle/test/broken_large/000.png``), else ``default``."""
    parts = PurePath(path).parts
    for index in range(len(parts) - 2, 0, -1):
        if parts[index] in SPLIT_FOLDERS:
            return parts[index - 1]
    return default


def class_names_for(paths: Sequence[str] | None, setting: str, default: str = "object") -> list[str] | None:
    """Per-image class names for ``class_name`` = ``"auto"`` (from the paths), or None (use the
    model's fixed class name)."""
    if setting != "auto" or not paths:
        return None
    return [class_name_from_path(str(p), default) for p in paths]


def evaluated_category(module: Any) -> str | None:  # noqa: ANN401
    """The single category of the datamodule being evaluated (``metal_nut`` -> ``metal nut``), or None
    (no datamodule, no category, or pooled categories ``a+b``). For inference only: in training
    the datamodule's category is the *target's* (``CrossDataset``), not the auxiliary images'."""
    trainer = getattr(module, "_trainer", None)
    category = getattr(getattr(trainer, "datamodule", None), "category", None)
    if isinstance(category, str) and category and "+" not in category:
        return category.replace("_", " ")
    return None
