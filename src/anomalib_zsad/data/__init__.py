"""Data for zero-shot anomaly detection: cross-data-set datamodule, offline demo set, checks.

Public names are imported lazily (PEP 562) because importing anomalib takes ~10 s and the
demo generator / validators do not need it. If anomalib is *already* imported (the ``anomalib``
CLI; the plugin hook in :mod:`anomalib_zsad._register` imports this package after
``anomalib.models``), importing this package also :func:`activate` s it: the datamodules become
visible to jsonargparse by short name (``--data CrossDataset``, ``--data.train ZSADDemo``).
Nothing of anomalib is changed: the plugin's datamodules read images with :func:`read_image_rgb`
themselves; :func:`install_rgb_image_reader` makes anomalib's own readers use it too, on request.

* :class:`CrossDataset` - train on one data set's test split (or k shots per category), test on
  another's category; every anomalib image datamodule is a source or a target.
* :class:`MVTecLayout` - any data set in MVTec AD layout, masks optional (converted sets, own data);
  converters from the published layouts: ``python -m anomalib_zsad.data.convert --list``.
* :class:`MVTecLOCOFixed` - anomalib's MVTec LOCO datamodule with an indexing that works under pandas 3.
* :class:`MVTec3DFixed` - anomalib's MVTec 3D-AD datamodule with an indexing that works under
  pandas 3 (M3DM's data).
* :class:`FewAnomalies` - a category's normal training images plus k of its anomalies (supervised
  regime, BGAD), the drawn ones left out of evaluation.
* :func:`make_demo_dataset` - write the small offline MVTec-layout demo set;
  :class:`ZSADDemo` - anomalib MVTecAD datamodule over it that generates it on demand.
* :func:`validate_folder_dataset`, :class:`DatasetError` - early, explicit data checks.
* :func:`read_image_rgb` - robust image loading (16-bit, grayscale, RGBA -> RGB), used by the
  plugin's datamodules; :func:`install_rgb_image_reader` / :func:`uninstall_rgb_image_reader` -
  opt-in (and out) for anomalib's own readers, e.g. ``anomalib predict --data <folder>``.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CrossDataset": "anomalib_zsad.data.cross_dataset",
    "MVTecLayout": "anomalib_zsad.data.mvtec_layout",
    "MVTecLOCOFixed": "anomalib_zsad.data.loco",
    "FewAnomalies": "anomalib_zsad.data.few_anomalies",
    "MVTec3DFixed": "anomalib_zsad.data.mvtec3d",
    "select_shots": "anomalib_zsad.data.cross_dataset",
    "make_demo_dataset": "anomalib_zsad.data.demo",
    "ZSADDemo": "anomalib_zsad.data.demo_datamodule",
    "DatasetError": "anomalib_zsad.data.errors",
    "CorruptFileError": "anomalib_zsad.data.errors",
    "FolderSummary": "anomalib_zsad.data.validation",
    "validate_folder_dataset": "anomalib_zsad.data.validation",
    "validate_image_folder": "anomalib_zsad.data.validation",
    "read_image_rgb": "anomalib_zsad.data.image_io",
    "install_rgb_image_reader": "anomalib_zsad.data.image_io",
    "uninstall_rgb_image_reader": "anomalib_zsad.data.image_io",
}

__all__ = sorted([*_EXPORTS, "activate"])

if TYPE_CHECKING:
    from anomalib_zsad.data.cross_dataset import CrossDataset, select_shots
    from anomalib_zsad.data.demo import make_demo_dataset
    from anomalib_zsad.data.demo_datamodule import ZSADDemo
    from anomalib_zsad.data.errors import CorruptFileError, DatasetError
    from anomalib_zsad.data.few_anomalies import FewAnomalies
    from anomalib_zsad.data.image_io import install_rgb_image_reader, read_image_rgb, uninstall_rgb_image_reader
    from anomalib_zsad.data.loco import MVTecLOCOFixed
    from anomalib_zsad.data.mvtec3d import MVTec3DFixed
    from anomalib_zsad.data.mvtec_layout import MVTecLayout
    from anomalib_zsad.data.validation import FolderSummary, validate_folder_dataset, validate_image_folder


def __getattr__(name: str) -> Any:  # noqa: ANN401
    if name not in _EXPORTS:
        msg = f"module 'anomalib_zsad.data' has no attribute '{name}'"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def activate() -> None:
    """Import the datamodules, so jsonargparse finds them by short name. Changes nothing in anomalib."""
    from anomalib_zsad.data.cross_dataset import CrossDataset
    from anomalib_zsad.data.demo_datamodule import ZSADDemo
    from anomalib_zsad.data.few_anomalies import FewAnomalies
    from anomalib_zsad.data.loco import MVTecLOCOFixed
    from anomalib_zsad.data.mvtec3d import MVTec3DFixed
    from anomalib_zsad.data.mvtec_layout import MVTecLayout


if "anomalib.data" in sys.modules:  # anomalib's import cost is already paid
    activate()
