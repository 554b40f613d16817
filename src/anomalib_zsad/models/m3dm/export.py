"""M3DM's export: a two-part inferencer.

Why two parts: the point branch has no static graph. The foreground selection keeps a
cloud-dependent number of points, and farthest point sampling is ``num_group`` data-dependent
steps (1024 by default) over them; a tiny cloud even changes the number of groups. Everything
after the point features has static shapes, so it is one graph:

1. **Point front end** (torch, :class:`PointFrontEnd`, ``point_features.pt`` next to the graph):
   organized clouds ``[B, 3, h, w]`` -> point patches ``[B, C_xyz, H/4, W/4]`` (the cloud resized
   to the model size, foreground, FPS + kNN, Point-MAE, interpolation to the pixels, pooling): the
   model's own code (:func:`.torch_model.cloud_point_patch`). The file is a state dict and the
   settings, read with ``weights_only=True``.
2. **Scoring graph** (:class:`ScoringGraph`, ONNX / OpenVINO): inputs ``image`` ``[B, 3, H, W]``
   in [0, 1] (the pre-processor is in the graph, as in anomalib's exports; any height and width)
   and ``point_features`` from part 1 -> the DINO ViT, UFF, the three memory banks (``cdist`` +
   ``min``, PatchCore-style re-weighting), the 8-bit blurred maps (Pillow's integer arithmetic),
   the two SVMs (their linear ``score_samples``: ``x·coef``) and the post-processor
   (``pred_score``, ``pred_label``, ``anomaly_map``, ``pred_mask``).

The torch export (``--export_type torch``) is anomalib's pickled module in one piece: its
``forward(image, clouds)`` runs both parts. :class:`M3DMInferencer` runs any of the three.
Stochastic depth (``point_drop_path=True``) is never part of an export: exported point features
are the deterministic ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_zsad.pointcloud import PointMAEEncoder, resize_organized

from .memory import gaussian_blur_8bit
from .torch_model import MAIN_METHOD, MODALITIES, SINGLE_METHODS, cloud_point_patch

if TYPE_CHECKING:
    from .torch_model import M3DMModel

FRONT_END_FILE = "point_features.pt"
INPUT_NAMES = ("image", "point_features")
OUTPUT_NAMES = ("pred_score", "pred_label", "anomaly_map", "pred_mask")


class PointFrontEnd(nn.Module):
    """Part 1: organized clouds ``[B, 3, h, w]`` -> point patches ``[B, C_xyz, H/4, W/4]``."""

    def __init__(self, encoder: PointMAEEncoder, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.point_grid = (self.image_size[0] // 4, self.image_size[1] // 4)

    def forward(self, clouds: torch.Tensor) -> torch.Tensor:
        clouds = resize_organized(clouds, self.image_size)
        patches = [cloud_point_patch(self.encoder, cloud, self.image_size, self.point_grid)[0] for cloud in clouds]
        return torch.stack([p.T.reshape(-1, *self.point_grid) for p in patches])

    def config(self) -> dict[str, Any]:
        e = self.encoder
        return {"num_group": e.num_group, "group_size": e.group_size, "trans_dim": e.trans_dim, "depth": e.depth,
                "num_heads": e.blocks.blocks[0].attn.heads, "fetch_blocks": list(e.fetch_blocks),
                "batch_statistics": e.batch_statistics, "image_size": list(self.image_size)}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": self.config(), "state_dict": self.encoder.state_dict()}, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PointFrontEnd:
        """The front end written by :meth:`save` (plain tensors and settings: ``weights_only=True``)."""
        path = Path(path)
        if not path.is_file():
            msg = (f"M3DM export: the point front end {path} is missing; it is written next to the exported graph "
                   f"({FRONT_END_FILE}) and is the first of the two parts (see docs/models/m3dm.md, Export)")
            raise FileNotFoundError(msg)
        stored = torch.load(path, map_location="cpu", weights_only=True)
        config = dict(stored["config"])
        image_size = tuple(config.pop("image_size"))
        config["fetch_blocks"] = tuple(config["fetch_blocks"])
        encoder = PointMAEEncoder(**config)
        encoder.load_state_dict(stored["state_dict"], strict=True)
        encoder.eval()
        return cls(encoder, image_size)


def euclidean_cdist(rows: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``torch.cdist(rows [B, P, C], bank [L, C])`` as torch computes it for large inputs (one
    matrix product of the padded rows ``[-2x, |x|², 1]·[y, 1, |y|²]``, clamped at 0, square root):
    the exporter has no ONNX function for ``cdist`` itself."""
    x_norm = rows.pow(2).sum(-1, keepdim=True)
    y_norm = bank.pow(2).sum(-1, keepdim=True)
    x_pad = torch.cat([rows * -2, x_norm, torch.ones_like(x_norm)], dim=-1)  # torch's own order
    y_pad = torch.cat([bank, torch.ones_like(y_norm), y_norm], dim=-1)
    return (x_pad @ y_pad.T).clamp_min(0).sqrt()


def nearest_bank_scores(patch: torch.Tensor, bank: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int],
                        n_reweight: int, weight_eps: float = 0.0, divisor: float = 1.0,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.memory.score_modality` for a batch ``[B, P, C]`` with static shapes (no Python
    branch on values): image scores ``[B]`` and maps ``[B, H, W]`` before the blur (the three
    modalities' maps are blurred together: :func:`blur_8bit_batch`)."""
    batch = patch.shape[0]
    distance = euclidean_cdist(patch, bank)
    min_val, min_idx = torch.min(distance, dim=2)
    s_idx = torch.argmax(min_val, dim=1, keepdim=True)  # [B, 1]
    s_star = torch.gather(min_val, 1, s_idx)[:, 0]
    m_test = torch.gather(patch, 1, s_idx[..., None].expand(-1, -1, patch.shape[2]))  # [B, 1, C]
    m_star = bank[torch.gather(min_idx, 1, s_idx)[:, 0]]  # [B, C]
    w_dist = euclidean_cdist(m_star.unsqueeze(1), bank)[:, 0]
    _, nn_idx = torch.topk(w_dist, k=min(n_reweight, bank.shape[0]), largest=False)
    m_star_knn = torch.linalg.norm(m_test - bank[nn_idx[:, 1:]], dim=2)  # [B, k-1]
    if divisor != 1:  # DINO+Point_MAE's /1000 (the map keeps the distances)
        s_star, m_star_knn = s_star / divisor, m_star_knn / divisor
    scale = float(np.sqrt(patch.shape[2]))
    denominator = torch.sum(torch.exp(m_star_knn / scale), dim=1)
    if weight_eps:
        denominator = denominator + weight_eps
    weight = 1 - torch.exp(s_star / scale) / denominator
    s_map = F.interpolate(min_val.view(batch, 1, *grid), size=tuple(image_size), mode="bilinear")[:, 0]
    return weight * s_star, s_map


def blur_8bit_batch(maps: torch.Tensor, radius: float) -> torch.Tensor:
    """:func:`.memory.blur_8bit` on ``[B, H, W]`` without a branch: each map over its maximum,
    truncated to 8 bits (a floor: the values are not negative), Pillow's blur, times the maximum."""
    peak = maps.amax(dim=(1, 2), keepdim=True)
    positive = peak > 0
    safe = torch.where(positive, peak, torch.ones_like(peak))
    quantised = torch.floor((maps / safe).mul(255)).to(torch.int64)
    blurred = gaussian_blur_8bit(quantised, radius).float().div(255) * safe
    return torch.where(positive, blurred, torch.zeros_like(blurred))


class ScoringGraph(nn.Module):
    """Part 2: ``(image, point_features)`` -> anomalib's outputs, the model's buffers as constants."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        model: M3DMModel = module.model
        self.pre_processor = module.pre_processor
        self.post_processor = module.post_processor
        self.rgb_backbone, self.fusion = model.rgb_backbone, model.fusion
        self.image_size, self.point_grid = model.image_size, model.point_grid
        self.n_reweight, self.blur_radius, self.lambdas = model.n_reweight, model.blur_radius, dict(model.lambdas)
        self.rgb_grid = model.rgb_grids_for_size()
        self.method, self.modalities, self.score_divisor = model.method, model.modalities, model.score_divisor
        for name in (*(f"{m}_bank" for m in MODALITIES), "bank_mean", "bank_std", "detect_coef", "detect_offset",
                     "seg_coef", "seg_offset"):
            self.register_buffer(name, getattr(model, name))

    def forward(self, image: torch.Tensor, point_features: torch.Tensor) -> InferenceBatch:
        from .backbones import vit_feature_map

        images = self.pre_processor(image) if self.pre_processor else image
        rgb_map = vit_feature_map(self.rgb_backbone, images)
        batch, channels = rgb_map.shape[:2]
        rgb_patch = rgb_map.reshape(batch, channels, -1).transpose(1, 2)
        # adaptive pooling from H/8 to H/4 is a 2x nearest upsampling (each bin holds one cell)
        rgb_patch2 = F.adaptive_avg_pool2d(rgb_map, self.point_grid).reshape(batch, channels, -1).transpose(1, 2)
        xyz_patch = point_features.reshape(batch, point_features.shape[1], -1).transpose(1, 2)
        patches = {"xyz": xyz_patch, "rgb": rgb_patch}
        if self.method in {"Fusion", MAIN_METHOD}:
            patches["fusion"] = self.fusion(xyz_patch, rgb_patch2)
        grids = {"xyz": self.point_grid, "rgb": self.rgb_grid, "fusion": self.point_grid}
        if self.method in SINGLE_METHODS:  # one bank: its score and blurred map, no SVM
            name, _, weight_eps = SINGLE_METHODS[self.method]
            normalised = (patches[name] - self.bank_mean) / self.bank_std
            s, s_map = nearest_bank_scores(normalised, getattr(self, f"{name}_bank"), grids[name], self.image_size,
                                           self.n_reweight, weight_eps)
            single = InferenceBatch(pred_score=s, anomaly_map=blur_8bit_batch(s_map, self.blur_radius))
            return self.post_processor(single) if self.post_processor else single
        lam = self.lambdas
        scores, maps = [], []
        count = len(self.modalities)  # 3; DINO+Point_MAE: 2
        for name in self.modalities:
            normalised = (patches[name] - self.bank_mean) / self.bank_std
            s, s_map = nearest_bank_scores(normalised, getattr(self, f"{name}_bank"), grids[name], self.image_size,
                                           self.n_reweight, divisor=self.score_divisor)
            scores.append(lam[f"{name}_s"] * s)
            maps.append(s_map)
        blurred = blur_8bit_batch(torch.stack(maps, dim=1).flatten(0, 1), self.blur_radius).view(batch, count,
                                                                                                  *self.image_size)
        weights = torch.tensor([lam[f"{name}_smap"] for name in self.modalities]).view(1, count, 1, 1)
        s_in = torch.stack(scores, dim=1).double()  # [B, count]
        map_in = (weights * blurred).permute(0, 2, 3, 1).double()  # [B, H, W, count]
        score = (s_in @ self.detect_coef - self.detect_offset) + self.detect_offset
        anomaly_map = (map_in @ self.seg_coef - self.seg_offset) + self.seg_offset
        batch_out = InferenceBatch(pred_score=score.float(), anomaly_map=anomaly_map.float())
        return self.post_processor(batch_out) if self.post_processor else batch_out


def export_scoring_graph(module: nn.Module, path: Path, input_size: tuple[int, int] | None,
                         **kwargs: Any) -> Path:  # noqa: ANN401
    """Trace :class:`ScoringGraph` of ``module`` to ONNX at ``path`` (batch, height and width of
    the image dynamic: the pre-processor's resize is in the graph) and write the front end beside it."""
    from anomalib_zsad.models.components.export import any_size_export

    model = module.model
    graph = ScoringGraph(module).eval()
    height, width = input_size or model.image_size
    image = torch.rand(2, 3, height, width)
    points = torch.zeros(2, model.point_backbone.out_channels, *model.point_grid)
    batch = torch.export.Dim("batch_size", min=1)
    image_axes = {0: batch}
    kwargs.setdefault("opset_version", 18)
    with any_size_export(module, {}) as swapped:
        if "dynamic_shapes" in swapped:  # a fixed-size resize in the graph: any image size comes in
            image_axes = {0: batch, 2: torch.export.Dim("height", min=1), 3: torch.export.Dim("width", min=1)}
        output_names = [n for n, v in graph(image, points)._asdict().items() if v is not None]
        torch.onnx.export(graph, (image, points), str(path), input_names=list(INPUT_NAMES), output_names=output_names,
                          dynamo=True, dynamic_shapes=(image_axes, {0: batch}), **kwargs)
    PointFrontEnd(model.point_backbone, model.image_size).save(path.parent / FRONT_END_FILE)
    return path


class M3DMInferencer:
    """Runs an M3DM export on images and their organized clouds.

    ``path``: ``model.onnx`` (onnxruntime), ``model.xml`` (OpenVINO) or ``model.pt`` (anomalib's
    torch export; pickled: anomalib asks for ``TRUST_REMOTE_CODE=1``). For the graphs, the point
    front end ``point_features.pt`` is read from the same folder.
    """

    def __init__(self, path: str | os.PathLike, device: str = "CPU") -> None:
        self.path = Path(path)
        self.kind = self.path.suffix
        if self.kind not in {".onnx", ".xml", ".pt"}:
            msg = f"M3DMInferencer: {self.path} is not an M3DM export (.onnx, .xml or .pt)"
            raise ValueError(msg)
        if self.kind == ".pt":
            from anomalib.deploy import TorchInferencer

            self.model = TorchInferencer(path=self.path, device="cpu" if device == "CPU" else device).model
            return
        self.front_end = PointFrontEnd.load(self.path.parent / FRONT_END_FILE)
        if self.kind == ".onnx":
            import onnxruntime

            self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
            self.output_names = [o.name for o in self.session.get_outputs()]
            self.input_names = [i.name for i in self.session.get_inputs()]
        else:
            import openvino

            self.compiled = openvino.Core().compile_model(str(self.path), device)
            self.input_names = [port.any_name for port in self.compiled.inputs]

    def point_features(self, clouds: torch.Tensor) -> torch.Tensor:
        """Part 1 alone: the graph's second input."""
        with torch.no_grad():
            return self.front_end(torch.as_tensor(clouds).float())

    def predict(self, images: torch.Tensor | np.ndarray, clouds: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        """``images`` ``[B, 3, H, W]`` in [0, 1], ``clouds`` ``[B, 3, h, w]`` -> the outputs by name."""
        images = torch.as_tensor(images).float()
        if self.kind == ".pt":
            with torch.no_grad():
                out = self.model(images, torch.as_tensor(clouds).float())
            return {k: v.numpy() for k, v in out._asdict().items() if v is not None}
        feeds = {INPUT_NAMES[0]: images.numpy()}
        if INPUT_NAMES[1] in self.input_names:  # a graph that ignores the points (DINO) has no such input
            feeds[INPUT_NAMES[1]] = self.point_features(clouds).numpy()
        if self.kind == ".onnx":
            values = self.session.run(None, feeds)
            return dict(zip(self.output_names, values, strict=True))
        result = self.compiled(feeds)
        named = {}
        for port, value in result.items():  # OpenVINO may give a port several names: keep anomalib's
            names = port.get_names()
            named[next((n for n in OUTPUT_NAMES if n in names), port.any_name)] = np.asarray(value)
        return named
