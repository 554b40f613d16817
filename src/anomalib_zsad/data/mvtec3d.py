"""``MVTec3DFixed``: anomalib's MVTec 3D-AD datamodule with an indexing that works under pandas 3.

anomalib 2.7 fills the ``mask_path`` column of MVTec 3D-AD for the test split only; the training
rows keep a missing value, which pandas < 3 turned into the string ``"nan"`` and pandas 3 keeps as
a float NaN. anomalib's depth dataset then passes that NaN to its path validator
(``TypeError: Path must be None, a string, or Path object, got <class 'float'>``) at the first
training sample, so ``anomalib train --data MVTec3D`` cannot train under pandas 3. This datamodule
is anomalib's, with those missing mask paths set to ``""`` (no mask: the normal training images
get empty masks, as anomalib does for them). Layout (as published)::

    <root>/<category>/{train,validation,test}/<label>/rgb/NNN.png
    <root>/<category>/{train,validation,test}/<label>/xyz/NNN.tiff
    <root>/<category>/test/<label>/gt/NNN.png

Command line: ``anomalib train --model M3DM --data MVTec3DFixed
--data.root datasets/MVTec3D --data.category bagel``.
"""

from __future__ import annotations

from anomalib.data import MVTec3D
from anomalib.data.datasets.depth.mvtec_3d import MVTec3DDataset
from anomalib.data.utils import Split

__all__ = ["MVTec3DFixed", "MVTec3DFixedDataset"]


class MVTec3DFixedDataset(MVTec3DDataset):
    """anomalib's ``MVTec3DDataset`` whose missing mask paths are ``""`` (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        samples = self.samples
        if "mask_path" in samples:
            samples["mask_path"] = samples["mask_path"].fillna("").astype(str).replace("nan", "")


class MVTec3DFixed(MVTec3D):
    """anomalib's ``MVTec3D`` datamodule on :class:`MVTec3DFixedDataset` (same arguments)."""

    def _setup(self, _stage: str | None = None) -> None:
        self.train_data = MVTec3DFixedDataset(split=Split.TRAIN, root=self.root, category=self.category)
        self.test_data = MVTec3DFixedDataset(split=Split.TEST, root=self.root, category=self.category)
