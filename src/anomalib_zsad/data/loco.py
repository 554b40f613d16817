"""``MVTecLOCOFixed``: anomalib's MVTec LOCO datamodule with an indexing that works under pandas 3.

anomalib 2.7 indexes MVTec LOCO by writing each anomalous image's *list* of masks into a column of
empty strings; pandas 3 gives that column its string dtype and refuses the lists
(``TypeError: Invalid value for dtype 'str'``), so ``MVTecLOCO(...).setup()`` fails before any image
is read. This datamodule indexes the same files itself (same columns, same splits, the masks of an
image as a list, as anomalib's dataset expects them) and is otherwise anomalib's: reading, the union
of an image's masks, the validation folder. :class:`~anomalib_zsad.data.CrossDataset` uses the same
indexing for anomalib's own ``MVTecLOCO`` too, so either works as a source or a target there; as the
target of ``anomalib test`` or of the benchmark, use this one.

Layout (as published)::

    <root>/<category>/train/good/NNN.png
    <root>/<category>/validation/good/NNN.png
    <root>/<category>/test/{good,logical_anomalies,structural_anomalies}/NNN.png
    <root>/<category>/ground_truth/<defect>/NNN/000.png, 001.png, ...    (one mask per defect)
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from anomalib.data import MVTecLOCO
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.datasets.image.mvtec_loco import MVTecLOCODataset
from anomalib.data.utils import Split
from torchvision.transforms.v2 import Transform

from anomalib_zsad.data.errors import DatasetError
from anomalib_zsad.data.validation import list_images

__all__ = ["MVTecLOCOFixed", "make_loco_samples"]

_SPLIT_FOLDERS = {"train": "train", "val": "validation", "test": "test"}


def make_loco_samples(category_root: str | Path, split: str | Split | None = None) -> pd.DataFrame:
    """One MVTec LOCO category: ``path, split, label, image_path, mask_path, label_index``.

    ``mask_path`` is the list of an anomalous image's masks (``ground_truth/<defect>/<stem>/*.png``), ``""``
    for a normal one.
    """
    root = Path(category_root)
    if not (root / "test").is_dir():
        msg = f"'{root}' has no 'test' folder (MVTec LOCO layout: <category>/test/<good|defect>/NNN.png)."
        raise DatasetError(msg)
    wanted = None if split is None else (split.value if isinstance(split, Split) else str(split))
    rows = []
    for split_name, folder_name in _SPLIT_FOLDERS.items():
        if wanted is not None and split_name != wanted:
            continue
        folder = root / folder_name
        for label in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
            anomalous = label.name != "good"
            for image in list_images(label):
                masks = [str(m) for m in list_images(root / "ground_truth" / label.name / image.stem)]
                if anomalous and not masks:
                    msg = (f"Anomalous image '{image}' has no mask folder "
                           f"'{root / 'ground_truth' / label.name / image.stem}/' with its masks.")
                    raise DatasetError(msg)
                rows.append((str(root), split_name, label.name, str(image), masks if anomalous else "",
                             int(anomalous)))
    samples = pd.DataFrame({
        "path": [r[0] for r in rows], "split": [r[1] for r in rows], "label": [r[2] for r in rows],
        "image_path": [r[3] for r in rows], "mask_path": pd.Series([r[4] for r in rows], dtype=object),
        "label_index": [r[5] for r in rows]})
    samples.attrs["task"] = "segmentation"
    return samples


class _LOCODataset(MVTecLOCODataset):
    """anomalib's MVTec LOCO dataset (reading, mask union) over :func:`make_loco_samples`."""

    def __init__(self, root: str | Path, category: str, augmentations: Transform | None = None,
                 split: str | Split | None = None) -> None:
        AnomalibDataset.__init__(self, augmentations=augmentations)
        self.root_category = Path(root) / category
        self.category = category
        self.split = split
        self.samples = make_loco_samples(self.root_category, split=split)


class MVTecLOCOFixed(MVTecLOCO):
    """:class:`anomalib.data.MVTecLOCO` whose indexing works under pandas 3 (arguments: anomalib's)."""

    def _setup(self, _stage: str | None = None) -> None:
        kwargs = {"root": self.root, "category": self.category}
        self.train_data = _LOCODataset(split=Split.TRAIN, **kwargs)
        self.val_data = _LOCODataset(split=Split.VAL, **kwargs)
        self.test_data = _LOCODataset(split=Split.TEST, **kwargs)
