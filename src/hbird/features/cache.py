"""A disk cache of dense features, so the same view is never encoded twice.

Evaluations that sweep prompt fractions, shots, ``k``, ``β`` or index settings, the
linear probe, fast adaptation and an interactive session all encode the same images
again and again. :class:`CachedFeatures` wraps any
:class:`~hbird.features.FeatureExtractor` and keeps each view's features ``(h, w, D)``
in a folder, one safetensors file per view, written atomically.

A view's key is the SHA-256 of

* the encoder's ``identity()`` (name, config hash, weights hash, normalisation),
* the extractor's ``identity()`` (kind, layers, autocast, options),
* the extractor's fitted ``state()`` tensors (e.g. FUNGI's support set), and
* the view itself: its shape and float32 bytes after hbird's preprocessing.

Hashing the preprocessed view rather than the file covers the file's contents *and*
every preprocessing setting (image size, resize mode, crop, augmentation draw) at once,
so a hit can only return the features the extractor would compute. Hashing costs about
5 ms per 448² view here, against hundreds of milliseconds to encode it.

The folder has a size limit: after a write, the least recently used entries are removed
until the cache fits. Entries that cannot be read (a crash mid-write is impossible with
atomic writes, but a disk can fill up or a user can edit files) are recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from hbird.errors import InputError
from hbird.io.files import save_tensors

SUFFIX = ".safetensors"
DEFAULT_MAX_BYTES = 8 * 2**30
"""8 GiB: about 4,800 ViT-S views at 448² (784 patches × 384 float32 features, 1.2 MB each)."""


def view_key(context: bytes, view: torch.Tensor) -> str:
    """Hex SHA-256 of ``context`` followed by ``view``'s shape and float32 bytes."""
    digest = hashlib.sha256(context)
    view = view.detach().to("cpu", torch.float32).contiguous()
    digest.update(json.dumps(list(view.shape)).encode())
    digest.update(view.numpy().tobytes())
    return digest.hexdigest()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 of named tensors (names, dtypes, shapes and bytes), order-free."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class FeatureCache:
    """A folder of ``<key>.safetensors`` files holding one ``features`` tensor each.

    Args:
        folder: where entries live (created on first write).
        max_bytes: size limit; least recently used entries go first.
    """

    def __init__(self, folder: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise InputError(f"the feature cache's size limit must be positive, not {max_bytes}")
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(
                f"feature cache {self.folder} is a file; give a folder (it is created if missing)"
            )
        self.max_bytes = int(max_bytes)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def get(self, key: str) -> torch.Tensor | None:
        """The features stored under ``key``, or ``None`` (missing or unreadable)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._path(key)
        try:
            features = load_file(str(path))["features"]
        except (OSError, KeyError, SafetensorError):
            return None
        os.utime(path)  # mark as recently used
        return features

    def put(self, key: str, features: torch.Tensor) -> None:
        """Store ``features`` under ``key`` atomically (:meth:`trim` keeps the size limit)."""
        save_tensors(self._path(key), {"features": features})

    def entries(self) -> list[Path]:
        return sorted(self.folder.glob(f"*{SUFFIX}")) if self.folder.is_dir() else []

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.entries())

    def trim(self, keep: Iterable[str] = ()) -> None:
        """Remove least recently used entries until the folder fits ``max_bytes``;
        entries named in ``keep`` (just written or read) are removed last."""
        keep = {self._path(key) for key in keep}
        stats = [(path, path.stat()) for path in self.entries()]
        total = sum(stat.st_size for _, stat in stats)
        for path, stat in sorted(stats, key=lambda ps: (ps[0] in keep, ps[1].st_mtime)):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= stat.st_size


class CachedFeatures:
    """Any feature extractor with its ``transform`` served from a :class:`FeatureCache`.

    It is itself a :class:`~hbird.features.FeatureExtractor` with the wrapped one's
    identity, feature width and state, so banks and predictions do not change: only
    views not seen before reach the wrapped extractor (in one call, batched as usual).

    Args:
        extractor: the extractor to cache; it must have an ``encoder`` attribute.
        cache: a :class:`FeatureCache` or its folder.
    """

    def __init__(self, extractor: Any, cache: FeatureCache | str | Path) -> None:
        self.extractor = extractor
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
        self.feature_dim = extractor.feature_dim
        self._context: bytes | None = None

    @property
    def encoder(self) -> Any:
        return self.extractor.encoder

    def context(self) -> bytes:
        """Everything besides the view that the features depend on, as key bytes."""
        if self._context is None:
            self._context = json.dumps(
                {
                    "encoder": self.extractor.encoder.identity(),
                    "extractor": self.extractor.identity(),
                    "state": state_digest(self.extractor.state()),
                },
                sort_keys=True,
                default=str,
            ).encode()
        return self._context

    def fit(self, views: Iterable[torch.Tensor]) -> CachedFeatures:
        self.extractor.fit(views)
        self._context = None  # the state may have changed
        return self

    def transform(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``B`` views ``(3, H, W)`` → ``B`` maps ``(h, w, D)``, cached ones read from disk."""
        context = self.context()
        keys = [view_key(context, view) for view in views]
        found = [self.cache.get(key) for key in keys]
        missing = [i for i, features in enumerate(found) if features is None]
        self.cache.hits += len(views) - len(missing)
        self.cache.misses += len(missing)
        if missing:
            computed = self.extractor.transform([views[i] for i in missing])
            for i, features in zip(missing, computed, strict=True):
                self.cache.put(keys[i], features)
                found[i] = features
            self.cache.trim(keep=keys)
        return found

    def identity(self) -> dict[str, Any]:
        return self.extractor.identity()

    def state(self) -> dict[str, torch.Tensor]:
        return self.extractor.state()

    def load_state(self, state: dict[str, torch.Tensor]) -> CachedFeatures:
        self.extractor.load_state(state)
        self._context = None
        return self
