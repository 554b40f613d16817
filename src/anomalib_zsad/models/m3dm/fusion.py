"""UFF, M3DM's unsupervised feature fusion block (``models/feature_fusion.py``): per modality a
LayerNorm and a two-layer MLP (``Linear(d, 4d) → GELU → Linear(4d, d)``); at inference the two
outputs are concatenated (``[xyz, rgb]``). The heads ``rgb_head``/``xyz_head`` (to 256) and the
patch-wise contrastive loss serve its pre-training only (:mod:`.pretrain`).

State-dict keys are the official ones: the released ``checkpoint-0.pth`` (``{'model': state_dict}``)
loads as it is (:func:`read_uff_checkpoint`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_zsad.pointcloud.pointmae import GeluMlp

UFF_HEAD_DIM = 256


class FeatureFusionBlock(nn.Module):
    """UFF (official ``FeatureFusionBlock(1152, 768, mlp_ratio=4)``).

    Args:
        xyz_dim: point-feature width (Point-MAE: 3 x 384).
        rgb_dim: RGB-feature width (ViT-B: 768).
        mlp_ratio: hidden width factor of the MLPs.
        temperature: of the contrastive loss (official 1).
    """

    def __init__(self, xyz_dim: int = 1152, rgb_dim: int = 768, mlp_ratio: float = 4.0,
                 temperature: float = 1.0) -> None:
        super().__init__()
        self.xyz_dim, self.rgb_dim = xyz_dim, rgb_dim
        self.temperature = temperature
        self.xyz_norm = nn.LayerNorm(xyz_dim)
        self.xyz_mlp = GeluMlp(xyz_dim, int(xyz_dim * mlp_ratio))
        self.rgb_norm = nn.LayerNorm(rgb_dim)
        self.rgb_mlp = GeluMlp(rgb_dim, int(rgb_dim * mlp_ratio))
        self.rgb_head = nn.Linear(rgb_dim, UFF_HEAD_DIM)
        self.xyz_head = nn.Linear(xyz_dim, UFF_HEAD_DIM)

    def forward(self, xyz_feature: torch.Tensor, rgb_feature: torch.Tensor) -> torch.Tensor:
        """Fused patch features ``[..., xyz_dim + rgb_dim]`` (the official ``feature_fusion``)."""
        xyz = self.xyz_mlp(self.xyz_norm(xyz_feature))
        rgb = self.rgb_mlp(self.rgb_norm(rgb_feature))
        return torch.cat([xyz, rgb], dim=-1)

    def contrastive_loss(self, xyz_feature: torch.Tensor, rgb_feature: torch.Tensor) -> torch.Tensor:
        """The pre-training loss of paired patches ``[P, xyz_dim]`` / ``[P, rgb_dim]``: InfoNCE of
        ``rgb_head(fused rgb)`` against ``xyz_head(fused xyz)`` over the patches whose point
        feature has no exact zero (the object's patches), times ``2·T`` (official
        ``FeatureFusionBlock.forward`` + ``contrastive_loss``). Under ``torch.distributed`` the
        official code labels the rows with the process's rank offset, but compares each process's
        queries with its own keys only; that is kept (each process's loss is its own batch's)."""
        fused = self.forward(xyz_feature, rgb_feature)
        query = self.rgb_head(fused[..., self.xyz_dim:].reshape(-1, self.rgb_dim))
        key = self.xyz_head(fused[..., :self.xyz_dim].reshape(-1, self.xyz_dim))
        valid = torch.nonzero(torch.all(xyz_feature.reshape(-1, self.xyz_dim) != 0, dim=1))[:, 0]
        query = F.normalize(query[valid], dim=1)
        key = F.normalize(key[valid], dim=1)
        logits = query @ key.T / self.temperature
        labels = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(logits, labels) * (2 * self.temperature)


def read_uff_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The UFF state dict of a ``checkpoint-*.pth`` written by the official ``fusion_pretrain.py``
    (``{'model': state_dict, ...}``) or by :mod:`.pretrain`, or of a plain state dict."""
    path = Path(path).expanduser()
    if not path.is_file():
        msg = (f"M3DM: UFF checkpoint not found: {path}. Give the file written by UFF pre-training (the official "
               "release calls it checkpoints/checkpoint-0.pth; python -m anomalib_zsad.models.m3dm.pretrain writes "
               "one), or use_uff=false.")
        raise FileNotFoundError(msg)
    stored = torch.load(path, map_location="cpu", weights_only=True)
    bad = _non_finite(stored)
    if bad:
        msg = f"M3DM: {path}: tensor {bad} holds NaN or Inf values"
        raise ValueError(msg)
    for key in ("model", "state_dict"):
        if isinstance(stored, dict) and isinstance(stored.get(key), dict):
            stored = stored[key]
    if not isinstance(stored, dict) or not any(k.endswith("xyz_mlp.fc1.weight") for k in stored):
        msg = f"M3DM: {path} holds no UFF (FeatureFusionBlock) weights: expected keys such as xyz_mlp.fc1.weight"
        raise ValueError(msg)
    return {k.removeprefix("module.").removeprefix("fusion."): v for k, v in stored.items()}


def _non_finite(stored: object, prefix: str = "") -> str | None:
    """The first tensor (by key path) of a nested checkpoint with NaN or Inf values, or None."""
    if isinstance(stored, torch.Tensor):
        finite = not torch.is_floating_point(stored) or bool(torch.isfinite(stored).all())
        return None if finite else (prefix or "<tensor>")
    if isinstance(stored, dict):
        for key, value in stored.items():
            found = _non_finite(value, f"{prefix}.{key}" if prefix else str(key))
            if found:
                return found
    return None


def load_uff_weights(block: FeatureFusionBlock, path: str | os.PathLike) -> None:
    """Copy a UFF checkpoint into ``block``; every tensor must be there with its shape (the official
    loader is ``strict=False`` and would silently keep a random block)."""
    state = read_uff_checkpoint(path)
    expected = block.state_dict()
    problems = [k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape)]
    if problems:
        msg = (f"M3DM: {path} does not fit UFF({block.xyz_dim}, {block.rgb_dim}): {len(problems)} tensors missing or "
               f"of another shape, e.g. {problems[:3]}")
        raise ValueError(msg)
    block.load_state_dict({k: state[k] for k in expected})
