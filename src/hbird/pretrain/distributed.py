"""torch.distributed plumbing for pretraining: differentiable collectives, global batch norm.

Process setup and plain collectives are :mod:`hbird.distributed`'s (re-exported here).

Every helper works unchanged in a single process (no process group): gathers return
their input, reductions are the identity. Collectives that sit inside the loss are
differentiable, so a run on ``W`` processes with ``B / W`` images each computes the
same loss and, after DDP averages the gradients, the same update as one process with
``B`` images.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from hbird.distributed import (  # noqa: F401 - the process layer, re-exported for pretraining
    DistInfo,
    barrier,
    cleanup_distributed,
    gather,
    init_distributed,
    is_distributed,
    rank,
    world_size,
)


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


def global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Training-mode batch norm of ``x`` ``(N, C, ...)`` with statistics over the global batch.

    Sums ``Σx``, ``Σx²`` and the count over every dim but the channels and across
    processes (a differentiable all-reduce), updates ``bn``'s running statistics as
    ``torch.nn.BatchNorm*`` does, and normalises with the biased variance.
    """
    c = x.shape[1]
    dims = (0, *range(2, x.ndim))
    shape = (1, c) + (1,) * (x.ndim - 2)
    xf = full_precision(x)
    count = torch.full((1,), float(x.numel() // c), device=x.device, dtype=xf.dtype)
    totals = sum_with_grad(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
    n = totals[-1].detach()
    mean = totals[:c] / n
    var = (totals[c : 2 * c] / n - mean * mean).clamp_min(0.0)
    if bn.track_running_stats:
        with torch.no_grad():
            m = bn.momentum if bn.momentum is not None else 0.1
            unbiased = var * n / (n - 1).clamp_min(1.0)
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), m)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), m)
            bn.num_batches_tracked.add_(1)
    y = (xf - mean.view(shape)) * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


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
        return global_batch_norm(self, x)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """:class:`GlobalBatchNorm1d` for ``(N, C, H, W)`` feature maps (same state dict as
    ``BatchNorm2d``, so a converted network saves and loads as the original). In a single
    process it is ``BatchNorm2d`` (whose fused kernel is about twice as fast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not is_distributed():  # one process: torch's own kernel
            return super().forward(x)
        if x.ndim != 4:
            raise ValueError(f"GlobalBatchNorm2d expects (N, C, H, W) inputs, got {tuple(x.shape)}")
        return global_batch_norm(self, x)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Swap every ``BatchNorm2d`` inside ``module`` for this class, keeping its state."""
        if type(module) is nn.BatchNorm2d:
            bn = module
            new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
            new.load_state_dict(bn.state_dict())
            new.train(bn.training)
            like = next(iter(bn.state_dict().values()), None)
            return new if like is None else new.to(device=like.device, dtype=like.dtype)
        for name, child in module.named_children():
            converted = cls.convert(child)
            if converted is not child:
                setattr(module, name, converted)
        return module
