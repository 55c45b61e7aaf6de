"""The OpenBLAS core type for faiss's bundled OpenBLAS, on CPUs newer than it.

faiss-cpu's Linux wheels (1.15.1 here) bundle OpenBLAS 0.3.15, which does not recognise
newer CPUs (this project's Sapphire Rapids Xeon among them) and then runs its Prescott
(SSE3) kernels: faiss's k-means, flat search and coarse quantiser go 3-5x slower than
the CPU allows (docs/performance.md, "Search"). OpenBLAS reads ``OPENBLAS_CORETYPE``
once, when it is loaded, so :func:`faiss_import_environment` sets it to ``SkylakeX``
(AVX-512 kernels, right for every AVX-512 CPU that release lacks) around the import of
faiss, and puts the environment back after. Set ``OPENBLAS_CORETYPE`` yourself to choose
another core type; it is then left alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

VARIABLE = "OPENBLAS_CORETYPE"
AVX512_FLAGS = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl"})
"""What OpenBLAS's SkylakeX kernels use (``/proc/cpuinfo`` flag names)."""
CORETYPE = "SkylakeX"


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` text (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def coretype_to_set(environ: Mapping[str, str], flags: frozenset[str]) -> str | None:
    """The core type to give faiss's OpenBLAS, or None to leave its own choice."""
    if VARIABLE in environ or not AVX512_FLAGS <= flags:
        return None
    return CORETYPE


@contextmanager
def faiss_import_environment() -> Iterator[None]:
    """Import faiss inside this block: ``OPENBLAS_CORETYPE`` is set while it loads (see
    the module docstring) and removed again after."""
    coretype = coretype_to_set(os.environ, cpu_flags())
    if coretype is None:
        yield
        return
    os.environ[VARIABLE] = coretype
    try:
        yield
    finally:
        os.environ.pop(VARIABLE, None)
