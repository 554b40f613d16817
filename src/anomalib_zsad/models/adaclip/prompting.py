"""AdaCLIP's learnable parts, with the official module and parameter names.

The names (``text_prompter.static_prompts.N``, ``patch_token_layer.head.N`` ...) are those of the
official ``AdaCLIP_Trainer.save()`` files minus their ``clip_model.`` prefix, so a released
checkpoint maps onto this model by stripping one prefix (see ``checkpoint.py``).
"""

from __future__ import annotations

import torch
from torch import nn


class StaticPrompts(nn.Module):
    """``depth`` learnt [length, width] token blocks, one per prompted transformer block."""

    def __init__(self, depth: int, length: int, width: int, init_std: float = 0.02,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.static_prompts = nn.ParameterList(
            nn.Parameter(torch.randn(length, width, generator=generator) * init_std) for _ in range(depth))

    def __len__(self) -> int:
        return len(self.static_prompts)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.static_prompts[index]


class LinearHeads(nn.Module):
    """``count`` independent ``Linear(in, out)`` layers under ``head.N`` (the official
    ``ProjectLayer``/prompt generators): layer ``i`` makes prompt token ``i``, or projects
    feature layer ``i``."""

    def __init__(self, in_features: int, out_features: int, count: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.head = nn.ModuleList(nn.Linear(in_features, out_features) for _ in range(count))
        with torch.no_grad():  # nn.Linear's own init, drawn from a private generator
            bound = in_features**-0.5
            for layer in self.head:
                layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)
                layer.bias.copy_((torch.rand(layer.bias.shape, generator=generator) * 2 - 1) * bound)

    def __len__(self) -> int:
        return len(self.head)

    def tokens(self, feature: torch.Tensor) -> torch.Tensor:
        """One feature [B, in] -> ``count`` prompt tokens [B, count, out]."""
        return torch.stack([layer(feature) for layer in self.head], dim=1)
