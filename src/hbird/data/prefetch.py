"""Read the next batch while the encoder runs: DataLoader workers over any ``load(i)``.

Decoding and resizing images is CPU work that does not need the encoder's threads; with
``workers > 0`` it runs in worker processes (forked, so ``load`` need not pickle) ahead of
the consumer, batches still yielded in the order asked for. Each item is computed by the
same ``load(i)`` call as without workers (augmentations are seeded per item, never by a
worker's state), so results are identical.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def worker_count(workers: int) -> int:
    """``workers`` capped at this machine's cores (never more workers than cores)."""
    if workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}")
    return min(workers, os.cpu_count() or 1)


class _Items(torch.utils.data.Dataset):
    """``load(i)`` as ``(True, item)``, or ``(False, the exception it raised)``: a worker's
    error is raised again in the consumer as it was (not wrapped in a worker traceback)."""

    def __init__(self, load: Callable[[int], Any]) -> None:
        self.load = load

    def __getitem__(self, i: int) -> tuple[bool, Any]:
        try:
            return True, self.load(i)
        except Exception as err:  # noqa: BLE001 - handed to the consumer, raised there
            return False, err


def _unwrapped(results: list[tuple[bool, Any]]) -> list[Any]:
    for ok, value in results:
        if not ok:
            raise value
    return [value for _, value in results]


def prefetched(
    load: Callable[[int], T], batches: Sequence[Sequence[int]], workers: int = 0
) -> Iterator[list[T]]:
    """``[load(i) for i in batch]`` for every batch of ``batches``, in order.

    Args:
        load: reads one item (an image, a sample...).
        batches: index lists, one per yielded batch.
        workers: worker processes loading ahead (capped at the core count); 0 loads in
            this process when each batch is asked for.
    """
    workers = worker_count(workers)
    if workers == 0 or "fork" not in multiprocessing.get_all_start_methods():
        for batch in batches:
            yield [load(i) for i in batch]
        return
    loader = torch.utils.data.DataLoader(
        _Items(load),
        batch_sampler=[list(b) for b in batches],
        num_workers=workers,
        collate_fn=list,
        multiprocessing_context="fork",
    )
    for results in loader:
        yield _unwrapped(results)
