"""Point-MAE's point-cloud encoder (Pang et al., ECCV 2022), as M3DM uses it: the
``PointTransformer`` of M3DM's ``models/models.py`` with ``encoder_dims == trans_dim == 384``.

Data flow for one cloud ``[N, 3]``:

1. :func:`~.sampling.group_points`: ``num_group`` centers by farthest point sampling, the
   ``group_size`` nearest points of each, relative to their center;
2. a mini-PointNet per group (``Conv1d(3,128,1) → BN → ReLU → Conv1d(128,256,1)``, max over the
   group, the max concatenated to every point, ``Conv1d(512,512,1) → BN → ReLU →
   Conv1d(512,384,1)``, max over the group) gives one token per group;
3. the position embedding of the centers (``Linear(3,128) → GELU → Linear(128,384)``) is added
   before *every* block of a 12-block transformer (6 heads, qkv without bias, scale on q, exact
   GELU, LayerNorm eps 1e-5, stochastic depth up to ``drop_path_rate``);
4. the outputs of blocks 3, 7 and 11 (0-based), each through the shared final LayerNorm,
   concatenated on channels: ``[B, 1152, G]``.

Two behaviours of the official pipeline come from its never calling ``.eval()``:

* **BatchNorm with batch statistics** (``batch_statistics=True``): the mini-PointNet normalises
  with the mean and biased variance of the current cloud's ``G·M`` points; the checkpoint's
  running statistics are never used. This is deterministic per cloud and kept by default.
* **Active stochastic depth**: each block drops its attention and MLP branches at random on every
  forward (probabilities ``linspace(0, 0.1, 12)``), so the official features change from run to run.
  Here a forward is deterministic unless ``drop_path`` is given: a ``torch.Generator`` (random
  draws, the official behaviour) or a ``[depth, 2]`` tensor of per-branch factors (0: dropped,
  ``1/keep``: kept) that replays recorded draws.

State-dict keys are those of the official module, so Point-MAE's ``pretrain.pth`` loads after
stripping its ``module.MAE_encoder.`` prefixes (:func:`read_pointmae_checkpoint`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .sampling import group_points

POINTMAE_URL = "https://github.com/Pang-Yatian/Point-MAE/releases/download/main/pretrain.pth"
FETCH_BLOCKS = (3, 7, 11)


class PointMAEWeightsUnavailableError(FileNotFoundError):
    """Point-MAE's pre-trained checkpoint is not at the given path."""


class _MiniPointNet(nn.Module):
    """Point-MAE's group encoder (keys ``first_conv.*``, ``second_conv.*``)."""

    def __init__(self, channels: int = 384) -> None:
        super().__init__()
        self.channels = channels
        self.first_conv = nn.Sequential(nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
                                        nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                          nn.Conv1d(512, channels, 1))

    @staticmethod
    def _stage(stage: nn.Sequential, x: torch.Tensor, batch_statistics: bool) -> torch.Tensor:
        conv_in, norm, _, conv_out = stage
        x = conv_in(x)
        if batch_statistics:  # training-mode BatchNorm, without touching the running statistics
            x = F.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
        else:
            x = F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, training=False,
                             eps=norm.eps)
        return conv_out(F.relu(x))

    def forward(self, groups: torch.Tensor, batch_statistics: bool = True) -> torch.Tensor:
        batch, count, size, _ = groups.shape
        x = groups.reshape(batch * count, size, 3).transpose(2, 1)
        x = self._stage(self.first_conv, x, batch_statistics)
        x = torch.cat([x.amax(dim=2, keepdim=True).expand(-1, -1, size), x], dim=1)
        x = self._stage(self.second_conv, x, batch_statistics)
        return x.amax(dim=2).reshape(batch, count, self.channels)


class GeluMlp(nn.Module):
    """``fc1 -> GELU -> fc2``, timm's ``Mlp`` names: the MLP of Point-MAE's blocks and of M3DM's UFF."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attention = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, dim))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = GeluMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, scales: tuple[float, float] | None = None) -> torch.Tensor:
        attention = self.attn(self.norm1(x))
        if scales is not None:
            attention = attention * scales[0]
        x = x + attention
        mlp = self.mlp(self.norm2(x))
        if scales is not None:
            mlp = mlp * scales[1]
        return x + mlp


class _Blocks(nn.Module):
    """Keeps the official key names ``blocks.blocks.{i}.*``."""

    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(dim, heads) for _ in range(depth)])


class PointMAEEncoder(nn.Module):
    """Point-MAE's encoder as M3DM uses it (see the module docstring).

    Args:
        num_group: groups (centers) per cloud (official 1024).
        group_size: points per group (official 128).
        trans_dim: token width (384).
        depth: transformer blocks (12).
        num_heads: attention heads (6).
        drop_path_rate: largest stochastic-depth probability (0.1); used only where a forward is
            given a generator (see ``drop_path``).
        fetch_blocks: 0-based blocks whose (normalised) outputs are concatenated (3, 7, 11).
        batch_statistics: BatchNorm from the cloud's own statistics (the official, never-``eval``
            behaviour) instead of the running ones.
    """

    def __init__(self, num_group: int = 1024, group_size: int = 128, trans_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, drop_path_rate: float = 0.1, fetch_blocks: tuple[int, ...] = FETCH_BLOCKS,
                 batch_statistics: bool = True) -> None:
        super().__init__()
        self.num_group, self.group_size = num_group, group_size
        self.trans_dim, self.depth = trans_dim, depth
        self.fetch_blocks = tuple(fetch_blocks)
        self.batch_statistics = batch_statistics
        # the official dpr list: linspace(0, rate, depth) as Python floats; block 0 has none
        self.drop_probabilities = [float(p) for p in torch.linspace(0, drop_path_rate, depth)]
        self.encoder = _MiniPointNet(trans_dim)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, trans_dim))
        self.blocks = _Blocks(trans_dim, depth, num_heads)
        self.norm = nn.LayerNorm(trans_dim)

    @property
    def out_channels(self) -> int:
        return self.trans_dim * len(self.fetch_blocks)

    def drop_path_scales(self, generator: torch.Generator) -> torch.Tensor:
        """``[depth, 2]`` factors of one random forward (0: branch dropped, ``1/keep``: kept), drawn
        as timm's ``DropPath`` draws them (one Bernoulli per branch and sample, batch size 1)."""
        scales = torch.ones(self.depth, 2)
        for block, probability in enumerate(self.drop_probabilities):
            if probability <= 0:
                continue
            keep = 1.0 - probability
            for branch in range(2):
                draw = torch.empty(1).bernoulli_(keep, generator=generator)
                scales[block, branch] = draw.div_(keep)[0]
        return scales

    def forward(self, points: torch.Tensor, drop_path: torch.Tensor | torch.Generator | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features of clouds ``points`` ``[B, N, 3]`` (B = 1 as officially: BatchNorm statistics
        are taken over the whole batch).

        Returns:
            ``(features [B, 1152, G], center [B, G, 3], neighbour_idx [B, G, M], center_idx [B, G])``.
        """
        neighborhood, center, neighbour_idx, center_idx = group_points(points, self.num_group, self.group_size)
        if isinstance(drop_path, torch.Generator):
            drop_path = self.drop_path_scales(drop_path)
        x = self.encoder(neighborhood, batch_statistics=self.batch_statistics)
        position = self.pos_embed(center)
        outputs = []
        for index, block in enumerate(self.blocks.blocks):
            scales = None
            if drop_path is not None:
                scales = (drop_path[index, 0].to(x), drop_path[index, 1].to(x))
            x = block(x + position, scales)
            if index in self.fetch_blocks:
                outputs.append(self.norm(x).transpose(-1, -2))
        return torch.cat(outputs, dim=1), center, neighbour_idx, center_idx


def read_pointmae_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The encoder's state dict from Point-MAE's ``pretrain.pth`` (``{'base_model': {'module.MAE_encoder.*':
    ...}}``), a state dict with or without those prefixes, or a file saved from :class:`PointMAEEncoder`.

    Raises:
        PointMAEWeightsUnavailableError: no file at ``path`` (the message says where to get it).
        ValueError: the file holds no Point-MAE encoder weights.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = (f"Point-MAE weights not found at {path}. Download Point-MAE's pre-trained checkpoint "
               f"({POINTMAE_URL}, the file M3DM calls checkpoints/pointmae_pretrain.pth) on a machine with internet, "
               "copy it here and pass its path (--model.point_checkpoint /path/to/pointmae_pretrain.pth), or "
               "point_checkpoint=null for random weights (tests only).")
        raise PointMAEWeightsUnavailableError(msg)
    stored = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(stored, dict):
        for key in ("base_model", "model", "state_dict"):
            if isinstance(stored.get(key), dict):
                stored = stored[key]
                break
    if not isinstance(stored, dict):
        msg = f"{path} holds no state dict"
        raise TypeError(msg)
    state = {}
    for key, value in stored.items():
        name = key.removeprefix("module.")
        if name.startswith("MAE_encoder."):
            state[name.removeprefix("MAE_encoder.")] = value
        elif not name.startswith(("MAE_decoder.", "mask_token", "increase_dim", "decoder_")):
            state[name] = value
    return state


def load_pointmae_weights(encoder: PointMAEEncoder, path: str | os.PathLike) -> None:
    """Copy Point-MAE's pre-trained weights into ``encoder``; every encoder tensor must be in the file
    (the official loader is ``strict=False`` and would silently keep random tensors)."""
    state = read_pointmae_checkpoint(path)
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in state]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or wrong:
        msg = (f"{path} does not hold Point-MAE encoder weights of this architecture: {len(missing)} tensors missing "
               f"(e.g. {missing[:3]}), {len(wrong)} of another shape (e.g. {wrong[:3]})")
        raise ValueError(msg)
    for key, value in state.items():
        if key in expected and not torch.isfinite(value.float()).all():
            msg = f"{path}: tensor {key} holds NaN or Inf values"
            raise ValueError(msg)
    encoder.load_state_dict({k: state[k] for k in expected})
