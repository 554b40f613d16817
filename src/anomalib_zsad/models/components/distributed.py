"""Loss terms over the whole batch, the same under DDP as in one process.

Lightning's DDP averages the gradients of the processes, each of which saw ``b`` images of a
global batch of ``world_size * b``. That equals one process with the global batch only for losses
that are a mean of per-image terms. A term that is a non-linear function of a batch statistic
(AA-CLIP's squared batch mean of the anchors' dot products) needs that statistic over the global
batch: :func:`global_batch_mean` gathers the per-image values of every process (a few scalars),
with gradients, so that each process's loss is the one-process loss and DDP's average of the
gradients is the one-process gradient (``docs/distributed.md``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed_world_size() -> int:
    """Processes in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_batch_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of per-image ``values`` [b, ...] over the images of every process (with gradients),
    or ``values.mean()`` in one process. Every process must call it with the same shape (DDP's
    sampler gives each process equal batches). Called from a training step only: every process
    runs it."""
    if distributed_world_size() == 1:
        return values.mean()
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(values.contiguous())).mean()
