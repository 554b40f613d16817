"""M3DM's own loader (``dataset.py``), for reading MVTec 3D-AD samples exactly as the official
code does, outside anomalib's datamodule (parity checks, the UFF pre-training command):

* RGB: Pillow bicubic resize of the 8-bit image to 224, ``ToTensor``, ImageNet normalisation;
* xyz: nearest-neighbour resize of the organized cloud (:func:`anomalib_zsad.pointcloud.resize_organized`);
* ground truth: Pillow nearest resize, ``ToTensor``, ``> 0.5``.

Through anomalib (``--data MVTec3D``) the RGB image is resized by the model's pre-processor
instead (torchvision's antialiased bicubic on the float image, no 8-bit rounding after the
resize): the input differs by up to one grey level, see the model README.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.functional import normalize, to_tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def official_rgb_tensor(rgb: np.ndarray, size: int = 224) -> torch.Tensor:
    """``[3, size, size]`` float32 from an 8-bit ``[H, W, 3]`` image, as M3DM's loader makes it."""
    from PIL import Image

    image = Image.fromarray(np.asarray(rgb, dtype=np.uint8)).convert("RGB")
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    return normalize(to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


def official_gt_mask(gt: np.ndarray | None, size: int = 224) -> torch.Tensor:
    """``[1, size, size]`` binary float mask (zeros where the sample has none, as ``test/good``)."""
    from PIL import Image

    if gt is None:
        return torch.zeros(1, size, size)
    mask = Image.fromarray(np.asarray(gt, dtype=np.uint8)).convert("L").resize((size, size), Image.Resampling.NEAREST)
    return (to_tensor(mask) > 0.5).float()
