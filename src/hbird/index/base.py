"""The protocol every nearest-neighbour backend implements.

Keys are expected to be L2-normalised, so the inner product the backends rank by is the
cosine similarity. The index never renormalises: it does not know what the vectors mean.

Ids are assigned sequentially in insertion order starting at 0, across any number of
``add`` calls. ``search`` always answers torch tensors ``sims (M, k) float32`` sorted
descending and ``ids (M, k) int64``; slots with no neighbour hold id ``-1`` and sim
``-inf`` (fewer than ``k`` entries, or an approximate backend that found fewer).

On disk an index is a **folder**: ``index.json`` (format version, kind, dim, ntotal and
the constructor parameters) plus the backend's payload files. Writes go to a temporary
sibling folder that is renamed into place, so a failed save never leaves a half-written
index behind.
"""

from __future__ import annotations

import abc
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from hbird.errors import HbirdError, InputError, check_format_version
from hbird.io.files import atomic_folder, has_file, write_json

FORMAT_VERSION = 1
META_FILE = "index.json"

ArrayLike = torch.Tensor | np.ndarray


class EmptyIndexError(HbirdError, RuntimeError):
    """An index was searched before anything was added to it."""


class VectorIndex(abc.ABC):
    """Nearest-neighbour search by inner product over ``(N, D)`` keys.

    Subclasses set ``kind`` (their registry name) and implement ``ntotal``, ``_add``,
    ``_search``, ``params``, ``_save_payload`` and ``_load_payload``. Input validation,
    result padding and the on-disk layout live here, once.
    """

    kind: ClassVar[str]
    uses_expected_size: ClassVar[bool] = False
    """True if the constructor takes ``expected_size`` (the factory passes it on)."""
    exact_scores: ClassVar[bool] = False
    """True if the sims ``search`` returns are the exact inner products of the stored keys
    (brute force, flat storage, or exact re-ranking), so callers need not recompute them."""
    search_time_params: ClassVar[tuple[str, ...]] = ()
    """Parameters read at search time only (``nprobe``...), or that only choose them
    (IVF-PQ's target ``recall``): they leave the built structure as it is, so they are no
    part of a cache fingerprint (see ``take_search_settings``)."""

    measured_params: ClassVar[tuple[str, ...]] = ()
    """Parameters the build measures rather than is given (a recall): never part of a
    cache fingerprint."""

    def take_search_settings(self, wanted: VectorIndex) -> bool:
        """Search with the search-time settings of ``wanted`` (an empty index configured
        the way this built one is now wanted, e.g. a cached index reopened); ``False`` if
        that needs a rebuild."""
        for name in self.search_time_params:
            setattr(self, name, getattr(wanted, name))
        return True

    def __init__(self, dim: int) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise InputError(f"{type(self).__name__}: dim must be a positive int, got {dim!r}")
        self.dim = dim

    # --- state -----------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def ntotal(self) -> int:
        """Number of keys added so far."""

    @property
    def is_trained(self) -> bool:
        """False only for backends that still need ``train`` (or a first ``add``)."""
        return True

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """JSON-serialisable constructor keyword arguments (without ``dim``)."""

    def describe(self) -> dict[str, Any]:
        """Kind and parameters, for manifests and reports."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "is_trained": self.is_trained,
            **self.params(),
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "kind")
        return f"{type(self).__name__}({args})"

    # --- building --------------------------------------------------------------------
    def train(self, x: ArrayLike) -> None:
        """Fit the backend's quantisers on representative keys ``x (N, D)``.

        A no-op for backends that need no training; the input is still validated.
        """
        self._train(as_key_matrix(x, self.dim, "train(x)"))

    def _train(self, x: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """Backend hook; ``x`` is a validated ``(N, D)`` float tensor."""

    def add(self, x: ArrayLike) -> None:
        """Append keys ``x (N, D)`` (float16/float32, torch or numpy); ids continue from ``ntotal``."""
        keys = as_key_matrix(x, self.dim, "add(x)")
        if keys.shape[0] > 0:
            self._add(keys)

    @abc.abstractmethod
    def _add(self, x: torch.Tensor) -> None:
        """Backend hook; ``x`` is a validated non-empty ``(N, D)`` float tensor."""

    def fill(self, x: ArrayLike, chunk_size: int = 1 << 20, progress: bool = False) -> VectorIndex:
        """Add many keys ``x (N, D)``: train on all of them first if the backend needs it,
        then add them ``chunk_size`` at a time, with a progress bar when ``progress`` and
        there is more than one chunk. Same result as ``add(x)``; returns ``self``."""
        keys = as_key_matrix(x, self.dim, "fill(x)")
        if not self.is_trained and keys.shape[0] > 0:
            self._train_and_say(keys, progress)
        n, was_empty = keys.shape[0], self.ntotal == 0
        with tqdm(
            total=n,
            desc=f"indexing ({self.kind})",
            unit="key",
            unit_scale=True,
            disable=not progress or n <= chunk_size,
        ) as bar:
            for start in range(0, n, chunk_size):
                chunk = keys[start : start + chunk_size]
                self._add(chunk)
                bar.update(chunk.shape[0])
        if was_empty and n:
            self._built(lambda: [keys], n, progress)
        return self

    def _built(  # noqa: B027 - optional hook
        self, chunks: Callable[[], Iterable[torch.Tensor]], n: int, progress: bool
    ) -> None:
        """Hook run when ``fill``/``fill_from`` built the index from nothing: ``chunks()``
        yields its ``n`` keys again, in id order (e.g. to measure recall against them)."""

    def _train_and_say(self, x: torch.Tensor, progress: bool) -> None:
        """``train(x)``, announced on stderr when ``progress`` (k-means can take minutes)."""
        if progress:
            tqdm.write(f"training the {self.kind} index on {x.shape[0]:,} keys...", file=sys.stderr)
        start = time.perf_counter()
        self._train(x)  # x is validated already: no second NaN scan
        if progress:
            tqdm.write(f"trained in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    def training_rows(self, n: int) -> torch.Tensor | None:
        """Which of ``n`` keys ``train`` would fit on (sorted row ids), or ``None`` for all
        of them (and for backends that need no training)."""
        return None

    def fill_from(
        self, chunks: Callable[[], Iterable[ArrayLike]], n: int, progress: bool = False
    ) -> VectorIndex:
        """``fill`` from ``n`` keys that arrive in pieces (e.g. the shards of a bank on disk).

        ``chunks()`` must yield the same ``(n_i, D)`` pieces in the same order each time it
        is called. If the backend needs training, one pass gathers the rows
        ``training_rows(n)`` picks and trains on them; a second pass adds every piece. At
        most one piece plus the training sample is in memory, and the index is the same as
        ``fill`` of all keys at once. Returns ``self``.
        """
        was_empty = self.ntotal == 0
        if not self.is_trained and n > 0:
            rows = self.training_rows(n)
            sample, start = [], 0
            for chunk in chunks():
                chunk = as_key_matrix(chunk, self.dim, "fill_from(chunks)")
                stop = start + chunk.shape[0]
                if rows is None:
                    sample.append(chunk)
                else:
                    lo, hi = torch.searchsorted(rows, torch.tensor([start, stop])).tolist()
                    sample.append(chunk[rows[lo:hi] - start])
                start = stop
            self._train_and_say(torch.cat(sample), progress)
        bar = tqdm(
            total=n,
            desc=f"indexing ({self.kind})",
            unit="key",
            unit_scale=True,
            disable=not progress,
        )
        with bar:
            for chunk in chunks():
                chunk = as_key_matrix(chunk, self.dim, "fill_from(chunks)")
                if chunk.shape[0]:
                    self._add(chunk)
                bar.update(chunk.shape[0])
        if was_empty and n:
            self._built(chunks, n, progress)
        return self

    # --- searching -------------------------------------------------------------------
    def search(self, q: ArrayLike, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` keys with the largest inner product for each query.

        Args:
            q: queries ``(M, D)``, float16/float32, torch or numpy.
            k: neighbours per query, ``>= 1``; may exceed ``ntotal`` (the rest is padding).

        Returns:
            ``sims (M, k) float32`` sorted descending and ``ids (M, k) int64``; missing
            neighbours are id ``-1`` with sim ``-inf``.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"{type(self).__name__}.search: k must be an int >= 1, got {k!r}")
        queries = as_key_matrix(q, self.dim, "search(q)")
        if self.ntotal == 0:
            raise EmptyIndexError(
                f"{type(self).__name__} is empty: call add(keys) before search(q, k)"
            )
        k_found = min(k, self.ntotal)
        if queries.shape[0] == 0:
            sims = torch.empty(0, k_found, dtype=torch.float32)
            ids = torch.empty(0, k_found, dtype=torch.int64)
        else:
            sims, ids = self._search(queries, k_found)
        return _finish_results(sims, ids, k)

    @abc.abstractmethod
    def _search(self, q: torch.Tensor, k: int) -> tuple[ArrayLike, ArrayLike]:
        """Backend hook: ``q (M, D)`` validated, ``1 <= k <= ntotal``; answers ``(M, k)`` pairs."""

    # --- persistence -----------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index to the folder ``path`` (replaced if it exists); returns it."""
        folder = Path(path)
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "params": self.params(),
        }
        with atomic_folder(folder, "a saved index", has_file(META_FILE)) as tmp:
            self._save_payload(tmp)
            write_json(tmp / META_FILE, meta, sort_keys=False)
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VectorIndex:
        """Read an index folder written by ``save`` of this class."""
        folder = Path(path)
        meta = read_meta(folder)
        if meta["kind"] != cls.kind:
            raise InputError(
                f"{folder} holds a {meta['kind']!r} index, not {cls.kind!r}; "
                "open it with hbird.index.load_index(path)"
            )
        index = cls(meta["dim"], **meta["params"])
        index._load_payload(folder)
        if index.ntotal != meta["ntotal"]:
            raise InputError(
                f"{folder}: {META_FILE} says ntotal={meta['ntotal']} but the payload holds "
                f"{index.ntotal} keys; the folder is corrupt, rebuild the index"
            )
        return index

    @abc.abstractmethod
    def _save_payload(self, folder: Path) -> None:
        """Write the backend's files into ``folder`` (exists, empty)."""

    @abc.abstractmethod
    def _load_payload(self, folder: Path) -> None:
        """Restore state from ``folder`` into this freshly constructed index."""


# --- helpers shared by the backends ------------------------------------------------------
def as_key_matrix(x: ArrayLike, dim: int, what: str) -> torch.Tensor:
    """Validate ``x`` as an ``(N, dim)`` float matrix; answer a contiguous CPU tensor.

    float16 and float32 are kept as they are, float64 becomes float32 and bfloat16
    becomes float32. Anything else (ints, wrong rank or width, NaN/inf) is an error.
    """
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"{what}: expected float16/float32 values, got numpy {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise InputError(f"{what}: expected a torch tensor or numpy array, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{what}: expected float16/float32 values, got {x.dtype}")
    if x.ndim != 2:
        hint = " (use x[None] for a single vector)" if x.ndim == 1 else ""
        raise InputError(f"{what}: expected shape (N, {dim}), got {tuple(x.shape)}{hint}")
    if x.shape[1] != dim:
        raise InputError(
            f"{what}: vectors have dimension {x.shape[1]} but the index was built for "
            f"dim={dim}; use features from the same encoder/layer as the index"
        )
    x = x.detach().cpu()
    if x.dtype not in (torch.float16, torch.float32):
        x = x.to(torch.float32)
    if not all_finite(x):
        raise InputError(f"{what}: contains NaN or inf values")
    return x.contiguous()


def all_finite(x: torch.Tensor, rows: int = 1 << 16) -> bool:
    """True if ``x (N, D)`` holds no NaN or inf; checked ``rows`` rows at a time, so the
    mask is at most ``rows × D`` booleans (an ``N × D`` mask is 384 MB at 1M × 384)."""
    return all(bool(torch.isfinite(x[i : i + rows]).all()) for i in range(0, x.shape[0], rows))


def as_float32_numpy(x: torch.Tensor) -> np.ndarray:
    """``(N, D)`` tensor → C-contiguous float32 numpy array (what faiss and ScaNN take)."""
    return np.ascontiguousarray(x.to(torch.float32).numpy())


def _finish_results(sims: ArrayLike, ids: ArrayLike, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast to ``float32``/``int64`` tensors, mark empty slots ``-inf``, pad columns to ``k``."""
    sims_t = torch.as_tensor(sims).to(torch.float32)
    ids_t = torch.as_tensor(ids).to(torch.int64)
    sims_t = sims_t.masked_fill(ids_t < 0, float("-inf"))
    ids_t = ids_t.clamp(min=-1)
    missing = k - ids_t.shape[1]
    if missing > 0:
        sims_t = torch.nn.functional.pad(sims_t, (0, missing), value=float("-inf"))
        ids_t = torch.nn.functional.pad(ids_t, (0, missing), value=-1)
    return sims_t.contiguous(), ids_t.contiguous()


def read_meta(folder: Path) -> dict[str, Any]:
    """Read and check ``folder/index.json``."""
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise InputError(
            f"{folder} is not a saved index (no {META_FILE}); save one with index.save(path)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{meta_path} is unreadable ({exc}); rebuild the index") from exc
    missing = {"format_version", "kind", "dim", "ntotal", "params"} - set(meta)
    if missing:
        raise InputError(f"{meta_path} lacks {sorted(missing)}; rebuild the index")
    check_format_version(meta["format_version"], FORMAT_VERSION, meta_path, InputError)
    return meta
