"""Exports that take images of any size.

anomalib 2.7's ``to_onnx`` makes only the batch axis dynamic when an ``input_size`` is given, so an
export made with ``--input_size "[518,518]"`` refuses every other image size. Yet the graph starts
with the pre-processor's ``Resize`` to the model size: whatever size comes in, the CLIP sees the
size it was built for. This module lets the exported graph say so:

* height and width of the input are dynamic (``batch_size``, ``height``, ``width`` in the ONNX
  file), unless the caller passes its own ``dynamic_shapes``/``dynamic_axes``;
* while tracing, the pre-processor's export transform (anomalib's copy of the transform, with
  antialiasing off) has each fixed-size ``Resize`` replaced by :class:`ExportResize`: the same
  ``torch.nn.functional.interpolate`` call, minus torchvision's "same size: return the input"
  shortcut, which would otherwise turn into a guard on the symbolic size. For an image already
  at the model size the interpolation is the identity, so numbers do not change;
* everything after the resize has static shapes: the CLIP position embeddings stay those of the
  model size (a constant of the graph), and maps come out at the model size, as with anomalib's
  own models (Padim, PatchCore: the map has the size of the pre-processed image).

Only when the export transform resizes to one fixed (height, width) are height and width made
dynamic; without such a resize (``pre_processor=False``, or an aspect-keeping ``Resize(518)``),
the model itself would see the input size and the export keeps anomalib's own behaviour.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torchvision.transforms.v2 import Compose, InterpolationMode, Resize

#: Names of the dynamic axes of the exported input (anomalib's own names for them).
DYNAMIC_AXIS_NAMES = {0: "batch_size", 2: "height", 3: "width"}


class ExportResize(nn.Module):
    """``Resize(size, interpolation, antialias=False)`` for tensors [B, C, H, W] that always
    interpolates, so that a traced graph keeps the input's height and width symbolic."""

    def __init__(self, size: tuple[int, int], interpolation: InterpolationMode) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.mode = InterpolationMode(interpolation).value

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        align_corners = False if self.mode in {"bilinear", "bicubic"} else None
        return F.interpolate(image, size=self.size, mode=self.mode, align_corners=align_corners)


def _resizes(transform: Any) -> list[Any]:  # noqa: ANN401
    if isinstance(transform, Compose):
        return [r for t in transform.transforms for r in _resizes(t)]
    return [transform] if isinstance(transform, Resize) else []


def fixed_resize_size(transform: Any) -> tuple[int, int] | None:  # noqa: ANN401
    """The (height, width) every image is resized to by ``transform``, or None when it has no
    ``Resize`` or one whose output size depends on the input (one side given, or ``max_size``)."""
    resizes = _resizes(transform)
    if not resizes or any(r.size is None or len(r.size) != 2 or r.max_size is not None for r in resizes):
        return None
    return tuple(resizes[-1].size)


def with_export_resize(transform: Any) -> Any:  # noqa: ANN401
    """A copy of ``transform`` with every fixed-size ``Resize`` replaced by :class:`ExportResize`."""
    if isinstance(transform, Resize):
        return ExportResize(transform.size, transform.interpolation)
    if isinstance(transform, Compose):
        return Compose([with_export_resize(t) for t in transform.transforms])
    return copy.deepcopy(transform)


def any_size_dynamic_shapes() -> tuple[dict[int, Any]]:
    """``dynamic_shapes`` for the one image input: batch, height and width dynamic."""
    return ({axis: torch.export.Dim(name, min=1) for axis, name in DYNAMIC_AXIS_NAMES.items()},)


@contextmanager
def any_size_export(module: nn.Module, onnx_kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """While exporting ``module`` (an ``AnomalibModule``) to ONNX: yields the keyword arguments for
    anomalib's ``to_onnx``, with dynamic height and width added where the caller gave no shapes of
    its own, and swaps in a traceable copy of the pre-processor's export transform (restored on
    exit). Does nothing when the pre-processor has no fixed-size resize (see the module doc)."""
    pre_processor = getattr(module, "pre_processor", None)
    transform = getattr(pre_processor, "export_transform", None)
    if transform is None or fixed_resize_size(transform) is None:
        yield onnx_kwargs
        return
    kwargs = dict(onnx_kwargs)
    if "dynamic_shapes" not in kwargs and "dynamic_axes" not in kwargs:
        kwargs["dynamic_shapes"] = any_size_dynamic_shapes()
    pre_processor.export_transform = with_export_resize(transform)
    try:
        yield kwargs
    finally:
        pre_processor.export_transform = transform
