"""M3DM's ``nn.Module`` (Wang et al., "Multimodal Industrial Anomaly Detection via Hybrid Fusion",
CVPR 2023; official code nomewang/M3DM), the main setting ``DINO+Point_MAE+Fusion`` with UFF and
three memory banks: an RGB image ``[B, 3, H, W]`` (ImageNet-normalised) and its organized point
cloud ``[B, 3, h, w]`` (background 0) -> ``InferenceBatch(pred_score, anomaly_map)``.

Per sample (the official ``TripleFeatures``):

1. **RGB**: the frozen ViT's final patch tokens, ``[C_rgb, H/8, W/8]`` (28x28 at 224 px);
   ``rgb_patch`` is that grid's rows ``[784, 768]``; ``rgb_patch2`` the grid upsampled to the point
   grid (adaptive average pooling to ``H/4``, i.e. 2x nearest: ``[3136, 768]``).
2. **Points**: the cloud resized to ``HxW`` (nearest), its foreground points (all coordinates
   non-zero), Point-MAE features of ``num_group`` groups ``[1152, G]``, interpolated to every
   point (3 nearest centers) and put back on the pixel grid, 3x3 averaged without padding and
   pooled to ``H/4`` -> ``xyz_patch`` ``[3136, 1152]``.
3. **UFF**: ``fusion_patch = UFF(xyz_patch, rgb_patch2)`` ``[3136, 1920]``.
4. **Scores**: the three patch sets, normalised with the banks' shared mean and std, scored
   against their banks (:func:`.memory.score_modality`): three image scores and three 8-bit
   blurred maps.
5. **Decision fusion**: ``[λ·s_xyz, λ·s_rgb, λ·s_fusion]`` through the detection SVM -> image
   score; the per-pixel 3-vectors of the maps through the segmentation SVM -> anomaly map.

Training (:meth:`M3DMModel.add_training_sample`, :meth:`M3DMModel.fit`) collects the three
libraries, normalises them, subsamples them by the official coreset, then scores every training
sample against the finished banks (the official second, "late fusion" pass) and fits the SVMs.
Untrained, every bank is one zero row and the SVMs sum the λ-weighted scores: scores are the
patch norms, meaningless but defined (so that the model runs before training, as anomalib's flow
builds it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_zsad.pointcloud import (
    PointMAEEncoder,
    interpolate_to_points,
    points_to_grid,
    resize_organized,
    unorganize,
)

from .backbones import vit_feature_map
from .decision import fit_one_class_svm, svm_score_samples
from .fusion import FeatureFusionBlock
from .memory import (
    ModalityScore,
    bank_normalization,
    coreset_indices,
    coreset_sizes,
    score_modality,
)

logger = logging.getLogger(__name__)

MODALITIES = ("xyz", "rgb", "fusion")
MAIN_METHOD = "DINO+Point_MAE+Fusion"
#: the official ``--method_name`` settings with one memory bank: the bank's modality, whether it is
#: normalised by its own mean and std (``RGBFeatures`` only) and the re-weighting's ``+1e-5``
SINGLE_METHODS = {"DINO": ("rgb", True, 1e-5), "Point_MAE": ("xyz", False, 1e-5), "Fusion": ("fusion", False, 0.0)}
#: ``DINO+Point_MAE`` (``DoubleRGBPointFeatures``): the point and RGB banks of the main setting without
#: UFF, no zero row in the point bank, distances divided by 1000 in the re-weighting, 2-input SVMs
PAIR_METHOD = "DINO+Point_MAE"
METHODS = (*SINGLE_METHODS, PAIR_METHOD, MAIN_METHOD)
DEFAULT_LAMBDAS = {"xyz_s": 1.0, "rgb_s": 0.1, "fusion_s": 1.0, "xyz_smap": 1.0, "rgb_smap": 0.1, "fusion_smap": 1.0}


@dataclass
class SampleFeatures:
    """The patches of one sample (before normalisation) and, where asked, the intermediates."""

    xyz_patch: torch.Tensor  # [P, C_xyz] on the point grid
    rgb_patch: torch.Tensor  # [R, C_rgb] on the ViT grid
    rgb_patch2: torch.Tensor  # [P, C_rgb] upsampled to the point grid (UFF's RGB input)
    fusion_patch: torch.Tensor  # [P, C_xyz + C_rgb]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SampleScore:
    """Per-modality results, the SVMs' inputs and the fused score and map of one sample."""

    single: dict[str, ModalityScore]
    fused_input_s: torch.Tensor  # [1, 3] float32
    fused_input_map: torch.Tensor  # [H*W, 3] float32
    score: torch.Tensor  # [1] float64
    s_map: torch.Tensor  # [H, W] float64


def cloud_point_patch(encoder: PointMAEEncoder, cloud: torch.Tensor, image_size: tuple[int, int],
                      point_grid: tuple[int, int], drop_path: torch.Tensor | torch.Generator | None = None,
                      keep_extras: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``xyz_patch`` ``[P, C_xyz]`` of one organized cloud ``[3, H, W]`` already at ``image_size``:
    its foreground points, Point-MAE, interpolation back to every point, the pixel grid pooled to
    ``point_grid``. A module-level function so that the exported point front end
    (:mod:`.export`) runs exactly the model's code."""
    points, pixels = unorganize(cloud)
    channels = encoder.out_channels
    extras: dict[str, torch.Tensor] = {}
    if points.shape[0] == 0:  # no foreground: nothing to describe
        return cloud.new_zeros(point_grid[0] * point_grid[1], channels), extras
    groups, size = encoder.num_group, encoder.group_size
    if points.shape[0] < max(groups, size):  # a tiny cloud: fewer groups / points per group
        encoder.num_group, encoder.group_size = min(groups, points.shape[0]), min(size, points.shape[0])
    try:
        with torch.no_grad():
            features, center, neighbour_idx, center_idx = encoder(points[None], drop_path)
            interpolated = interpolate_to_points(points[None], center, features)[0]
    finally:
        encoder.num_group, encoder.group_size = groups, size
    grid = points_to_grid(interpolated, pixels, image_size, point_grid)
    xyz_patch = grid.reshape(channels, -1).T
    if keep_extras:
        extras = {"points": points, "pixel_indices": pixels, "point_features": features[0], "center": center[0],
                  "neighbour_idx": neighbour_idx[0], "center_idx": center_idx[0], "interpolated": interpolated}
    return xyz_patch, extras


class M3DMModel(nn.Module):
    """M3DM (main setting): see the module docstring.

    Args:
        rgb_backbone: the frozen timm ViT.
        point_backbone: the frozen Point-MAE encoder.
        fusion: the UFF block (its input widths: the point and RGB feature widths).
        image_size: (H, W) of the images and of the maps (official 224).
        coreset_fraction: ``f_coreset`` (official 0.1).
        coreset_eps: ``coreset_eps`` of the random projection (official 0.9).
        coreset_float16: the greedy coreset loop in float16 (official).
        projection_seed: seed of the sparse random projection (officially numpy's global generator).
        n_reweight: bank neighbours of the re-weighting (official 3).
        blur_radius: radius of Pillow's Gaussian blur of the 8-bit maps (official 4).
        lambdas: weights of the three scores and maps before the SVMs (official 1 / 0.1 / 1).
        ocsvm_nu / ocsvm_max_iter / ocsvm_seed: ``SGDOneClassSVM`` settings (official 0.5 / 1000 / 42).
        point_drop_path: draw Point-MAE's stochastic depth at every forward, as the official code
            does (it never calls ``.eval()``), from a generator seeded by ``seed``; False: none.
        seed: of those draws.
        method: the official ``--method_name``: ``DINO+Point_MAE+Fusion`` (three banks, SVMs) or a
            single bank, ``DINO`` (RGB), ``Point_MAE`` (points) or ``Fusion`` (UFF patches), whose
            re-weighted score and blurred map are the outputs (no SVM).
    """

    def __init__(self, rgb_backbone: nn.Module, point_backbone: PointMAEEncoder, fusion: FeatureFusionBlock,
                 image_size: tuple[int, int] = (224, 224), coreset_fraction: float = 0.1, coreset_eps: float = 0.9,
                 coreset_float16: bool = True, projection_seed: int | None = 0, n_reweight: int = 3,
                 blur_radius: float = 4, lambdas: dict[str, float] | None = None, ocsvm_nu: float = 0.5,
                 ocsvm_max_iter: int = 1000, ocsvm_seed: int | None = 42, point_drop_path: bool = False,
                 seed: int = 0, method: str = MAIN_METHOD) -> None:
        super().__init__()
        if method not in METHODS:
            msg = f"M3DM: method {method!r} is not one of {list(METHODS)}"
            raise ValueError(msg)
        self.method = method
        self.needs_points = method != "DINO"
        self.needs_fusion = method in {"Fusion", MAIN_METHOD}
        self.modalities = ("xyz", "rgb") if method == PAIR_METHOD else MODALITIES  # those the SVMs fuse
        self.score_divisor = 1000.0 if method == PAIR_METHOD else 1.0
        self.rgb_backbone = rgb_backbone
        self.point_backbone = point_backbone
        self.fusion = fusion
        self.image_size = tuple(image_size)
        self.point_grid = (self.image_size[0] // 4, self.image_size[1] // 4)
        self.coreset_fraction, self.coreset_eps, self.coreset_float16 = coreset_fraction, coreset_eps, coreset_float16
        self.projection_seed = projection_seed
        self.n_reweight, self.blur_radius = n_reweight, blur_radius
        self.lambdas = {**DEFAULT_LAMBDAS, **(lambdas or {})}
        self.ocsvm_nu, self.ocsvm_max_iter, self.ocsvm_seed = ocsvm_nu, ocsvm_max_iter, ocsvm_seed
        self.point_drop_path = point_drop_path
        self._drop_generator = torch.Generator().manual_seed(seed)
        widths = {"xyz": fusion.xyz_dim, "rgb": fusion.rgb_dim, "fusion": fusion.xyz_dim + fusion.rgb_dim}
        for name in MODALITIES:  # untrained: one zero row per bank
            self.register_buffer(f"{name}_bank", torch.zeros(1, widths[name]))
        self.register_buffer("bank_mean", torch.tensor(0.0))
        self.register_buffer("bank_std", torch.tensor(1.0))
        for name in ("detect", "seg"):  # untrained: the sum of the weighted scores
            self.register_buffer(f"{name}_coef", torch.ones(len(self.modalities), dtype=torch.float64))
            self.register_buffer(f"{name}_offset", torch.zeros(1, dtype=torch.float64))
        self._training_samples: list[SampleFeatures] = []

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        """The banks' sizes come from the checkpoint."""
        for name in MODALITIES:
            key = f"{prefix}{name}_bank"
            current = getattr(self, f"{name}_bank")
            if key in state_dict and state_dict[key].shape != current.shape:
                setattr(self, f"{name}_bank", torch.empty_like(state_dict[key], device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ features
    def rgb_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C_rgb, H/p, W/p]`` from the frozen ViT, contiguous in that layout: the official
        code copies the map (``torch.cat``), so its ``rgb_patch`` rows are a transposed view, and
        ``cdist`` rounds differently (~1e-4) on a transposed input than on a contiguous one."""
        with torch.no_grad():
            return vit_feature_map(self.rgb_backbone, images).contiguous()

    def _drop_path(self, drop_path: torch.Tensor | None) -> torch.Tensor | torch.Generator | None:
        if drop_path is not None:
            return drop_path
        return self._drop_generator if self.point_drop_path else None

    def point_features(self, cloud: torch.Tensor, drop_path: torch.Tensor | None = None,
                       keep_extras: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``xyz_patch`` ``[P, C_xyz]`` of one organized cloud ``[3, H, W]`` at the image size."""
        return cloud_point_patch(self.point_backbone, cloud, self.image_size, self.point_grid,
                                 self._drop_path(drop_path), keep_extras)

    def sample_features(self, rgb_map: torch.Tensor, cloud: torch.Tensor, drop_path: torch.Tensor | None = None,
                        keep_extras: bool = False) -> SampleFeatures:
        """The patches of one sample from its ViT map ``[C, h, w]`` and resized cloud ``[3, H, W]``."""
        channels = rgb_map.shape[0]
        rgb_patch = rgb_map.reshape(channels, -1).T
        rgb_patch2 = F.adaptive_avg_pool2d(rgb_map, self.point_grid).reshape(channels, -1).T
        if self.needs_points:
            xyz_patch, extras = self.point_features(cloud, drop_path, keep_extras)
        else:  # DINO alone: the point branch is not computed (its patches would not be used)
            xyz_patch, extras = rgb_map.new_zeros(rgb_patch2.shape[0], self.point_backbone.out_channels), {}
        if self.needs_fusion:
            with torch.no_grad():
                fusion_patch = self.fusion(xyz_patch[None], rgb_patch2[None])[0]
        else:
            fusion_patch = rgb_map.new_zeros(rgb_patch2.shape[0], self.fusion.xyz_dim + self.fusion.rgb_dim)
        return SampleFeatures(xyz_patch, rgb_patch, rgb_patch2, fusion_patch, extras)

    def resize_clouds(self, clouds: torch.Tensor) -> torch.Tensor:
        return resize_organized(clouds, self.image_size)

    def extract(self, images: torch.Tensor, clouds: torch.Tensor, drop_path: list[torch.Tensor] | None = None,
                keep_extras: bool = False) -> list[SampleFeatures]:
        """Patches of a batch: images ``[B, 3, H, W]``, organized clouds ``[B, 3, h, w]`` (any size:
        resized to the image size, nearest). ``drop_path``: per sample ``[depth, 2]`` factors to replay."""
        if images.shape[-2:] != self.image_size:
            msg = f"M3DM: images of size {tuple(images.shape[-2:])}, the model takes {self.image_size}"
            raise ValueError(msg)
        rgb_maps = self.rgb_features(images)
        clouds = self.resize_clouds(clouds)
        return [self.sample_features(rgb_maps[i], clouds[i], None if drop_path is None else drop_path[i], keep_extras)
                for i in range(images.shape[0])]

    # ------------------------------------------------------------------ scoring
    def normalise(self, patch: torch.Tensor) -> torch.Tensor:
        return (patch - self.bank_mean) / self.bank_std

    def modality_scores(self, features: SampleFeatures) -> dict[str, ModalityScore]:
        """Each modality's score and map against its bank (the patches normalised first)."""
        patches = {"xyz": features.xyz_patch, "rgb": features.rgb_patch, "fusion": features.fusion_patch}
        grids = self.rgb_grids(features)
        return {name: score_modality(self.normalise(patches[name]), getattr(self, f"{name}_bank"), grids[name],
                                     self.image_size, self.n_reweight, self.blur_radius, divisor=self.score_divisor)
                for name in self.modalities}

    def rgb_grids_for_size(self) -> tuple[int, int]:
        """The ViT's patch grid at the model's image size."""
        patch = getattr(self.rgb_backbone.patch_embed, "patch_size", (8, 8))
        return self.image_size[0] // patch[0], self.image_size[1] // patch[1]

    def rgb_grids(self, features: SampleFeatures) -> dict[str, tuple[int, int]]:
        rgb_grid = self.rgb_grids_for_size()
        if rgb_grid[0] * rgb_grid[1] != features.rgb_patch.shape[0]:
            msg = f"M3DM: {features.rgb_patch.shape[0]} RGB patches do not fill the {rgb_grid} grid"
            raise ValueError(msg)
        return {"xyz": self.point_grid, "rgb": rgb_grid, "fusion": self.point_grid}

    def fusion_inputs(self, single: dict[str, ModalityScore]) -> tuple[torch.Tensor, torch.Tensor]:
        """The SVMs' inputs: ``[[λ·s_xyz, λ·s_rgb, λ·s_fusion]]`` and the per-pixel λ-weighted maps ``[H*W, 3]``."""
        lam, count = self.lambdas, len(self.modalities)  # DINO+Point_MAE: xyz and rgb only
        s = torch.stack([lam[f"{name}_s"] * single[name].s for name in self.modalities]).reshape(1, count)
        maps = torch.stack([lam[f"{name}_smap"] * single[name].s_map for name in self.modalities])
        return s, maps.reshape(count, -1).T

    def score_sample(self, features: SampleFeatures) -> SampleScore:
        single = self.modality_scores(features)
        s, s_map = self.fusion_inputs(single)
        score = svm_score_samples(s, self.detect_coef, self.detect_offset)
        fused = svm_score_samples(s_map, self.seg_coef, self.seg_offset).view(*self.image_size)
        return SampleScore(single=single, fused_input_s=s, fused_input_map=s_map, score=score, s_map=fused)

    def score_single(self, features: SampleFeatures) -> ModalityScore:
        """A single-bank setting's score and map (``DINO``, ``Point_MAE``, ``Fusion``)."""
        name, _, weight_eps = SINGLE_METHODS[self.method]
        patch = {"xyz": features.xyz_patch, "rgb": features.rgb_patch, "fusion": features.fusion_patch}[name]
        return score_modality(self.normalise(patch), getattr(self, f"{name}_bank"), self.rgb_grids(features)[name],
                              self.image_size, self.n_reweight, self.blur_radius, weight_eps)

    def forward(self, images: torch.Tensor, clouds: torch.Tensor) -> InferenceBatch:
        """Image scores ``[B]`` and anomaly maps ``[B, H, W]`` (float32; computed in float64)."""
        scores, maps = [], []
        for features in self.extract(images, clouds):
            if self.method in SINGLE_METHODS:
                single = self.score_single(features)
                scores.append(single.s.reshape(()))
                maps.append(single.s_map)
                continue
            result = self.score_sample(features)
            scores.append(result.score.reshape(()))
            maps.append(result.s_map)
        return InferenceBatch(pred_score=torch.stack(scores).float(), anomaly_map=torch.stack(maps).float())

    # ------------------------------------------------------------------ training
    def reset_training(self) -> None:
        self._training_samples = []

    def add_training_sample(self, features: SampleFeatures, cloud: torch.Tensor | None = None) -> None:
        """Keep one training sample's patches (and its resized cloud where the late-fusion pass must
        draw new stochastic-depth factors)."""
        kept = SampleFeatures(features.xyz_patch.detach().cpu(), features.rgb_patch.detach().cpu(),
                              features.rgb_patch2.detach().cpu(), features.fusion_patch.detach().cpu())
        if self.point_drop_path and cloud is not None:
            kept.extras["cloud"] = cloud.detach().cpu()
        self._training_samples.append(kept)

    def add_training_batch(self, images: torch.Tensor, clouds: torch.Tensor) -> None:
        resized = self.resize_clouds(clouds)
        for features, cloud in zip(self.extract(images, clouds), resized, strict=True):
            self.add_training_sample(features, cloud)

    @property
    def training_samples(self) -> int:
        return len(self._training_samples)

    def build_banks(self, xyz_lib: torch.Tensor, rgb_lib: torch.Tensor, fusion_lib: torch.Tensor,
                    coreset_idx: dict[str, torch.Tensor] | None = None,
                    components: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The official ``run_coreset``: shared normalisation, coreset per library (point bank
        ``int(f·rows)``, the others ``int(f·n_point)``), zero-free point rows plus one zero row.
        ``coreset_idx`` / ``components``: per modality, recorded coreset indices / projection
        matrices to use instead of computing them. Returns the coreset indices."""
        mean, std = bank_normalization(xyz_lib, rgb_lib)
        libs = {"xyz": (xyz_lib - mean) / std, "rgb": (rgb_lib - mean) / std, "fusion": (fusion_lib - mean) / std}
        chosen: dict[str, torch.Tensor] = {}
        if self.coreset_fraction < 1:
            n_xyz, n_other = coreset_sizes(libs["xyz"].shape[0], self.coreset_fraction)
            for name, count in (("xyz", n_xyz), ("rgb", n_other), ("fusion", n_other))[:len(self.modalities)]:
                count = max(count, 1)
                if coreset_idx is not None and name in coreset_idx:
                    chosen[name] = torch.as_tensor(coreset_idx[name]).long()
                else:
                    chosen[name] = coreset_indices(libs[name], count, eps=self.coreset_eps,
                                                   float16=self.coreset_float16, seed=self.projection_seed,
                                                   components=None if components is None else components.get(name))
                libs[name] = libs[name][chosen[name]]
        if self.method == MAIN_METHOD:  # DINO+Point_MAE keeps its point rows as they are
            xyz_bank = libs["xyz"][torch.nonzero(torch.all(libs["xyz"] != 0, dim=1))[:, 0]]
            libs["xyz"] = torch.cat((xyz_bank, torch.zeros(1, xyz_bank.shape[1], dtype=xyz_bank.dtype)), 0)
        else:
            libs["fusion"] = libs["fusion"].new_zeros(1, libs["fusion"].shape[1])
        device = self.bank_mean.device
        for name in MODALITIES:
            setattr(self, f"{name}_bank", libs[name].contiguous().to(device))
        self.bank_mean = mean.to(device)
        self.bank_std = std.to(device)
        return chosen

    def build_single_bank(self) -> torch.Tensor | None:
        """A single-bank setting's ``run_coreset``: its library (the RGB one normalised by its own
        mean and std, the others as they are), subsampled to ``int(f·rows)`` by the coreset. No
        SVM is fitted. Returns the coreset indices (None without a coreset)."""
        name, normalised, _ = SINGLE_METHODS[self.method]
        library = torch.cat([getattr(s, f"{name}_patch") for s in self._training_samples])
        mean, std = (torch.mean(library), torch.std(library)) if normalised else (torch.tensor(0.0), torch.tensor(1.0))
        library = (library - mean) / std
        chosen = None
        if self.coreset_fraction < 1:
            chosen = coreset_indices(library, max(int(self.coreset_fraction * library.shape[0]), 1),
                                     eps=self.coreset_eps, float16=self.coreset_float16, seed=self.projection_seed)
            library = library[chosen]
        device = self.bank_mean.device
        setattr(self, f"{name}_bank", library.contiguous().to(device))
        self.bank_mean, self.bank_std = mean.to(device), std.to(device)
        return chosen

    def late_fusion_library(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The SVMs' training data: every training sample scored against the finished banks (the
        official second pass; with random stochastic depth its point features are drawn anew)."""
        s_lib, s_map_lib = [], []
        for kept in self._training_samples:
            features = kept
            if self.point_drop_path and "cloud" in kept.extras:
                device = self.bank_mean.device
                xyz_patch, _ = self.point_features(kept.extras["cloud"].to(device))
                with torch.no_grad():
                    fusion_patch = self.fusion(xyz_patch[None], kept.rgb_patch2.to(device)[None])[0]
                features = SampleFeatures(xyz_patch, kept.rgb_patch.to(device), kept.rgb_patch2.to(device),
                                          fusion_patch)
            else:
                device = self.bank_mean.device
                features = SampleFeatures(kept.xyz_patch.to(device), kept.rgb_patch.to(device),
                                          kept.rgb_patch2.to(device), kept.fusion_patch.to(device))
            s, s_map = self.fusion_inputs(self.modality_scores(features))
            s_lib.append(s)
            s_map_lib.append(s_map)
        return torch.cat(s_lib, 0), torch.cat(s_map_lib, 0)

    def fit_fusers(self, s_lib: torch.Tensor, s_map_lib: torch.Tensor) -> dict[str, Any]:
        """Fit the detection and segmentation SVMs (official settings) and store their coefficients."""
        fitted = {}
        for name, samples in (("detect", s_lib), ("seg", s_map_lib)):
            svm = fit_one_class_svm(samples, nu=self.ocsvm_nu, max_iter=self.ocsvm_max_iter,
                                    random_state=self.ocsvm_seed)
            device = getattr(self, f"{name}_coef").device
            setattr(self, f"{name}_coef", torch.from_numpy(svm.coef).to(device))
            setattr(self, f"{name}_offset", torch.from_numpy(svm.offset).to(device))
            fitted[name] = svm
        return fitted

    def fit(self) -> None:
        """Banks from the collected training samples, then the decision-layer SVMs."""
        if not self._training_samples:
            msg = "M3DM: no training sample was collected: nothing to build the memory banks from"
            raise RuntimeError(msg)
        samples = self._training_samples
        if self.method in SINGLE_METHODS:
            self.build_single_bank()
            self.reset_training()
            return
        self.build_banks(torch.cat([s.xyz_patch for s in samples]), torch.cat([s.rgb_patch for s in samples]),
                         torch.cat([s.fusion_patch for s in samples]))
        s_lib, s_map_lib = self.late_fusion_library()
        self.fit_fusers(s_lib, s_map_lib)
        logger.info("M3DM: banks of %s rows from %d training samples", {m: getattr(self, f"{m}_bank").shape[0]
                                                                       for m in MODALITIES}, len(samples))
        self.reset_training()
