"""torch.distributed plumbing for pretraining: process setup, collectives, global batch norm.

Every helper works unchanged in a single process (no process group): gathers return
their input, reductions are the identity. Collectives that sit inside the loss are
differentiable, so a run on ``W`` processes with ``B / W`` images each computes the
same loss and, after DDP averages the gradients, the same update as one process with
``B`` images.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def init_distributed(
    device: str | None = None,
    backend: str | None = None,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> DistInfo:
    """Join the process group if launched on several processes; pick this process's device.

    Under ``torchrun`` the rank and world size come from the environment. ``backend``
    defaults to ``nccl`` on GPU and ``gloo`` on CPU. ``device`` defaults to
    ``cuda:<local rank>`` when CUDA is available, else ``cpu``.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    wanted = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if wanted > 1 and not is_distributed():
        explicit = {"rank": rank, "world_size": world_size, "init_method": init_method}
        dist.init_process_group(
            backend=backend or ("nccl" if dev.type == "cuda" else "gloo"),
            timeout=datetime.timedelta(minutes=30),
            **{k: v for k, v in explicit.items() if v is not None},  # else: torchrun's env
        )
    if is_distributed():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    return DistInfo(device=dev)


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """``(n, ...)`` on every process → ``(W·n, ...)`` concatenated in rank order, no gradient."""
    if not is_distributed():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every process's loss may use every row: sum their gradients, keep our slice.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather`, but gradients flow back to each process's own rows.

    Works on every backend (the backward pass is an all-reduce, not a reduce-scatter).
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


class _SumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over processes, differentiable (identity in a single process)."""
    if not is_distributed():
        return x
    return _SumWithGrad.apply(x)


@torch.no_grad()
def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """Average of ``x`` over processes, no gradient (for logging and running statistics)."""
    if not is_distributed():
        return x.detach()
    out = x.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32 (half and bfloat16 inputs are upcast, float64 is kept)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics cover the global batch, on any backend.

    ``torch.nn.SyncBatchNorm`` needs a GPU; this one sums ``Σx``, ``Σx²`` and the count
    across processes with a differentiable all-reduce, so it runs under gloo on CPU too
    and gives the statistics one process would compute on the whole batch.
    Input ``(N, C)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        if x.ndim != 2:
            raise ValueError(f"GlobalBatchNorm1d expects (N, C) inputs, got {tuple(x.shape)}")
        c = x.shape[1]
        xf = full_precision(x)
        count = torch.full((1,), float(x.shape[0]), device=x.device, dtype=xf.dtype)
        totals = sum_with_grad(torch.cat([xf.sum(0), (xf * xf).sum(0), count]))
        n = totals[-1].detach()
        mean = totals[:c] / n
        var = (totals[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
                self.num_batches_tracked.add_(1)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)
