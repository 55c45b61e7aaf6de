"""The training loop hbird's trainers share: pretraining and the panoptic specialists.

:class:`TrainingLoop` holds what does not depend on what is trained: the loop over
batches to ``total_steps`` with logging (``metrics.jsonl`` and a log line with the time
left), periodic and final checkpoints, resuming from ``trainer_state.safetensors``
(:mod:`hbird.pretrain.checkpoint`), the optimizer step (finite-loss check, gradient
clipping), DDP wrapping, losses averaged over processes for logging, and torch's CPU
threads fitted to this process's cores. A trainer sets the attributes listed on the
class and implements :meth:`~TrainingLoop.batches`, :meth:`~TrainingLoop.train_step`
and :meth:`~TrainingLoop.save`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hbird.io.files import write_json
from hbird.pretrain import checkpoint as ckpt
from hbird.pretrain.data import EpochSampler
from hbird.pretrain.distributed import DistInfo, barrier, full_precision, mean_over_processes
from hbird.threads import cpu_threads


@dataclass(frozen=True)
class LoopSettings:
    """The settings of the loop every trainer's config shares (its own fields follow).

    Attributes:
        log_every, save_every: intervals in steps (0 = only at the end).
        seed: everything random.
        device: ``None`` = ``cuda:<local rank>`` if available else ``cpu``.
        amp: bfloat16 autocast on GPU (never on CPU).
        resume: continue from ``out/trainer_state.safetensors``.
    """

    log_every: int = 10
    save_every: int = 0
    seed: int = 0
    device: str | None = None
    amp: bool = True
    resume: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def silent(_: str) -> None:
    """Log sink of the non-main processes."""


def no_buffer_broadcast() -> dict[str, bool]:
    """DDP's option to skip re-broadcasting buffers every forward (renamed in newer torch)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in params
        else {"broadcast_buffers": False}
    )


def process_cores() -> int:
    """CPU cores this process may keep busy: the cores it may run on, divided among the
    ``LOCAL_WORLD_SIZE`` processes ``torchrun`` starts on the machine (0 if fewer than them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def format_seconds(seconds: float) -> str:
    """``75 → "1m15s"``, ``3725 → "1h02m"``, ``9 → "9s"``: a duration to read at a glance."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def loader_workers(requested: int, log: Callable[[str], None]) -> int:
    """``requested`` data-loader workers capped at this process's cores (said in the log)."""
    workers = min(requested, process_cores())
    if workers < requested:
        log(
            f"num_workers {requested} is more than this process's share of the CPU "
            f"cores; using {workers} data-loader worker(s)"
        )
    return workers


class TrainingLoop:
    """The shared loop (module docstring).

    Attributes a trainer sets in its ``__init__``:
        config: a dataclass with ``out``, ``resume``, ``log_every``, ``save_every``,
            ``clip_grad`` (0 = off), ``to_dict()`` and optionally ``eval_every``.
        dist, device, out, log_fn: where it runs and writes (see :meth:`start`).
        module: the ``nn.Module`` whose state is saved and resumed.
        model: ``module`` or its DDP wrapper (:meth:`wrap`), what the step calls.
        optimizer, loader (or None) and its sampler, total_steps, step.
        log_name: the prefix of log lines; resume_keys: config fields a resumed run must
            share with the saved one.
    """

    log_name: str = "train"
    resume_keys: tuple[str, ...] = ()

    def start(self, config: Any, dist: DistInfo | None, log: Callable[[str], None] | None) -> None:
        """Set ``config``, ``dist``, ``device``, ``out``, ``log_fn`` and ``step = 0``."""
        self.config = config
        self.dist = dist or DistInfo(device=torch.device(config.device or "cpu"))
        self.device = self.dist.device
        self.out = Path(config.out)
        self.log_fn = log if log is not None else (print if self.dist.is_main else silent)
        self.step = 0

    def wrap(self, module: nn.Module, **ddp_options: Any) -> nn.Module:
        """``module`` in DDP when there are several processes, else itself."""
        if self.dist.world_size == 1:
            return module
        return nn.parallel.DistributedDataParallel(
            module,
            device_ids=[self.device] if self.device.type == "cuda" else None,
            **ddp_options,
        )

    def epoch_loader(
        self,
        dataset: Dataset,
        batch_size: int,
        num_workers: int,
        seed: int,
        collate_fn: Callable[[list[Any]], Any],
    ) -> tuple[DataLoader, EpochSampler]:
        """A loader of this process's share of each global batch of ``batch_size``, in the
        seeded order of :class:`~hbird.pretrain.data.EpochSampler` (``dataset`` has
        ``set_epoch``); :meth:`epoch_batches` reads it from the current step on."""
        sampler = EpochSampler(len(dataset), batch_size, self.dist.rank, self.dist.world_size, seed)
        loader = DataLoader(
            dataset,
            batch_size=sampler.local_batch,
            sampler=sampler,
            num_workers=loader_workers(num_workers, self.log_fn),
            collate_fn=collate_fn,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
        )
        return loader, sampler

    def epoch_batches(self) -> Iterator[Any]:
        """``self.loader``'s batches from the current step on, across epoch boundaries."""
        per_epoch = self.sampler.batches_per_epoch
        epoch, offset = divmod(self.step, per_epoch)
        while True:
            self.sampler.set_position(epoch, offset)
            self.loader.dataset.set_epoch(epoch)
            yield from self.loader
            epoch, offset = epoch + 1, 0

    # -- hooks ----------------------------------------------------------------------------
    def batches(self) -> Iterator[Any]:
        """Batches from the current step on."""
        raise NotImplementedError

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimizer step; returns what to log (losses, learning rate...)."""
        raise NotImplementedError

    def save(self) -> None:
        """Write the run's checkpoints (main process), then :func:`barrier`."""
        raise NotImplementedError

    @property
    def evaluates(self) -> bool:
        """Whether :meth:`evaluate` measures anything (before, during, after training)."""
        return False

    def evaluate(self) -> dict[str, float]:
        return {}

    # -- one step -------------------------------------------------------------------------
    def optimize(self, loss: torch.Tensor) -> float:
        """Backward, clip to ``config.clip_grad``, optimizer step; returns the gradient norm.

        Raises:
            FloatingPointError: the loss is not finite (nothing is updated).
        """
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the loss is {loss.item()} at step {self.step}; lower --lr or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.config.clip_grad if self.config.clip_grad > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        return float(grad_norm)

    @staticmethod
    def averaged(losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """Scalar losses averaged over processes, as floats (for the log)."""
        names = sorted(losses)
        values = mean_over_processes(
            torch.stack([full_precision(losses[k].detach()) for k in names])
        )
        return {k: float(v) for k, v in zip(names, values.tolist())}

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps``; returns the last logged record (with the final eval).

        On a CPU, torch's threads are lowered for the run so that they and the loader's
        workers fit in this process's cores (tiny models otherwise spend most of their
        time in threads waiting on each other), and restored afterwards.
        """
        if self.device.type != "cpu":
            return self._fit()
        workers = self.loader.num_workers if self.loader is not None else 0
        with cpu_threads(process_cores() - workers):
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        self._maybe_resume()  # before the folder is made: a refused --resume leaves nothing
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier()
        if self.dist.is_main:
            write_json(self.out / "config.json", cfg.to_dict())
        last: dict[str, Any] = {"step": self.step}
        if self.step == 0 and self.evaluates:
            last.update(self.evaluate())
            self._record(last)
        if self.step >= self.total_steps:
            return last
        eval_every = getattr(cfg, "eval_every", 0)
        timer, timed_from = time.perf_counter(), self.step
        for batch in self.batches():
            record: dict[str, Any] = {"step": self.step + 1, **self.train_step(batch)}
            done = self.step >= self.total_steps
            log_now = done or bool(cfg.log_every and self.step % cfg.log_every == 0)
            eval_now = self.evaluates and (done or bool(eval_every and self.step % eval_every == 0))
            if log_now:
                record["step_time"] = (time.perf_counter() - timer) / (self.step - timed_from)
            if eval_now:
                record.update(self.evaluate())
            if log_now or eval_now:
                left = (self.total_steps - self.step) * record.get("step_time", 0.0)
                self._record(record, f" eta {format_seconds(left)}" if log_now and not done else "")
                timer, timed_from = time.perf_counter(), self.step
            if done or (cfg.save_every and self.step % cfg.save_every == 0):
                self.save()
            last = record
            if done:
                break
        return last

    # -- files ----------------------------------------------------------------------------
    def _record(self, record: dict[str, Any], note: str = "") -> None:
        """Append ``record`` to ``metrics.jsonl`` and log it, followed by ``note``."""
        if not self.dist.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        shown = " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
        )
        self.log_fn(f"[{self.log_name}] {shown}{note}")

    def save_state(self) -> None:
        """Write ``trainer_state.safetensors`` (module, optimizer, step, config) for resuming."""
        ckpt.save_state(
            self.module,
            self.optimizer,
            self.step,
            self.out / ckpt.STATE_NAME,
            self.config.to_dict(),
        )

    def _maybe_resume(self) -> None:
        must_match = {key: getattr(self.config, key) for key in self.resume_keys}
        resumed = ckpt.resume_state(
            self.out, self.config.resume, self.module, self.optimizer, must_match
        )
        if resumed is not None:
            self.step = resumed[0]
            self.log_fn(f"resumed from {self.out / ckpt.STATE_NAME} at step {self.step}")
