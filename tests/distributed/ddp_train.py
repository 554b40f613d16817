"""Train plugin models for a few steps with Lightning's DDP on CPU and save what they learnt.

Run it twice with the same global batch, once in one process and once in two::

    python tests/distributed/ddp_train.py --out /tmp/w1 --devices 1 --global-batch 4 --models AnomalyCLIP
    python tests/distributed/ddp_train.py --out /tmp/w2 --devices 2 --global-batch 4 --models AnomalyCLIP

and compare ``/tmp/w1/AnomalyCLIP.pt`` with ``/tmp/w2/AnomalyCLIP.pt`` (``tests/distributed/``
does). Both runs use Lightning's ``DDPStrategy`` (gloo on CPU), Lightning's own launcher (the
script is started again for rank 1) and Lightning's ``DistributedSampler``: with one process it has
``num_replicas=1`` and the same seed, so its batch ``k`` of ``2b`` images is the union of the two
ranks' batches ``k`` of ``b`` images. The data is the tiny generated demo set (``--data``, else
generated under ``--out``), auxiliary training on two categories and the target on a third, as in
``tests/models/test_contract_flow.py``; the CLIP is the tiny random ``zsad-tiny``.

Written for each model under ``--out`` (by rank 0; every rank writes its own ``<model>.rank<r>.pt``):

* ``<model>.pt``: the learnt state (trainable parameters and the buffers outside the frozen
  backbone) after training;
* ``<model>.json``: what DDP synchronised (parameters and buffers it broadcasts, elements, the
  names it was told to ignore), the number of optimiser steps and, with ``--test``, the metrics of
  ``Engine.validate``/``Engine.test`` on the target and the post-processor's thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

TINY = {"backbone": "zsad-tiny", "pretrained": None, "image_size": 64}
#: short schedules that still run every stage (as ``tests/models/test_contract_flow.py``)
SETTINGS: dict[str, dict[str, Any]] = {
    "AACLIP": {"text_epochs": 1, "image_epochs": 1},
    "BayesPFL": {"prompt_num": 2, "num_flows": 2, "num_samples": 2, "sample_chunk_size": 2, "topk": 16,
                 "stage1_epochs": 1},
    "AdaCLIP": {"round_prompts_to_fp16": False, "k_clusters": 4},
    "BGAD": {"backbone": "resnet18", "layers": [1, 2], "pretrained": False, "image_size": 64, "coupling_layers": 2,
             "pos_embed_dim": 16, "flow_batch_size": 64, "permute_soft": False, "meta_epochs": 2, "sub_epochs": 1},
}
#: epochs that run every stage of a model's schedule (one epoch: 3 steps of the global batch 4)
EPOCHS = {"AACLIP": 2, "BayesPFL": 2, "BGAD": 2}


class DDPReport(Callback):
    """What the strategy synchronises, read once the model is wrapped."""

    def __init__(self) -> None:
        self.facts: dict[str, Any] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        wrapped = trainer.strategy.model
        ignored = set(getattr(wrapped, "parameters_to_ignore", ()))
        params = [(n, p) for n, p in pl_module.named_parameters() if n not in ignored]
        buffers = [(n, b) for n, b in pl_module.named_buffers() if n not in ignored]
        self.facts = {
            "strategy": type(trainer.strategy).__name__,
            "world_size": trainer.world_size,
            "wrapped": type(wrapped).__name__,
            "find_unused_parameters": bool(getattr(wrapped, "find_unused_parameters", False)),
            "ignored_names": len(ignored),
            "ignored_elements": sum(t.numel() for n, t in [*pl_module.named_parameters(), *pl_module.named_buffers()]
                                    if n in ignored),
            "broadcast_parameters": len(params),
            "broadcast_buffers": len(buffers),
            "broadcast_elements": sum(t.numel() for _, t in params + buffers),
            "reduced_parameters": sum(1 for _, p in params if p.requires_grad),
            "reduced_elements": sum(p.numel() for _, p in params if p.requires_grad),
            "train_batch_size": trainer.train_dataloader.batch_size
            if getattr(trainer.train_dataloader, "batch_size", None) else None,
        }


def learnt_state(model: LightningModule) -> dict[str, torch.Tensor]:
    """Trainable parameters and the buffers outside the frozen backbone, on CPU."""
    frozen = tuple(model.frozen_prefixes)
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().cpu().clone() for n, b in model.named_buffers()
                  if not n.startswith(frozen) and not n.startswith(("post_processor.", "evaluator."))})
    return state


def datamodule(name: str, root: Path, batch: int, eval_batch: int) -> Any:
    from anomalib.data import MVTecAD

    import anomalib_zsad.models as models
    from anomalib_zsad.data import CrossDataset
    from anomalib_zsad.data.few_anomalies import FewAnomalies

    if getattr(models, name).learns_from_anomalies:
        return FewAnomalies(MVTecAD(root=root, category="coffee", train_batch_size=batch, eval_batch_size=eval_batch,
                                    num_workers=0, seed=0), k=2, seed=0)
    return CrossDataset(train=MVTecAD(root=root), test=MVTecAD(root=root, category="coffee"),
                        train_categories=["brick", "grass"], train_batch_size=batch, eval_batch_size=eval_batch,
                        num_workers=0, seed=0)


def run(name: str, args: argparse.Namespace, root: Path) -> None:
    from anomalib.engine import Engine

    import anomalib_zsad.models as models

    seed_everything(args.seed, workers=True)
    model = getattr(models, name)(**{**TINY, **SETTINGS.get(name, {}), **args.settings.get(name, {})})
    stem = name + args.tag
    batch = args.global_batch // args.devices
    data = datamodule(name, root, batch, args.eval_batch // args.devices)
    report = DDPReport()
    # anomalib's Engine.fit makes a new version folder in every process (v0, v1: docs/distributed.md).
    # For every model after the first, both processes already run and would race for the same name:
    # each process gets a folder of its own.
    local_rank = os.environ.get("LOCAL_RANK", "0")  # set by Lightning's launcher in the processes it starts
    process_root = args.out / "runs" / name / f"rank{local_rank}"
    engine = Engine(accelerator="cpu", strategy="ddp", devices=args.devices, max_epochs=EPOCHS.get(name, 1),
                    default_root_dir=process_root, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=1.0 if name in args.test else 0, callbacks=[report], deterministic=True)
    facts: dict[str, Any] = {}
    _ = model.model  # built as setup("fit") builds it (in every process: their models must be alike)
    if local_rank == "0":  # the starting point of the learnt state
        torch.save(learnt_state(model), args.out / f"{stem}.init.pt")
    if model.has_learnt_parts:
        engine.fit(model, datamodule=data)
        facts.update(report.facts, global_step=engine.trainer.global_step)
    if name in args.test:
        facts["validate"] = engine.validate(model, datamodule=data)[0] if not model.has_learnt_parts else None
        facts["test"] = engine.test(model, datamodule=data, verbose=False)[0]
        post = model.post_processor
        facts["thresholds"] = {k: float(getattr(post, k)) for k in ("image_threshold", "pixel_threshold")}
        visualizer = getattr(model, "visualizer", None)
        facts["display_range"] = [getattr(visualizer, "map_min", None), getattr(visualizer, "map_max", None)]
        facts["images_written"] = len(list((args.out / "runs" / name).rglob("images/**/*.png")))
    rank = engine.trainer.global_rank
    torch.save(learnt_state(model), args.out / f"{stem}.rank{rank}.pt")
    if rank == 0:
        torch.save(learnt_state(model), args.out / f"{stem}.pt")
        (args.out / f"{stem}.json").write_text(json.dumps(facts, indent=1, default=float))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the learnt states and reports")
    parser.add_argument("--models", default="AnomalyCLIP", help="comma-separated plugin model names")
    parser.add_argument("--devices", type=int, default=2, help="processes (1: the one-process reference)")
    parser.add_argument("--global-batch", type=int, default=4, help="images per optimiser step over all processes")
    parser.add_argument("--eval-batch", type=int, default=4, help="evaluation images per step over all processes")
    parser.add_argument("--data", type=Path, default=None, help="demo set (MVTec layout); default: generated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", type=json.loads, default={},
                        help='constructor settings by model, as JSON: {"AnomalyCLIP": {"round_deep_prompts_to_fp16": false}}')
    parser.add_argument("--tag", default="", help="suffix of the written file names")
    parser.add_argument("--test", default="", type=lambda names: [n for n in names.split(",") if n],
                        help="comma-separated models to validate/test on the target after training (metrics reported)")
    args = parser.parse_args(argv)
    if args.global_batch % args.devices or args.eval_batch % args.devices:
        parser.error("--global-batch and --eval-batch must be multiples of --devices")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    root = args.data
    if root is None:
        root = args.out / "zsad_demo"
        if "LOCAL_RANK" not in os.environ:  # rank 0, before it starts the other ranks
            from anomalib_zsad.data.demo import make_demo_dataset

            make_demo_dataset(root, seed=0, categories=("brick", "grass", "coffee"), image_size=64, n_train=2,
                              n_test_good=2, n_test_defect=4)
    for name in args.models.split(","):
        run(name.strip(), args, root)


if __name__ == "__main__":
    sys.exit(main())
