"""Saved indexes keyed by the keys they were built from, so a large index is built once.

Training and filling an IVF-PQ or HNSW index over millions of keys takes minutes to
hours on a CPU; rebuilding it every time a memory bank is opened would waste that. A
cache folder holds one saved index per (source keys, kind, parameters) under a
fingerprint of all three, so a changed bank or different index settings can never pick
up a stale index. The caller names its keys by a content id (for a memory bank, a hash
of its shard checksums); the index package never learns what the vectors mean.

The exact index is not cached: it is the keys themselves, and rebuilding it is a copy.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

from hbird.errors import HbirdError
from hbird.index.base import FORMAT_VERSION, META_FILE, VectorIndex

__all__ = ["cache_path", "load_or_build"]


def cache_path(cache_dir: Path, source_id: str, index: VectorIndex) -> Path:
    """``cache_dir/<kind>-<fingerprint>``: where ``index`` built over ``source_id`` is kept.

    Search-time parameters (``nprobe``, ``ef_search``...) are not part of the fingerprint:
    a cached index is reused with the new values (``take_search_settings``). Nor are the
    ones its build measured (``measured_params``: a recall).
    """
    skip = {*index.search_time_params, *index.measured_params}
    build_params = {k: v for k, v in index.params().items() if k not in skip}
    identity = {
        "format_version": FORMAT_VERSION,
        "source": source_id,
        "kind": index.kind,
        "dim": index.dim,
        "params": build_params,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{index.kind}-{digest}"


def load_or_build(
    empty: VectorIndex,
    fill: Callable[[VectorIndex], VectorIndex],
    num_keys: int,
    cache_dir: str | Path | None,
    source_id: str | None,
) -> VectorIndex:
    """The index ``empty`` holding the ``num_keys`` source keys, from the cache when it is there.

    ``fill(index)`` adds the keys (``VectorIndex.fill`` or ``fill_from``); it only runs
    when the index has to be built, so a caller can keep large keys on disk until then.
    A cache miss builds the index and saves it (a read-only or full disk only warns); a
    cached index of another size, or one that cannot take ``empty``'s search settings
    (IVF-PQ tuned for another recall target), is rebuilt. With no ``cache_dir`` or ``source_id``, or
    for the exact index, this just fills the index.
    """
    if cache_dir is None or source_id is None or empty.kind == "exact":
        return fill(empty)
    folder = cache_path(Path(cache_dir), source_id, empty)
    if (folder / META_FILE).is_file():
        try:
            cached = type(empty).load(folder)
        except (HbirdError, OSError, RuntimeError) as err:
            warnings.warn(
                f"ignoring the cached index in {folder} ({err}); rebuilding it", stacklevel=2
            )
        else:
            if cached.ntotal == num_keys and cached.take_search_settings(empty):
                return cached
    fill(empty)
    try:
        empty.save(folder)
    except OSError as err:
        warnings.warn(
            f"could not cache the index in {folder} ({err}); it will be rebuilt next time",
            stacklevel=2,
        )
    return empty
