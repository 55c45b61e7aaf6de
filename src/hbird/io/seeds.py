"""One way to derive a seed: every random draw hbird makes comes from a user's seed and
the names of what it is for.

``derive_seed(seed, *parts)`` hashes ``seed`` and ``parts`` (SHA-256 of their ``str``
joined by ``/``; the first 8 bytes, little-endian, top bit cleared). So each consumer
gets its own stream: streams never overlap, do not depend on the order things are built
or on the process, and are the same on every platform and torch version (no library RNG
is used to derive them). The global RNGs are never read or advanced.

Consumers and their parts (keep each one's parts distinct):

* prompt augmentation and patch sampling of a memory: ``(seed, "prompt", epoch, image)``
  (:func:`hbird.memory.augment.image_generator`);
* pretraining views of a sample: ``(seed, "views", epoch, index)``; the order of an
  epoch: ``(seed, "order", epoch)`` (:mod:`hbird.pretrain.data`);
* FUNGI: a loss head ``(seed, "head", name)``, projection blocks, crop sets, a text's
  word deletions (:mod:`hbird.fungi`).

Few-shot subsets are not drawn from a seed but ranked by their own keyed hash, whose
definition is frozen so a subset stays the same across versions
(:func:`hbird.data.fewshot.fewshot_indices`).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_SEED_MASK = (1 << 63) - 1


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed determined by ``seed`` and ``parts`` (stable across processes)."""
    text = "/".join(str(part) for part in (int(seed), *parts))
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & _SEED_MASK


def make_generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(seed, *parts)``."""
    import torch

    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *parts))


def content_key(text: str) -> str:
    """A short stable key for a piece of content (a part that seeds per-text views)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
