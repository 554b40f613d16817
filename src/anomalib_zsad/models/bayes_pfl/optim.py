"""The official optimisers and schedule of Bayes-PFL (``train.py``), in plain torch.

Stage 1 trains everything with Adam (betas 0.5, 0.999) in four groups chosen by parameter name:
the prompt bank (lr 1e-3), the two temperatures (0.01), the flow parameters outside the encoders
(``PFL_*``: ``amor_*``, ``state``, ``p_mu``; 1e-3), everything else (encoders, decoders, RCA,
fusion, mappings; 1e-4), under a cosine schedule with 10 % linear warm-up. Stage 2 trains the
image classifier only (``fuse``, ``class_mapping``, ``image_mapping``; Adam 1e-4, constant).
"""

from __future__ import annotations

import math

import torch

from .torch_model import BayesPFLModel

STAGE2_MODULES = ("fuse", "class_mapping", "image_mapping")


def stage1_param_groups(model: BayesPFLModel, lr_prompt: float = 1e-3, lr_temperature: float = 0.01,
                        lr_flow: float = 1e-3, lr_linear: float = 1e-4) -> list[dict]:
    """Adam parameter groups of stage 1, in the official order (prompt, temperature, flow, other)."""
    groups: dict[str, list] = {"prompt": [], "temperature": [], "flow": [], "other": []}
    for name, param in model.named_parameters():
        if name.startswith("clip."):
            continue
        if "prompt" in name:
            groups["prompt"].append(param)
        elif "temperature" in name:
            groups["temperature"].append(param)
        elif "PFL" in name and "encoder" not in name and "decoder" not in name:
            groups["flow"].append(param)
        else:
            groups["other"].append(param)
    lrs = {"prompt": lr_prompt, "temperature": lr_temperature, "flow": lr_flow, "other": lr_linear}
    return [{"params": groups[key], "lr": lrs[key], "name": key} for key in groups]


def stage2_param_groups(model: BayesPFLModel, lr_linear: float = 1e-4) -> list[dict]:
    params = [p for n, p in model.named_parameters() if n.split(".")[0] in STAGE2_MODULES]
    return [{"params": params, "lr": lr_linear, "name": "classifier"}]


def make_adam(groups: list[dict], betas: tuple[float, float] = (0.5, 0.999)) -> torch.optim.Adam:
    return torch.optim.Adam(groups, betas=betas)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.1
                       ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``int(warmup_fraction * total_steps)`` steps, then half a cosine to 0
    (the schedule of ``transformers.get_cosine_schedule_with_warmup``, stepped every batch)."""
    warmup = int(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
