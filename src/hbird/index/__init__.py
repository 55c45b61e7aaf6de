"""Nearest-neighbour backends behind one protocol (``VectorIndex``).

=========  ==========================================  ================================
name       class                                       needs
=========  ==========================================  ================================
exact      :class:`~hbird.index.exact.ExactIndex`       torch (the oracle); faiss heaps if installed
flat       :class:`FaissFlatIndex`                      faiss
ivfpq      :class:`FaissIVFPQIndex`                     faiss (trains on the first add)
ivfmm      :class:`~hbird.index.ivf_matmul.MatmulIVFIndex`  faiss heaps; bf16 matmul per list
hnsw       :class:`FaissHNSWIndex`                      faiss
scann      :class:`~hbird.index.scann_backend.ScannIndex`  scann
=========  ==========================================  ================================

``create_index("auto", dim, expected_size=N)`` picks by size, see :func:`choose_kind`.
Saved indexes are folders; :func:`load_index` reopens any of them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from hbird._optional import is_available
from hbird.errors import InputError
from hbird.index.base import EmptyIndexError, VectorIndex, read_meta
from hbird.index.exact import ExactIndex
from hbird.index.faiss_backends import FaissFlatIndex, FaissHNSWIndex, FaissIVFPQIndex
from hbird.index.ivf_matmul import MatmulIVFIndex
from hbird.index.recall import recall_at_k
from hbird.index.scann_backend import ScannIndex
from hbird.registry import Registry, check_options

__all__ = [
    "AUTO_EXACT_MAX",
    "AUTO_RECALL",
    "AUTO_EXACT_MAX_GPU",
    "EXACT_WARN_ABOVE",
    "INDEXES",
    "EmptyIndexError",
    "ExactIndex",
    "FaissFlatIndex",
    "FaissHNSWIndex",
    "FaissIVFPQIndex",
    "MatmulIVFIndex",
    "ScannIndex",
    "VectorIndex",
    "choose_kind",
    "create_index",
    "load_index",
    "recall_at_k",
]

INDEXES: Registry[type[VectorIndex]] = Registry("index")
for _cls in (
    ExactIndex,
    FaissFlatIndex,
    FaissIVFPQIndex,
    FaissHNSWIndex,
    ScannIndex,
    MatmulIVFIndex,
):
    INDEXES.register(_cls.kind, _cls)

AUTO_EXACT_MAX = 20_000
"""Up to this many keys ``auto`` uses the torch exact index on the CPU; IVF-PQ above.

Measured per 1024-patch query image (ViT-B/16 features, 768-d, 2 threads,
``benchmarks/predict.py``): at 10k keys exact 0.11 s, faiss flat 0.09 s, IVF-PQ 0.09 s
(+1.6 s build); at 100k exact 1.27 s, flat 0.97 s, IVF-PQ 0.18 s (+11 s build, recall@30
1.0); at 1M exact 12.9 s, IVF-PQ 0.40 s (+154 s build, recall@30 0.97). Brute force is
O(N·D) per query, so past a few tens of thousands of keys IVF-PQ wins by far for any run
with more than a handful of queries (and a saved bank keeps the built index). faiss's
flat index never wins by much (it is slower than torch for a 196-patch image), so
``auto`` does not use it.
"""

AUTO_RECALL = 0.9
"""Target recall@30 ``auto`` tunes IVF-PQ's ``nprobe`` and ``k_factor`` for after a build
(``index_params={"recall": 0.95}`` changes it; the measured value is in ``describe()``)."""

EXACT_WARN_ABOVE = 1_000_000
"""Without faiss ``auto`` falls back to exact search, and warns above this many keys."""

AUTO_EXACT_MAX_GPU = 4_000_000
"""On a GPU ``auto`` keeps the exact torch index (keys on the device) up to this many keys.

Brute force is what GPUs are built for: 4M float16 768-d keys take 6 GB of device
memory, and scoring a 1024-patch query image against them is ~6 TFLOP, about a third
of a second in float32 on a data-centre GPU (19.5 TFLOP/s, no TF32) and exact — where
faiss's CPU flat index would take minutes and IVF-PQ about as long, approximately.
Not measured here (this project's CI has no GPU).
"""


def choose_kind(
    expected_size: int | None,
    faiss_available: bool | None = None,
    device: str | torch.device = "cpu",
) -> str:
    """The backend ``auto`` picks for ``expected_size`` keys searched from ``device``.

    ``exact`` if faiss is missing, the size is unknown (it grows without retraining), or
    ``N <= AUTO_EXACT_MAX`` (``AUTO_EXACT_MAX_GPU`` on a CUDA device); ``ivfpq`` above.
    """
    if faiss_available is None:
        faiss_available = is_available("faiss")
    exact_max = AUTO_EXACT_MAX_GPU if torch.device(device).type == "cuda" else AUTO_EXACT_MAX
    if expected_size is None or expected_size <= exact_max:
        return "exact"
    if not faiss_available:
        if expected_size > EXACT_WARN_ABOVE:
            warnings.warn(
                f"{expected_size} keys with the exact torch index will be slow to search; "
                'install faiss (pip install "hbird[faiss]") for an approximate index',
                stacklevel=3,
            )
        return "exact"
    return "ivfpq"


def create_index(
    kind: str,
    dim: int,
    expected_size: int | None = None,
    device: str | torch.device = "cpu",
    **params: Any,
) -> VectorIndex:
    """Build an empty index of ``kind`` (a registered name or ``"auto"``) for ``dim``-d keys.

    ``expected_size`` drives the ``auto`` choice and sizes backends that use it (IVF-PQ's
    ``nlist``); ``device`` is where the exact index keeps its keys (faiss and ScaNN
    backends search on the CPU); ``params`` go to the backend's constructor.
    """
    if expected_size is not None and (isinstance(expected_size, bool) or expected_size < 0):
        raise InputError(f"create_index: expected_size must be >= 0, got {expected_size!r}")
    tunes = {"nprobe", "k_factor"} & set(params)
    if "recall" in params and tunes:
        raise InputError(
            f"index_params: recall={params['recall']} chooses nprobe and k_factor itself; "
            f"give either recall or {' and '.join(sorted(tunes))}"
        )
    if kind == "auto":
        kind = choose_kind(expected_size, device=device)
        if kind == "ivfpq" and not tunes:
            params.setdefault("recall", AUTO_RECALL)
        elif kind == "exact":
            params.pop("recall", None)  # exact search has recall 1
    if kind not in INDEXES:
        raise InputError(
            f"unknown index kind {kind!r}; choose 'auto' or one of: {', '.join(INDEXES)}"
        )
    cls = INDEXES.get(kind)
    fixed = ("dim", "expected_size", "device")
    check_options(f"index {kind!r}", cls.__init__, params, "index_params", fixed)
    if cls.uses_expected_size and expected_size:
        params.setdefault("expected_size", expected_size)
    if cls is ExactIndex:
        params.setdefault("device", device)
    return cls(dim, **params)


def load_index(path: str | os.PathLike[str]) -> VectorIndex:
    """Reopen an index folder written by ``VectorIndex.save``, whatever its kind."""
    meta = read_meta(Path(path))
    if meta["kind"] not in INDEXES:
        raise InputError(
            f"{path} holds an index of unknown kind {meta['kind']!r}; "
            f"this hbird knows: {', '.join(INDEXES)}"
        )
    return INDEXES.get(meta["kind"]).load(path)
