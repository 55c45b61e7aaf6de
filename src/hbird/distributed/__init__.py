"""One torch.distributed layer: where this process sits, and the collectives hbird uses.

Launch with ``torchrun --nproc-per-node N -m hbird ...`` (``--standalone`` on one
machine needs no other setup): :func:`init_from_env` joins the group from torchrun's
environment, NCCL on GPUs, gloo on CPUs. Without a process group every helper here is
the identity (a world of one), and the callers keep their single-process code path.

Rooms built on it: :mod:`hbird.distributed.build` (bank builds split by (image, epoch)),
:mod:`hbird.distributed.bank_slice` (each rank's slice of a bank, rows fetched by global
id) and :mod:`hbird.index.sharded` (top-k across ranks). Scoring sums metric states with
:func:`sum_metric_state`.
"""

from __future__ import annotations

import copy
import datetime
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


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


_LOCAL = threading.local()  # inside local(): this process acts alone


def is_distributed() -> bool:
    """True once a process group is initialised (even a group of one), outside :func:`local`."""
    if getattr(_LOCAL, "depth", 0):
        return False
    return dist.is_available() and dist.is_initialized()


@contextmanager
def local() -> Iterator[None]:
    """Within the block this process acts as a world of one (the group stays joined):
    for work one rank does alone, e.g. one run of a sweep (:func:`spread`)."""
    _LOCAL.depth = getattr(_LOCAL, "depth", 0) + 1
    try:
        yield
    finally:
        _LOCAL.depth -= 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0 (or no process group): the process that writes shared files and prints."""
    return rank() == 0


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


def init_from_env(device: str | None = None) -> DistInfo:
    """:func:`init_distributed` when torchrun started this process on several ranks
    (``WORLD_SIZE`` > 1); otherwise nothing is initialised and the run stays single-process.
    A CUDA ``device`` (``"cuda"``) puts each rank on ``cuda:<local rank>`` under NCCL;
    anything else runs on the CPU under gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return DistInfo(rank(), world_size())
    on_gpu = device is not None and torch.device(device).type == "cuda"
    local_rank = os.environ.get("LOCAL_RANK", "0")
    return init_distributed(device=f"cuda:{local_rank}" if on_gpu else "cpu")


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _backend_device() -> torch.device:
    """Where collective tensors live: the current GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """``(n, ...)`` on every process → ``(W·n, ...)`` concatenated in rank order, no gradient."""
    if not is_distributed():
        return x.detach()
    y = x.detach().to(_backend_device()).contiguous()  # NCCL gathers CUDA tensors only
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    return torch.cat(parts).to(x.device)


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable value) on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``x`` reduced over ranks (``"sum"`` or ``"max"``), as a new tensor on ``x``'s device."""
    if not is_distributed():
        return x.clone()
    out = x.to(_backend_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return out.to(x.device)


def all_to_all(chunks: list[torch.Tensor], shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Send ``chunks[r]`` to rank ``r``; receive what every rank sent here, in rank order.

    ``shapes[r]`` is the shape of the chunk rank ``r`` sends here (all chunks share one
    dtype; sizes may differ). NCCL has a native all-to-all; under gloo every pair of ranks
    exchanges its chunks point to point (empty chunks are not sent).
    """
    if not is_distributed():
        return [chunks[0].clone()]
    device, dtype = _backend_device(), chunks[0].dtype
    send = [c.to(device).contiguous() for c in chunks]
    recv = [torch.empty(s, dtype=dtype, device=device) for s in shapes]
    me = dist.get_rank()
    if dist.get_backend() == "nccl":
        dist.all_to_all(recv, send)
    else:
        pending = [dist.isend(t, dst) for dst, t in enumerate(send) if dst != me and t.numel()]
        pending += [dist.irecv(t, src) for src, t in enumerate(recv) if src != me and t.numel()]
        recv[me] = send[me].clone()
        for request in pending:
            request.wait()
    return [r.cpu() for r in recv]


def sum_metric_state(metric: Any) -> dict[str, Any]:
    """The state of ``metric`` summed over ranks (a :class:`~hbird.metrics.StreamingMetric`).

    A metric's state is sums, so the merged state is ``E + Σ_r (S_r − E)`` with ``E`` the
    metric's empty state (a copy after ``reset()``): counts and sums add up, settings
    (``num_classes``, a depth range) stay as they are. Tensors keep their dtype, so
    int64 confusion matrices add exactly. Single process: ``metric.state_dict()``.
    """
    state = metric.state_dict()
    if not is_distributed() or dist.get_world_size() == 1:
        return state
    if not hasattr(metric, "reset"):
        raise TypeError(
            f"{type(metric).__name__} has no reset(): hbird sums metric states across ranks "
            "from the empty state a reset() gives; add one (it must zero every sum)"
        )
    empty_metric = copy.deepcopy(metric)
    empty_metric.reset()
    empty = empty_metric.state_dict()
    merged = dict(state)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            merged[key] = empty[key] + all_reduce(value - empty[key])
        elif isinstance(value, int | float) and not isinstance(value, bool):
            delta = torch.tensor(
                value - empty[key], dtype=torch.float64 if isinstance(value, float) else torch.int64
            )
            merged[key] = empty[key] + all_reduce(delta).item()
    return merged


def sum_seconds(seconds: dict[str, float]) -> dict[str, float]:
    """Per-stage seconds summed over ranks (stages any rank measured)."""
    if not is_distributed():
        return dict(seconds)
    total: dict[str, float] = {}
    for part in all_gather_object(seconds):
        for stage, value in part.items():
            total[stage] = total.get(stage, 0.0) + value
    return total


def spread(tasks: Sequence[Callable[[], T]]) -> Iterator[T]:
    """Run independent ``tasks`` across the ranks; yield every result, in task order, on
    every rank.

    Round ``t`` runs task ``t·W + r`` on rank ``r`` (alone, within :func:`local`), then
    shares the round's results, so a caller may save them round by round (a sweep stays
    resumable). One process runs and yields the tasks one by one.
    """
    world, me = world_size(), rank()
    for start in range(0, len(tasks), world):
        mine = start + me
        result: Any = None
        if mine < len(tasks):
            try:
                with local():
                    result = tasks[mine]()
            except Exception as err:  # every rank stops with it, none waits forever
                if world == 1:
                    raise
                result = _Failed(err)
        results = all_gather_object(result)
        for failed in results:
            if isinstance(failed, _Failed):
                raise failed.error
        yield from results[: len(tasks) - start]


@dataclass
class _Failed:
    error: Exception


__all__ = [
    "DistInfo",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "barrier",
    "broadcast_object",
    "cleanup_distributed",
    "gather",
    "init_distributed",
    "init_from_env",
    "is_distributed",
    "is_main",
    "local",
    "rank",
    "spread",
    "sum_metric_state",
    "sum_seconds",
    "world_size",
]
