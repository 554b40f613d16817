"""M3DM as an anomalib model: ``anomalib train --model M3DM --data MVTec3D --data.category bagel``.

One-class, as anomalib's PatchCore: one pass over the normal training samples collects the three
patch libraries (point, RGB, fused), the end of the epoch builds the memory banks (official
normalisation and coreset) and fits the two decision-layer SVMs on the training samples' scores.
Nothing is optimised. The batches are anomalib's depth batches (``MVTec3D``, ``Folder3D``): the
RGB image goes through the model's pre-processor (resize to ``image_size``, ImageNet
normalisation), the organized point cloud (``batch.depth_map``, ``[B, 3, h, w]``) is resized to
``image_size`` by the model itself (nearest, as the official loader).

The point clouds must have their background removed (zeros), as M3DM's own preprocessing
(``utils/preprocessing.py``) leaves them: :func:`anomalib_zsad.pointcloud.remove_background` does
it for a raw MVTec 3D-AD scan (see docs/models/m3dm.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from torch import nn
from torchvision.transforms.v2 import InterpolationMode

from anomalib_zsad.models.components import PluginModuleMixin, imagenet_pre_processor
from anomalib_zsad.models.components.contract import ArgumentCheck, weights_sha256

from .backbones import is_random_weights, is_vit_name, load_rgb_backbone, patch_size_of
from .fusion import FeatureFusionBlock, load_uff_weights, read_uff_checkpoint
from .torch_model import METHODS, M3DMModel

logger = logging.getLogger(__name__)

POINTMAE_DEFAULT = "checkpoints/pointmae_pretrain.pth"
MIN_IMAGE_SIZE = 32


class PointCloudsMissingError(ValueError):
    """A batch without organized point clouds reached M3DM."""


def _point_weights(point_checkpoint: Any) -> str | None:  # noqa: ANN401
    return None if is_random_weights(point_checkpoint) else str(point_checkpoint)


class M3DM(PluginModuleMixin, AnomalibModule):
    """M3DM: multimodal industrial anomaly detection via hybrid fusion (Wang et al., CVPR 2023), the
    official main setting ``DINO+Point_MAE+Fusion`` (three memory banks, UFF, decision-layer fusion).

    Defaults are the official code's (``main.py`` argparse defaults and the README's command for the
    full setting: ``--use_uff --memory_bank multiple``).

    Args:
        backbone: timm name of the frozen RGB ViT (official ``vit_base_patch8_224_dino``, DINO ViT-B/8).
        pretrained: True: timm's weights for the name (a clear error offline); a path: the DINO release
            file ``dino_vitbase8_pretrain.pth`` or timm's weights file; False: random weights (tests only).
        point_checkpoint: Point-MAE's pre-trained checkpoint (official ``checkpoints/pointmae_pretrain.pth``,
            Point-MAE's ``pretrain.pth``); None: random weights seeded by ``seed`` (tests only).
        image_size: side (or [height, width]) of the images, clouds and maps (official 224).
        official_checkpoint: the UFF block's weights (official ``--fusion_module_path``, e.g. the
            released ``checkpoints/checkpoint-0.pth``, or one written by ``python -m
            anomalib_zsad.models.m3dm.pretrain``); None: a random UFF seeded by ``seed`` (a warning).
        num_group: Point-MAE groups per cloud (official 1024).
        group_size: points per group (official 128).
        point_batch_statistics: Point-MAE's BatchNorm from each cloud's statistics, as the official
            code runs it (it never calls ``.eval()``); False: the checkpoint's running statistics.
        point_drop_path: Point-MAE's stochastic depth drawn anew at every forward, as the official
            code runs it; False (default here): deterministic features (see the README).
        f_coreset: coreset fraction of the point bank (official 0.1; the RGB and fused banks keep
            ``int(f * n_point)``, as the official code).
        coreset_eps: ``eps`` of the sparse random projection before the coreset (official 0.9).
        coreset_float16: the greedy coreset loop in float16 (official).
        n_reweight: bank neighbours of the score's re-weighting (official 3).
        blur_radius: radius of the 8-bit Gaussian blur of the maps (official 4).
        xyz_s_lambda: weight of the point score before the detection SVM (official 1).
        rgb_s_lambda: weight of the RGB score (official 0.1).
        fusion_s_lambda: weight of the fused score (official 1).
        xyz_smap_lambda: weight of the point map before the segmentation SVM (official 1).
        rgb_smap_lambda: weight of the RGB map (official 0.1).
        fusion_smap_lambda: weight of the fused map (official 1).
        ocsvm_nu: ``nu`` of the two ``SGDOneClassSVM`` (official 0.5).
        ocsvm_maxiter: their ``max_iter`` (official 1000).
        ocsvm_seed: their ``random_state`` (official 42).
        max_sample: the official limit of training samples: the first ``max_sample + 1`` are used
            (the official loop stops once its counter exceeds it; 400: every MVTec 3D-AD class fits).
        seed: random weights (tests), the random UFF, the projection of the coreset (officially
            numpy's global generator after ``set_seeds(0)``) and stochastic-depth draws.
        method_name: the official ``--method_name``: ``DINO+Point_MAE+Fusion`` (the main setting:
            three banks, UFF, decision-layer SVMs), or one memory bank alone: ``DINO`` (RGB patches,
            normalised by their own mean and std), ``Point_MAE`` (point patches) or ``Fusion`` (UFF
            patches); their re-weighted score and blurred map are the outputs (no SVM; the ``*_lambda``
            and ``ocsvm_*`` arguments are unused); or ``DINO+Point_MAE``: the point and RGB banks
            without UFF and two 2-input SVMs (distances divided by 1000 in the re-weighting, as
            officially). ``DINO+Point_MAE+add`` is refused (not implemented; see the README).
        allow_backbone_mismatch: run a checkpoint on other backbones or another image size than it was fitted with.
        pre_processor: anomalib pre-processor; True = bicubic resize to ``image_size`` and ImageNet normalisation.
        post_processor: anomalib post-processor; True = thresholds from validation, scores unnormalised.
        evaluator: anomalib evaluator; True = the papers' metrics (image/pixel AUROC, AUPRO, F1-max, AP).
        visualizer: anomalib visualizer; True = the default one.
    """

    untrained_scores = "empty memory banks (distances to a zero vector)"
    frozen_prefixes = ("model.rgb_backbone.", "model.point_backbone.")
    paper_max_epochs = 1
    needs_point_clouds = True
    #: its memory banks come from the target category's normal samples (PatchCore's protocol): the
    #: benchmark fits it on the target, as PatchCore, not on auxiliary data
    trains_on_target_normals = True

    def __init__(
        self,
        backbone: str = "vit_base_patch8_224_dino",
        pretrained: bool | str | None = True,
        point_checkpoint: str | os.PathLike | None = POINTMAE_DEFAULT,
        image_size: int | Sequence[int] = 224,
        official_checkpoint: str | os.PathLike | None = None,
        num_group: int = 1024,
        group_size: int = 128,
        point_batch_statistics: bool = True,
        point_drop_path: bool = False,
        f_coreset: float = 0.1,
        coreset_eps: float = 0.9,
        coreset_float16: bool = True,
        n_reweight: int = 3,
        blur_radius: float = 4.0,
        xyz_s_lambda: float = 1.0,
        rgb_s_lambda: float = 0.1,
        fusion_s_lambda: float = 1.0,
        xyz_smap_lambda: float = 1.0,
        rgb_smap_lambda: float = 0.1,
        fusion_smap_lambda: float = 1.0,
        ocsvm_nu: float = 0.5,
        ocsvm_maxiter: int = 1000,
        ocsvm_seed: int = 42,
        max_sample: int = 400,
        seed: int = 0,
        method_name: str = "DINO+Point_MAE+Fusion",
        allow_backbone_mismatch: bool = False,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        self._collected = 0
        self.init_contract(pre_processor, official_checkpoint)

    # --- the contract --------------------------------------------------------------------------

    @classmethod
    def configure_pre_processor(cls, image_size: int | Sequence[int] | None = None) -> PreProcessor:
        """Bicubic resize to ``image_size`` (official 224, Pillow's bicubic on the 8-bit image) and
        ImageNet normalisation, as the official loader."""
        return imagenet_pre_processor(image_size or 224, InterpolationMode.BICUBIC)

    @classmethod
    def configure_visualizer(cls) -> Any:  # noqa: ANN401
        """The plugin's visualizer with the depth (the cloud's z channel) as one more panel
        (:mod:`.visualizer`): anomalib draws no ``depth_map``."""
        from .visualizer import DepthVisualizer

        return DepthVisualizer()

    @staticmethod
    def configure_optimizers() -> None:
        """Nothing is optimised: the memory banks and SVMs are fitted at the end of the epoch."""
        return

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """As anomalib's PatchCore: no sanity validation (the banks are empty before the epoch)."""
        return {"gradient_clip_val": 0, "num_sanity_val_steps": 0}

    def check_backbone(self, check: ArgumentCheck, settings: dict[str, Any]) -> Any:  # noqa: ANN401
        """A timm ViT name; an image size of at least 32 px (off the patch grid: a warning)."""
        name = settings.get("backbone")
        check.require(is_vit_name(name), f"backbone must be the name of a timm ViT, got {name!r}")
        patch = patch_size_of(name) if isinstance(name, str) else None
        check.image_size(settings.get("image_size"), patch)
        size = settings.get("image_size")
        sides = [size] * 2 if isinstance(size, int) else list(size or [])
        check.require(not sides or not all(isinstance(v, int) for v in sides) or min(sides) >= MIN_IMAGE_SIZE,
                      f"image_size must be at least {MIN_IMAGE_SIZE} px, got {size!r}")
        return patch

    def check_arguments(self, check: ArgumentCheck, settings: dict[str, Any], arch: Any) -> None:  # noqa: ANN401
        del arch
        method = settings["method_name"]
        check.require(method in METHODS, f"method_name must be one of {list(METHODS)} (the official setting "
                      f"DINO+Point_MAE+add is not implemented), got {method!r}")
        for name in ("num_group", "group_size", "n_reweight", "ocsvm_maxiter", "max_sample"):
            value = settings[name]
            check.require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                          f"{name} must be a positive integer, got {value!r}")
        reweight = settings["n_reweight"]
        check.require(not isinstance(reweight, int) or reweight >= 2,
                      f"n_reweight must be at least 2 (the match and one neighbour), got {reweight!r}")
        check.require(isinstance(settings["f_coreset"], (int, float)) and 0 < settings["f_coreset"] <= 1,
                      f"f_coreset must be in (0, 1], got {settings['f_coreset']!r}")
        check.require(isinstance(settings["coreset_eps"], (int, float)) and 0 < settings["coreset_eps"] < 1,
                      f"coreset_eps must be in (0, 1), got {settings['coreset_eps']!r}")
        check.require(isinstance(settings["ocsvm_nu"], (int, float)) and 0 < settings["ocsvm_nu"] <= 1,
                      f"ocsvm_nu must be in (0, 1], got {settings['ocsvm_nu']!r}")
        check.positive("blur_radius", settings["blur_radius"], zero=True)
        for name in ("xyz_s_lambda", "rgb_s_lambda", "fusion_s_lambda", "xyz_smap_lambda", "rgb_smap_lambda",
                     "fusion_smap_lambda"):
            check.positive(name, settings[name], zero=True)

    def load_backbone(self, settings: dict[str, Any]) -> dict[str, nn.Module]:
        from anomalib_zsad.pointcloud import PointMAEEncoder, load_pointmae_weights

        size = settings["image_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        rgb = load_rgb_backbone(settings["backbone"], settings["pretrained"], size, seed=settings["seed"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings["seed"])
            points = PointMAEEncoder(settings["num_group"], settings["group_size"],
                                     batch_statistics=settings["point_batch_statistics"])
        if not is_random_weights(settings["point_checkpoint"]):
            load_pointmae_weights(points, settings["point_checkpoint"])
        for parameter in points.parameters():
            parameter.requires_grad_(False)
        return {"rgb": rgb, "points": points}

    def backbone_identity(self, settings: dict[str, Any]) -> dict[str, Any]:
        identity = super().backbone_identity(settings)
        if is_random_weights(settings.get("pretrained")):
            identity.update(pretrained=None, weights_sha256=None, seed=settings.get("seed"))
        point = _point_weights(settings.get("point_checkpoint"))
        identity["point_weights_sha256"] = weights_sha256(point) if point else None
        if point is None:
            identity["seed"] = settings.get("seed")
        identity["num_group"] = settings.get("num_group")
        identity["group_size"] = settings.get("group_size")
        identity["point_batch_statistics"] = settings.get("point_batch_statistics")
        return identity

    def build_model(self, backbone: dict[str, nn.Module]) -> M3DMModel:
        s = self.settings
        size = s["image_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s["seed"])
            fusion = FeatureFusionBlock(backbone["points"].out_channels, backbone["rgb"].embed_dim)
        if getattr(self, "_official_weights_path", None) is None and not self.learnt_parts_trained:
            logger.warning("M3DM: no UFF checkpoint given (--model.official_checkpoint): the fusion block is random. "
                           "Give the released checkpoint-0.pth or pre-train one (python -m "
                           "anomalib_zsad.models.m3dm.pretrain) for the paper's setting.")
        lambdas = {name.removesuffix("_lambda"): s[name] for name in (
            "xyz_s_lambda", "rgb_s_lambda", "fusion_s_lambda", "xyz_smap_lambda", "rgb_smap_lambda",
            "fusion_smap_lambda")}
        return M3DMModel(backbone["rgb"], backbone["points"], fusion, image_size=size, coreset_fraction=s["f_coreset"],
                         coreset_eps=s["coreset_eps"], coreset_float16=s["coreset_float16"], projection_seed=s["seed"],
                         n_reweight=s["n_reweight"], blur_radius=s["blur_radius"], lambdas=lambdas,
                         ocsvm_nu=s["ocsvm_nu"], ocsvm_max_iter=s["ocsvm_maxiter"], ocsvm_seed=s["ocsvm_seed"],
                         point_drop_path=s["point_drop_path"], seed=s["seed"], method=s["method_name"])

    read_official_weights = staticmethod(read_uff_checkpoint)

    @staticmethod
    def load_official_weights(model: M3DMModel, path: str | os.PathLike) -> None:
        load_uff_weights(model.fusion, path)

    def init_official_weights(self, path: Any) -> None:  # noqa: ANN401
        """The UFF checkpoint is checked now and loaded at build; unlike a trained model's weights it
        does not make the model ready (its memory banks still need the training samples)."""
        self._official_weights_path = path
        if path is not None:
            self.read_official_weights(Path(path))

    # --- training -------------------------------------------------------------------------------

    @staticmethod
    def clouds_of(batch: Any) -> torch.Tensor:  # noqa: ANN401
        clouds = getattr(batch, "depth_map", None)
        if clouds is None:
            msg = ("M3DM needs an organized point cloud per image (anomalib's depth batches: --data MVTec3D or "
                   "Folder3D, whose depth_map holds the xyz TIFF); this batch has none.")
            raise PointCloudsMissingError(msg)
        if clouds.dim() == 3:
            clouds = clouds[None]
        if clouds.shape[1] != 3:
            msg = (f"M3DM: depth_map must be organized xyz clouds [B, 3, H, W], got {list(clouds.shape)} (a depth "
                   "image with one channel is not a point cloud)")
            raise PointCloudsMissingError(msg)
        return clouds

    def on_train_epoch_start(self) -> None:
        self.model.reset_training()
        self._collected = 0

    def training_step(self, batch: Any, *args, **kwargs) -> None:  # noqa: ANN401
        """Collect the batch's patches (nothing is optimised)."""
        del args, kwargs
        clouds = self.clouds_of(batch)
        room = self.settings["max_sample"] + 1 - self._collected  # the official loop stops after max_sample + 1
        if room <= 0:
            return
        images, clouds = batch.image[:room], clouds[:room]
        self.model.add_training_batch(images, clouds)
        self._collected += images.shape[0]

    def on_train_batch_end(self, *args, **kwargs) -> None:
        """Not trained until the banks are built (at the end of the epoch)."""
        del args, kwargs

    def fit(self) -> None:
        """Build the memory banks and fit the SVMs from the collected samples."""
        with torch.inference_mode(False), torch.no_grad():
            self.model.fit()
        self.learnt_parts_trained.fill_(True)

    def on_train_epoch_end(self) -> None:
        if self.model.training_samples:
            self.fit()

    def on_validation_start(self) -> None:
        if self.is_built and self.model.training_samples:  # validation before the epoch's end
            self.fit()
        super().on_validation_start()

    # --- inference ------------------------------------------------------------------------------

    def validation_step(self, batch: Any, *args, **kwargs) -> Any:  # noqa: ANN401
        del args, kwargs
        outputs = self.model(batch.image, self.clouds_of(batch))
        return batch.update(**outputs._asdict())

    def forward(self, batch: torch.Tensor, clouds: torch.Tensor | None = None, *args, **kwargs) -> Any:  # noqa: ANN401
        """anomalib's pipeline (pre-processor, model, post-processor) on images ``[B, 3, H, W]`` in
        [0, 1] and their organized clouds ``[B, 3, h, w]``: what the torch export runs."""
        del args, kwargs
        if clouds is None:
            msg = ("M3DM takes an image and its organized point cloud: model(image, clouds). anomalib's "
                   "TorchInferencer passes images only; use anomalib_zsad.models.m3dm.M3DMInferencer.")
            raise PointCloudsMissingError(msg)
        images = self.pre_processor(batch) if self.pre_processor else batch
        outputs = self.model(images, clouds)
        return self.post_processor(outputs) if self.post_processor else outputs

    def to_onnx(self, export_root: Path | str, model_file_name: str = "model",
                input_size: tuple[int, int] | None = None, **kwargs) -> Path:
        """The scoring graph (inputs ``image`` and ``point_features``) and, beside it, the point
        front end ``point_features.pt``: the two parts of :mod:`.export`."""
        from anomalib.deploy import ExportType
        from anomalib.models.components.base.export_mixin.mixin import create_export_root

        from .export import export_scoring_graph

        self._freeze_for_export()
        root = create_export_root(export_root, ExportType.ONNX)
        return export_scoring_graph(self, root / f"{model_file_name}.onnx", input_size, **kwargs)

    def to_openvino(self, export_root: Path | str, model_file_name: str = "model", *args, **kwargs) -> Path:
        """anomalib's conversion of the ONNX graph, with the point front end copied beside the ``.xml``."""
        from .export import FRONT_END_FILE, PointFrontEnd

        path = super().to_openvino(export_root, model_file_name, *args, **kwargs)
        PointFrontEnd(self.model.point_backbone, self.model.image_size).save(Path(path).parent / FRONT_END_FILE)
        return path
