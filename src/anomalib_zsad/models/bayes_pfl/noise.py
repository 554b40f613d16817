"""Where Bayes-PFL's Monte-Carlo noise comes from: a private generator, or draws given by the caller.

The official code samples with ``torch.randn_like`` (the global RNG), so its scores change with
everything else that consumes random numbers. Here every draw comes from a ``torch.Generator``
seeded by the model's ``seed``, drawn on the CPU (so CPU and GPU runs give the same numbers), or
is injected (parity tests feed the official draws).

Inference uses **common random numbers**: the same R draws of the context noise for every
image, and one set of state draws for the whole test set (the official code also fixes the state
samples, at the first test image). So an image's score depends on the image alone, not on its
batch or its position in the test set, and exported graphs are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptNoise:
    """Standard-normal noise for the three prompt flows.

    ``context``: [R, E] (shared by all images) or [B, R, E] (per image); ``normal`` and
    ``abnormal``: [R, E]. In training R = 1 and ``context`` is [B, E] or [B, 1, E].
    """

    context: torch.Tensor
    normal: torch.Tensor
    abnormal: torch.Tensor

    def context_for(self, batch: int) -> torch.Tensor:
        """The context noise as [B, R, E]."""
        ctx = self.context
        if ctx.dim() == 2:
            ctx = ctx[None].expand(batch, -1, -1)
        if ctx.shape[0] != batch:
            msg = f"context noise is for {ctx.shape[0]} images, the batch has {batch}"
            raise ValueError(msg)
        return ctx

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptNoise:
        return PromptNoise(*(t.to(device=device, dtype=dtype) for t in (self.context, self.normal, self.abnormal)))


def draw_noise(generator: torch.Generator, num_samples: int, dim: int, batch: int | None = None) -> PromptNoise:
    """Draw in the official call order (context, normal state, abnormal state), on the CPU."""
    shape = (num_samples, dim) if batch is None else (batch, num_samples, dim)
    context = torch.randn(shape, generator=generator)
    normal = torch.randn(num_samples, dim, generator=generator)
    abnormal = torch.randn(num_samples, dim, generator=generator)
    return PromptNoise(context, normal, abnormal)
