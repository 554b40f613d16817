"""M3DM's pictures: anomalib's panels (image, ground truth, map and mask overlays) plus the depth.

anomalib 2.7's :class:`~anomalib.visualization.ImageVisualizer` draws only fields it has a
``visualize_<field>`` function for, and has none for ``depth_map``; M3DM's anomalies are often
visible only in the point cloud. So, least invasively: anomalib draws and saves its picture as
always (through the plugin's :class:`ZeroShotVisualizer`, same file names), then the z channel of
the item's organized cloud is appended as one more panel ("Depth (z)", grey levels over the
foreground's z range, the background black) at the right end. ``visualize`` returns the same
pictures with the panel.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from anomalib.utils.path import generate_output_filename
from anomalib.visualization.image.functional import add_text_to_image
from anomalib.visualization.image.item_visualizer import visualize_image_item
from PIL import Image

from anomalib_zsad.models.components.display import ZeroShotVisualizer

DEPTH_TITLE = "Depth (z)"


def depth_panel(depth_map: Any, size: tuple[int, int]) -> Image.Image | None:  # noqa: ANN401
    """The z channel of an organized cloud ``[3, H, W]`` (or ``[H, W, 3]``) as a grey RGB image of
    ``size``: the foreground's (z != 0) nearest point white, its farthest dark grey, the background
    black. None without a 3-channel cloud."""
    cloud = torch.as_tensor(np.asarray(depth_map)).float() if not isinstance(depth_map, torch.Tensor) \
        else depth_map.detach().float().cpu()
    if cloud.dim() != 3 or 3 not in (cloud.shape[0], cloud.shape[-1]):
        return None
    z = cloud[2] if cloud.shape[0] == 3 else cloud[..., 2]
    foreground = z != 0
    grey = torch.zeros_like(z)
    if foreground.any():
        values = z[foreground]
        low, high = values.min(), values.max()
        scale = (high - low) if high > low else torch.tensor(1.0)
        grey[foreground] = 255 - 191 * (values - low) / scale  # near 255 .. far 64; background 0
    image = Image.fromarray(grey.round().clamp(0, 255).to(torch.uint8).numpy()).convert("RGB")
    return image.resize(size)


def with_depth_panel(picture: Image.Image, depth_map: Any, size: tuple[int, int],  # noqa: ANN401
                     text_config: dict[str, Any] | None = None) -> Image.Image:
    """``picture`` with the depth panel pasted at its right end (top-aligned)."""
    panel = depth_panel(depth_map, size)
    if panel is None:
        return picture
    config = {k: v for k, v in (text_config or {}).items() if k != "enable"}
    if (text_config or {}).get("enable", True):
        panel = add_text_to_image(panel, DEPTH_TITLE, **config)
    out = Image.new("RGB", (picture.width + panel.width, max(picture.height, panel.height)), "white")
    out.paste(picture.convert("RGB"), (0, 0))
    out.paste(panel, (picture.width, 0))
    return out


def naming_trainer(trainer: Any) -> Any:  # noqa: ANN401
    """What anomalib's visualizer reads from the trainer to name a picture, with the data set's
    *folder* name: anomalib keeps the path below the folder named like the datamodule (``name``),
    then below the category. ``MVTec3DFixed`` (or a data set in a folder named otherwise) is not
    found, and anomalib falls back to the last folder, ``rgb/000.png`` for every label: a defect's
    picture and a good one's overwrite each other. With the root folder's name the picture keeps
    ``test/<label>/rgb/000.png``."""
    datamodule = getattr(trainer, "datamodule", None)
    root = getattr(datamodule, "root", None)
    if root is None:
        return trainer
    named = SimpleNamespace(name=Path(root).name, category=getattr(datamodule, "category", None))
    return SimpleNamespace(default_root_dir=trainer.default_root_dir, datamodule=named)


class DepthVisualizer(ZeroShotVisualizer):
    """:class:`ZeroShotVisualizer` (anomalib's visualizer) with the depth panel (module docstring)."""

    def visualize(self, predictions: Any) -> Image.Image | list[Image.Image | None] | None:  # noqa: ANN401
        """As anomalib's ``visualize`` (an item or a one-item batch: one picture; a batch: a list),
        for depth items and batches too (anomalib's accepts image ones only), with the depth panel."""
        shown = self.for_display(predictions)
        items = list(shown) if hasattr(shown, "batch_size") else [shown]
        pictures = []
        for item in items:
            picture = visualize_image_item(item, fields=self.fields, overlay_fields=self.overlay_fields,
                                           field_size=self.field_size, fields_config=self.fields_config,
                                           overlay_fields_config=self.overlay_fields_config,
                                           text_config=self.text_config)
            depth = getattr(item, "depth_map", None)
            if picture is not None and depth is not None:
                picture = with_depth_panel(picture, depth, self.field_size, self.text_config)
            pictures.append(picture)
        return pictures[0] if len(pictures) == 1 else pictures

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,  # noqa: ANN401
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        """anomalib draws and saves; each saved picture then gets its item's depth panel."""
        naming = naming_trainer(trainer)
        super().on_test_batch_end(naming, pl_module, outputs, batch, batch_idx, dataloader_idx)
        depth = getattr(batch, "depth_map", None)
        if depth is None or self.output_dir is None:
            return
        datamodule = getattr(naming, "datamodule", None)
        for index, path in enumerate(batch.image_path or []):
            filename = generate_output_filename(input_path=path or "", output_path=self.output_dir,
                                                dataset_name=getattr(datamodule, "name", None),
                                                category=getattr(datamodule, "category", None))
            if filename.is_file():
                with Image.open(filename) as saved:
                    picture = saved.copy()
                with_depth_panel(picture, depth[index], self.field_size, self.text_config).save(filename)
