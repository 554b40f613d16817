"""``global_batch_mean`` under two gloo processes: the loss and the DDP-averaged gradient of a
squared batch mean (AA-CLIP's orthogonality term) are the one-process ones.

The helper's module is loaded from its file, so the two processes import torch only (the plugin's
package would import anomalib: seconds per process).
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODULE = Path(__file__).resolve().parents[2] / "src" / "anomalib_zsad" / "models" / "components" / "distributed.py"


def _helper() -> object:
    spec = importlib.util.spec_from_file_location("zsad_distributed_helper", MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.global_batch_mean


def _loss(weight: torch.Tensor, x: torch.Tensor, mean) -> torch.Tensor:
    """A per-image term (mean of squares) plus a squared batch mean, like AA-CLIP's stage-1 loss."""
    values = x @ weight
    return (values**2).mean() + 0.1 * mean(values) ** 2


def _worker(rank: int, port: int, x: torch.Tensor, weight: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        w = weight.clone().requires_grad_(True)
        local = x[rank * 3:(rank + 1) * 3]  # DistributedSampler-like halves of the global batch of 6
        loss = _loss(w, local, _helper())
        loss.backward()
        grad = w.grad.clone()
        dist.all_reduce(grad)
        grad /= 2  # what DDP does with the processes' gradients
        torch.save({"grad": grad}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_is_the_plain_mean() -> None:
    values = torch.arange(6.0)
    assert _helper()(values) == values.mean()


@pytest.mark.slow
def test_two_processes_give_the_one_process_loss_and_gradient(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(6, 5, generator=generator, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(_free_port(), x, weight, out), nprocs=2, start_method="spawn")
    w = weight.clone().requires_grad_(True)
    _loss(w, x, torch.mean).backward()
    for rank in (0, 1):
        result = torch.load(f"{out}.{rank}", weights_only=True)
        torch.testing.assert_close(result["grad"], w.grad, rtol=1e-12, atol=1e-12)
    # without the gathered mean, DDP's average gradient would not be the one-process one
    w_local = [weight.clone().requires_grad_(True) for _ in range(2)]
    for rank, w_rank in enumerate(w_local):
        _loss(w_rank, x[rank * 3:(rank + 1) * 3], torch.mean).backward()
    naive = (w_local[0].grad + w_local[1].grad) / 2
    assert not torch.allclose(naive, w.grad, rtol=1e-6, atol=1e-9)
