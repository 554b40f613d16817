r"""UFF pre-training: M3DM's unsupervised feature fusion block learnt by a patch-wise contrastive
loss, on CPU or any Lightning strategy (DDP included), instead of the official
``fusion_pretrain.py`` (which needs ``torch.distributed``, CUDA, ``torch._six`` and tensorboard).

Two steps, as officially:

1. **features** (the official ``main.py --method_name DINO+Point_MAE --save_feature``): for every
   training sample of the given categories, the point patches ``[P, 1152]`` and the RGB patches
   paired with them, concatenated ``[P, 1152 + 768]`` and saved one file per sample. The official
   pairing (``pairing="tile"``) is the one of ``DoubleRGBPointFeatures``: the 28x28 RGB rows
   repeated 4 times and interleaved (``rgb.repeat(4, 1).reshape(784, 4, C).permute(1, 0, 2)``),
   *not* the 2x upsampling that inference pairs them with; ``pairing="upsample"`` trains on the
   inference pairing instead.
2. **training** (``fusion_pretrain.py`` + ``engine_fusion_pretrain.py``): AdamW (betas 0.9/0.95;
   the official script parses ``--weight_decay 1.5e-6`` but never passes it, so AdamW's default
   0.01 applies, as here), the learning rate warmed up linearly for ``warmup_epochs`` then a
   half-cycle cosine to ``min_lr`` (set per step from the fractional epoch), gradient accumulation,
   the README's run: ``--lr 0.003 --batch_size 16 --accum_iter 16``, 10 epochs. The loss of each
   process is its own batch's: the official labels ``arange(N) + N·rank`` only fit one process.
   A checkpoint ``checkpoint-<epoch>.pth`` (``{'model': state_dict, 'epoch': e}``, the official
   format) is written after every epoch; give it to ``--model.official_checkpoint``.

Command line::

    python -m anomalib_zsad.models.m3dm.pretrain --root datasets/MVTec3D --categories bagel cookie \
        --output checkpoints [--accelerator gpu --devices 2 --strategy ddp] [M3DM backbone options]
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from .fusion import FeatureFusionBlock

if TYPE_CHECKING:
    from .torch_model import M3DMModel

logger = logging.getLogger(__name__)

PAIRINGS = ("tile", "upsample")
POINT_FEATURE_DIM = 1152  # Point-MAE: 3 blocks x 384


def paired_rgb(rgb_patch: torch.Tensor, rgb_patch2: torch.Tensor, pairing: str = "tile") -> torch.Tensor:
    """The RGB rows paired with the point rows in the pre-training data (see the module docstring)."""
    if pairing == "upsample":
        return rgb_patch2
    if pairing != "tile":
        msg = f"pairing must be one of {list(PAIRINGS)}, got {pairing!r}"
        raise ValueError(msg)
    rows, channels = rgb_patch.shape
    factor = rgb_patch2.shape[0] // rows
    return rgb_patch.repeat(factor, 1).reshape(rows, factor, channels).permute(1, 0, 2).reshape(-1, channels)


def extract_features(model: M3DMModel, samples: Any, folder: Path, pairing: str = "tile",  # noqa: ANN401
                     transform: Any = None, prefix: str = "") -> list[Path]:  # noqa: ANN401
    """Write ``[P, C_xyz + C_rgb]`` per training sample (``samples``: items with ``image`` and
    ``depth_map``, e.g. anomalib's MVTec 3D-AD dataset) to ``folder``; returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with torch.no_grad():
        for index, item in enumerate(samples):
            image = item.image[None]
            if transform is not None:
                image = transform(image)
            features = model.extract(image, item.depth_map[None])[0]
            rgb = paired_rgb(features.rgb_patch, features.rgb_patch2, pairing)
            path = folder / f"{prefix}{index:05d}.pt"
            torch.save(torch.cat([features.xyz_patch, rgb], dim=1).contiguous(), path)
            written.append(path)
    return written


class FeatureFiles(Dataset):
    """The saved ``[P, C]`` tensors of a folder (the official ``PreTrainTensorDataset``)."""

    def __init__(self, folder: str | Path) -> None:
        self.paths = sorted(Path(folder).glob("*.pt"))
        if not self.paths:
            msg = f"no feature files (*.pt) in {folder}"
            raise FileNotFoundError(msg)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.load(self.paths[index], map_location="cpu", weights_only=True)


def mae_learning_rate(epoch: float, lr: float, epochs: int, warmup_epochs: float, min_lr: float = 0.0) -> float:
    """The MAE schedule of the official engine: linear warm-up, then a half-cycle cosine to ``min_lr``."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))


class UFFPretraining(pl.LightningModule):
    """The UFF block and its contrastive loss as a Lightning module (any device or strategy).

    Args:
        xyz_dim / rgb_dim: feature widths (1152 / 768 officially).
        lr: absolute learning rate (README run 0.003); None: ``blr * effective batch / 256``.
        blr: base learning rate (official 0.002).
        min_lr: floor of the cosine (official 0).
        warmup_epochs: linear warm-up (official 1).
        weight_decay: AdamW's (0.01: what the official optimizer gets).
        epochs: for the schedule (official 10).
        accum_iter: gradient accumulation (README run 16).
        output: folder of the ``checkpoint-<epoch>.pth`` files (None: none written).
        seed: initial weights.
    """

    def __init__(self, xyz_dim: int = 1152, rgb_dim: int = 768, lr: float | None = 0.003, blr: float = 0.002,
                 min_lr: float = 0.0, warmup_epochs: float = 1.0, weight_decay: float = 0.01, epochs: int = 10,
                 accum_iter: int = 16, output: str | Path | None = None, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.fusion = FeatureFusionBlock(xyz_dim, rgb_dim)
        self.xyz_dim = xyz_dim
        self.output = None if output is None else Path(output)
        self.automatic_optimization = False

    def _absolute_lr(self) -> float:
        if self.hparams.lr is not None:
            return float(self.hparams.lr)
        batch = self.trainer.train_dataloader.batch_size if self.trainer.train_dataloader is not None else 1
        return self.hparams.blr * batch * self.hparams.accum_iter * self.trainer.world_size / 256

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.fusion.parameters(), lr=self.hparams.lr or self.hparams.blr,
                                 betas=(0.9, 0.95), weight_decay=self.hparams.weight_decay)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        accum = self.hparams.accum_iter
        if batch_idx % accum == 0:
            batches = max(int(self.trainer.num_training_batches), 1)
            lr = mae_learning_rate(batch_idx / batches + self.current_epoch, self._absolute_lr(), self.hparams.epochs,
                                   self.hparams.warmup_epochs, self.hparams.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
        loss = self.fusion.contrastive_loss(batch[..., :self.xyz_dim], batch[..., self.xyz_dim:])
        if not torch.isfinite(loss):
            msg = f"UFF pre-training: the loss is {float(loss)}"
            raise FloatingPointError(msg)
        self.manual_backward(loss / accum)
        last = batch_idx + 1 == self.trainer.num_training_batches
        if (batch_idx + 1) % accum == 0 or last:
            optimizer.step()
            optimizer.zero_grad()
        self.log("train_loss", loss.detach(), prog_bar=True, on_epoch=True, batch_size=batch.shape[0], sync_dist=True)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        if self.output is not None and self.trainer.is_global_zero:
            self.output.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu() for k, v in self.fusion.state_dict().items()}
            torch.save({"model": state, "epoch": self.current_epoch},
                       self.output / f"checkpoint-{self.current_epoch}.pth")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="MVTec 3D-AD root (clouds with the background removed)")
    parser.add_argument("--categories", nargs="+", required=True)
    parser.add_argument("--output", default="checkpoints", help="where checkpoint-<epoch>.pth are written")
    parser.add_argument("--features", default=None, help="feature folder (default <output>/patch_lib; reused)")
    parser.add_argument("--pairing", choices=PAIRINGS, default="tile")
    parser.add_argument("--backbone", default="vit_base_patch8_224_dino")
    parser.add_argument("--pretrained", default="true", help="true, false or a weights file")
    parser.add_argument("--point-checkpoint", default="checkpoints/pointmae_pretrain.pth", help="or 'none'")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-group", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--accum-iter", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--blr", type=float, default=0.002)
    parser.add_argument("--min-lr", type=float, default=0.0)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--num-workers", type=int, default=0)
    return parser.parse_args(argv)


def _pretrained(value: str) -> bool | str:
    return {"true": True, "false": False, "none": False}.get(value.lower(), value)


def main(argv: Sequence[str] | None = None) -> Path:
    """Extract the features (unless the folder holds them), train, return the last checkpoint."""
    from anomalib_zsad.data.mvtec3d import MVTec3DFixed

    from .lightning_model import M3DM

    args = parse_args(argv)
    output = Path(args.output)
    features = Path(args.features) if args.features else output / "patch_lib"
    if not list(features.glob("*.pt")):
        point = None if args.point_checkpoint.lower() in {"none", "null", ""} else args.point_checkpoint
        model = M3DM(backbone=args.backbone, pretrained=_pretrained(args.pretrained), point_checkpoint=point,
                     image_size=args.image_size, num_group=args.num_group, group_size=args.group_size, seed=args.seed)
        for category in args.categories:
            data = MVTec3DFixed(root=args.root, category=category, num_workers=0)
            data.setup()
            written = extract_features(model.model, data.train_data, features, args.pairing,
                                       transform=model.pre_processor.transform, prefix=f"{category}_")
            logger.info("UFF pre-training: %d feature files for %s", len(written), category)
    dataset = FeatureFiles(features)
    xyz_dim = POINT_FEATURE_DIM
    rgb_dim = dataset[0].shape[-1] - xyz_dim
    module = UFFPretraining(xyz_dim=xyz_dim, rgb_dim=rgb_dim, lr=args.lr, blr=args.blr, min_lr=args.min_lr,
                            warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay, epochs=args.epochs,
                            accum_iter=args.accum_iter, output=output, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=len(dataset) >= args.batch_size,
                        num_workers=args.num_workers)
    devices = args.devices if args.devices == "auto" else int(args.devices)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator=args.accelerator, devices=devices,
                         strategy=args.strategy, logger=False, enable_checkpointing=False)
    trainer.fit(module, loader)
    last = output / f"checkpoint-{args.epochs - 1}.pth"
    print(last)
    return last


if __name__ == "__main__":
    main()
