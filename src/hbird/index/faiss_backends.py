"""faiss backends: exact flat, IVF-PQ fast-scan with exact re-ranking, and HNSW.

faiss is optional: importing this module is free, constructing an index needs faiss
(``pip install "hbird[faiss]"``). All backends use ``METRIC_INNER_PRODUCT`` and store
keys as float32 (float16 keys are upcast). faiss's own thread count is left alone
(``faiss.omp_set_num_threads`` decides; by default all cores).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch

from hbird._optional import require
from hbird.errors import InputError
from hbird.index.base import VectorIndex, as_float32_numpy
from hbird.index.tuning import TunedSearch

INDEX_FILE = "index.faiss"
ROTATION_FACTORY = {"rr": "RR{dim}", "pcar": "PCAR{dim}"}
"""``rotation`` option → the faiss factory prefix of the transform before IVF-PQ."""
REFINE_FACTORY = {"float16": "Refine(SQfp16)", "float32": "RFlat"}
"""``refine`` option → the faiss factory suffix of the re-ranking stage."""


def _faiss(feature: str) -> ModuleType:
    return require("faiss", feature)


def default_nlist(n: int) -> int:
    """IVF list count for ``n`` keys: about ``4·sqrt(n)``, at most ``n // 39``.

    ``4·sqrt(n)`` balances coarse-quantiser cost against list length; the cap keeps at
    least 39 training points per centroid, below which k-means is unreliable (and faiss
    warns).
    """
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def default_pq_m(dim: int) -> int:
    """PQ sub-quantiser count: ``dim``, one 16-centroid (4-bit) codebook per dimension.

    Measured at 1M × 384 clustered float16 keys (``benchmarks/index_curve.py``,
    docs/performance.md): against two dimensions per codebook (``dim / 2``), the codes
    are twice as long and the fast-scan pass about 1.5× as long, but the first pass ranks
    well enough that 4 candidates per neighbour reach recall@30 0.93 where ``dim / 2``
    needed 32 for 0.96, so a search at recall 0.9 costs about a third of the CPU time.
    """
    return dim


def _positive_int(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{owner}: {name} must be an int >= 1, got {value!r}")


class _FaissIndex(VectorIndex):
    """Shared plumbing: a wrapped ``faiss.Index`` in ``self._index`` (``None`` until built)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self._faiss = _faiss(f"the {self.kind!r} index")
        self._index: Any = None

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        return self._index is not None and bool(self._index.is_trained)

    add_rows: ClassVar[int | None] = 1 << 16
    """Keys converted to float32 and added per faiss ``add`` call (``None``: all at once).
    faiss stores its own copy, so converting a few rows at a time keeps the temporary
    float32 copy small (100 MB at D = 384, not 1.5 GB for a 1M-row chunk); IVF and flat
    adds do not depend on how the keys are split."""

    def _add(self, x: torch.Tensor) -> None:
        if not self.is_trained:
            self._train(x)
        step = self.add_rows or x.shape[0]
        for start in range(0, x.shape[0], step):
            self._index.add(as_float32_numpy(x[start : start + step]))

    def _search_params(self) -> Any:
        """faiss ``SearchParameters`` for this search, or ``None`` for the index's own."""
        return None

    def _search(self, q: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._index.search(as_float32_numpy(q), k, params=self._search_params())

    def _save_payload(self, folder: Path) -> None:
        if self._index is not None:
            self._faiss.write_index(self._index, str(folder / INDEX_FILE))

    def _load_payload(self, folder: Path) -> None:
        path = folder / INDEX_FILE
        if not path.is_file():
            return  # saved before it was built: nothing but parameters
        try:
            index = self._faiss.read_index(str(path))
        except RuntimeError as exc:
            raise InputError(f"{path} is not a readable faiss index ({exc}); rebuild it") from exc
        if index.d != self.dim:
            raise InputError(f"{path} holds dim {index.d} vectors, index.json says {self.dim}")
        self._index = index


class FaissFlatIndex(_FaissIndex):
    """Exact search with ``faiss.IndexFlatIP`` (float32 keys, BLAS + fused top-k)."""

    kind = "flat"
    exact_scores = True

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self._index = self._faiss.IndexFlatIP(dim)

    def params(self) -> dict[str, Any]:
        return {}


class FaissHNSWIndex(_FaissIndex):
    """Graph search with ``faiss.IndexHNSWFlat`` (inner product, float32 keys).

    Args:
        dim: key dimension ``D``.
        m: graph degree (HNSW's ``M``); memory grows by about ``2·m`` ints per key.
        ef_construction: candidate list size while inserting (build quality vs time).
        ef_search: candidate list size while searching (recall vs time); faiss uses
            ``max(ef_search, k)``. May be changed between searches.
    """

    kind = "hnsw"
    exact_scores = True  # graph walk over float32 keys: found neighbours are scored exactly
    add_rows = None  # faiss inserts a batch level by level: splitting it changes the graph
    search_time_params = ("ef_search",)

    def __init__(
        self, dim: int, m: int = 32, ef_construction: int = 80, ef_search: int = 128
    ) -> None:
        super().__init__(dim)
        for name, value in (
            ("m", m),
            ("ef_construction", ef_construction),
            ("ef_search", ef_search),
        ):
            _positive_int("FaissHNSWIndex", name, value)
        self.m = m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self._index = self._faiss.IndexHNSWFlat(dim, m, self._faiss.METRIC_INNER_PRODUCT)
        self._index.hnsw.efConstruction = ef_construction

    def params(self) -> dict[str, Any]:
        return {"m": self.m, "ef_construction": self.ef_construction, "ef_search": self.ef_search}

    def _search_params(self) -> Any:
        return self._faiss.SearchParametersHNSW(efSearch=self.ef_search)


class FaissIVFPQIndex(TunedSearch, _FaissIndex):
    """IVF with 4-bit PQ fast-scan codes, re-ranked exactly (``IndexRefine``).

    The first pass scans ``nprobe`` of ``nlist`` inverted lists with PQ fast-scan
    (``"IVF{nlist},PQ{m}x4fs"``) and keeps ``k · k_factor`` candidates; these are then
    re-scored against a stored copy of the keys, so the returned sims are exact inner
    products of the stored keys and recall is limited only by the first pass.

    The copy is float16 (``Refine(SQfp16)``) when the keys arrive as float16 — exact for
    them, and half the memory of float32 (a 10M × 768 bank: 15 GB instead of 30 GB) —
    and float32 (``RFlat``) otherwise; ``refine`` forces either.

    Training: ``train(x)`` fits the coarse centroids and codebooks on ``x``, sub-sampled
    to ``train_size`` rows. If ``add`` is called first, it trains on that first batch, so
    make the first batch representative (or call ``train`` on a sample).

    Args:
        dim: key dimension ``D``.
        nlist: inverted lists; default ``default_nlist(expected_size or len(train set))``.
        m: PQ sub-quantisers (must divide ``dim``); default ``default_pq_m(dim)``.
        nprobe: lists scanned per query (recall vs time). May be changed between searches.
        k_factor: candidates re-ranked per wanted neighbour. May be changed between searches.
            4-bit codes rank close neighbours coarsely, and the denser the bank the more
            keys fall within that error, so re-ranking is generous by default (cheap:
            ``k · k_factor`` exact dot products). Measured recall@30 with m = D/2 on 128-d
            keys: k_factor 16 → 0.96 (100k) / 0.90 (200k); 32 → 0.997 / 0.97. Raise it,
            or ``m``, for larger banks.
        train_size: most training rows used; default ``64 · nlist`` (k-means wants >= 39
            points per centroid; more costs build time for little gain).
        expected_size: number of keys the index will hold, to size ``nlist``.
        seed: seed for the training sub-sample.
        refine: ``"auto"`` (the dtype of the training keys), ``"float16"`` or ``"float32"``:
            the precision of the re-ranking copy of the keys. A float16 copy of float32
            keys makes the returned scores approximate (``exact_scores`` is then False).
        keys_dtype: dtype of the keys the index was trained on; recorded by training.
        recall: target recall@30: once ``fill``/``fill_from`` has built the index, it
            searches ``recall_queries`` of its keys (seeded by ``seed``) exactly and with a
            ladder of ``nprobe``/``k_factor`` values, and keeps the cheapest setting that
            reaches the target (see ``index.tuning``). ``auto`` sets 0.9. ``None``: the
            given ``nprobe``/``k_factor`` are kept.
        recall_queries: keys searched to measure recall.
        measured_recall: recall@30 the build measured at the kept setting; recorded by
            the build (``None`` until tuned).
        rotation: ``None``, ``"rr"`` (a random rotation) or ``"pcar"`` (PCA, then a random
            rotation), learnt before the IVF and PQ stages to spread the variance evenly
            over PQ's sub-vectors; re-ranking still scores the keys as given.
        coarse: ``"flat"`` (brute-force centroid search) or ``"hnsw"`` (an HNSW graph over
            the centroids, ``IVF{nlist}_HNSW32``).
        by_residual: PQ codes the offset of each key from its list's centroid (``True``)
            or the key itself (``False``). faiss's factory turns it off for fast-scan
            inner-product indexes; on, the 4-bit codes spend their precision on the
            small within-list offsets, which at 1M clustered keys halves the candidates
            re-ranked for the same recall (docs/performance.md, "At 1M keys"). An index
            saved before this option existed reports what its payload holds.
    """

    kind = "ivfpq"

    def __init__(
        self,
        dim: int,
        nlist: int | None = None,
        m: int | None = None,
        nprobe: int = 32,
        k_factor: int = 32,
        train_size: int | None = None,
        expected_size: int | None = None,
        seed: int = 0,
        refine: str = "auto",
        keys_dtype: str | None = None,
        recall: float | None = None,
        recall_queries: int = 1000,
        measured_recall: float | None = None,
        rotation: str | None = None,
        coarse: str = "flat",
        by_residual: bool = True,
    ) -> None:
        super().__init__(dim)
        owner = "FaissIVFPQIndex"
        if refine not in REFINE_FACTORY and refine != "auto":
            raise InputError(
                f"{owner}: refine must be 'auto', 'float16' or 'float32', got {refine!r}"
            )
        for name, value in (("nlist", nlist), ("m", m), ("train_size", train_size)):
            _positive_int(owner, name, value, allow_none=True)
        _positive_int(owner, "nprobe", nprobe)
        _positive_int(owner, "k_factor", k_factor)
        _positive_int(owner, "expected_size", expected_size, allow_none=True)
        _positive_int(owner, "recall_queries", recall_queries)
        if rotation is not None and rotation not in ROTATION_FACTORY:
            raise InputError(f"{owner}: rotation must be None, 'rr' or 'pcar', got {rotation!r}")
        if coarse not in ("flat", "hnsw"):
            raise InputError(f"{owner}: coarse must be 'flat' or 'hnsw', got {coarse!r}")
        if not isinstance(by_residual, bool):
            raise InputError(f"{owner}: by_residual must be true or false, got {by_residual!r}")
        if recall is not None and (
            isinstance(recall, bool) or not isinstance(recall, int | float) or not 0 < recall <= 1
        ):
            raise InputError(f"{owner}: recall must be a number in (0, 1], got {recall!r}")
        m = default_pq_m(dim) if m is None else m
        if dim % m:
            raise InputError(f"{owner}: m={m} must divide dim={dim}")
        self.nlist = nlist
        self.m = m
        self.nprobe = nprobe
        self.k_factor = k_factor
        self.train_size = train_size
        self.expected_size = expected_size
        self.seed = seed
        self.refine = refine
        self.keys_dtype = keys_dtype
        self.recall = recall
        self.recall_queries = recall_queries
        self.measured_recall = measured_recall
        self.rotation = rotation
        self.coarse = coarse
        self.by_residual = by_residual

    @property
    def exact_scores(self) -> bool:  # type: ignore[override]
        """Re-ranked scores are exact unless float32 keys met a float16 re-ranking copy."""
        return not (self.refine == "float16" and self.keys_dtype == "float32")

    def params(self) -> dict[str, Any]:
        return {
            "nlist": self.nlist,
            "m": self.m,
            "nprobe": self.nprobe,
            "k_factor": self.k_factor,
            "train_size": self.train_size,
            "expected_size": self.expected_size,
            "seed": self.seed,
            "refine": self.refine,
            "keys_dtype": self.keys_dtype,
            "recall": self.recall,
            "recall_queries": self.recall_queries,
            "measured_recall": self.measured_recall,
            "rotation": self.rotation,
            "coarse": self.coarse,
            "by_residual": self.by_residual,
        }

    @property
    def factory_string(self) -> str | None:
        """The faiss ``index_factory`` string, once ``nlist`` and the refine dtype are known."""
        if self.nlist is None or self.refine == "auto":
            return None
        rotation = (
            f"{ROTATION_FACTORY[self.rotation].format(dim=self.dim)}," if self.rotation else ""
        )
        coarse = "_HNSW32" if self.coarse == "hnsw" else ""
        return f"{rotation}IVF{self.nlist}{coarse},PQ{self.m}x4fs,{REFINE_FACTORY[self.refine]}"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "factory": self.factory_string}

    def _train(self, x: torch.Tensor) -> None:
        if self.ntotal:
            raise InputError(
                f"FaissIVFPQIndex already holds {self.ntotal} keys; training again would drop "
                "them. Train before the first add, or build a new index"
            )
        n = x.shape[0]
        if self.nlist is None:
            self.nlist = default_nlist(self.expected_size or n)
        self.keys_dtype = "float16" if x.dtype == torch.float16 else "float32"
        if self.refine == "auto":
            self.refine = self.keys_dtype
        needed = max(self.nlist, 16)  # 16 = centroids of a 4-bit PQ codebook
        if n < needed:
            raise InputError(
                f"FaissIVFPQIndex: training needs at least {needed} vectors "
                f"(nlist={self.nlist}, 4-bit PQ), got {n}; train on more data, lower nlist, "
                "or use the 'exact' or 'flat' index for small banks"
            )
        sample = self._training_sample(x)
        index = self._faiss.index_factory(
            self.dim, self.factory_string, self._faiss.METRIC_INNER_PRODUCT
        )
        self._ivf(index).by_residual = self.by_residual
        index.train(as_float32_numpy(sample))
        self._index = index

    def _ivf(self, index: Any) -> Any:
        """The ``IndexIVFPQFastScan`` inside ``index`` (behind the refine and rotation)."""
        return self._faiss.downcast_index(self._faiss.extract_index_ivf(index))

    def _load_payload(self, folder: Path) -> None:
        super()._load_payload(folder)
        if self._index is not None:  # index.json from before by_residual: trust the payload
            self.by_residual = bool(self._ivf(self._index).by_residual)

    def training_rows(self, n: int) -> torch.Tensor | None:
        """A seeded sample of ``train_size`` (default ``64 · nlist``) of ``n`` rows, or all."""
        if self.nlist is None:
            self.nlist = default_nlist(self.expected_size or n)
        limit = self.train_size or 64 * self.nlist
        if n <= limit:
            return None
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(n, generator=generator)[:limit].sort().values

    def _training_sample(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.training_rows(x.shape[0])
        return x if rows is None else x[rows]

    def _search_params(self) -> Any:
        faiss = self._faiss
        base = faiss.SearchParametersIVF(nprobe=self.nprobe)
        if self.rotation:  # IndexRefine(IndexPreTransform(rotation, IVF)): refine on raw keys
            base = faiss.SearchParametersPreTransform(index_params=base)
        return faiss.IndexRefineSearchParameters(
            k_factor=float(self.k_factor), base_index_params=base
        )
