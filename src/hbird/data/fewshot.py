"""Seeded few-shot subsets of a dataset, and subset files (one image name per line).

``fewshot_indices(n, fraction, seed)`` ranks ``0 .. n-1`` by a keyed hash of
``(seed, index)`` and keeps the first ``k``. The ranking depends on nothing but the seed
and the index (no library RNG stream), so a subset is the same on every machine and
library version; and with the same seed a smaller fraction is always a subset of a larger
one (data-efficiency curves then compare nested prompts). Write the chosen names down
with :func:`write_subset` to pin a prompt for good.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

from hbird.errors import InputError
from hbird.io.files import write_text


def parse_fraction(fraction: float | str) -> float:
    """``0.25``, ``"0.25"``, ``"1/128"`` or ``"25%"`` → a float in (0, 1]."""
    try:
        if isinstance(fraction, str):
            text = fraction.strip()
            value = float(text[:-1]) / 100 if text.endswith("%") else float(Fraction(text))
        else:
            value = float(fraction)
    except (ValueError, ZeroDivisionError):
        raise InputError(
            f"fraction {fraction!r} is not a number; write e.g. 0.1, '1/128' or '10%'"
        ) from None
    if not 0 < value <= 1 or math.isnan(value):
        raise InputError(f"fraction must be in (0, 1], got {fraction!r}")
    return value


def fewshot_size(n: int, fraction: float | str) -> int:
    """Images kept from ``n``: ``round(n · fraction)``, at least 1 (halves round up)."""
    if n < 1:
        raise InputError("cannot take a few-shot subset of an empty dataset")
    return min(n, max(1, math.floor(n * parse_fraction(fraction) + 0.5)))


def fewshot_indices(n: int, fraction: float | str, seed: int) -> list[int]:
    """A seeded, sorted subset of ``range(n)`` of size :func:`fewshot_size`.

    Deterministic across runs and machines for a given ``(n, seed)``; nested across
    fractions (see the module docstring).
    """
    k = fewshot_size(n, fraction)
    seed = int(seed)

    def rank(i: int) -> bytes:
        return hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()

    order = sorted(range(n), key=rank)
    return sorted(order[:k])


def write_subset(path: str | Path, names: Iterable[str]) -> Path:
    """Write image names, one per line (creating parent folders); returns the path."""
    path = Path(path)
    names = [str(n) for n in names]
    bad = [n for n in names if not n.strip() or "\n" in n or n != n.strip()]
    if bad:
        raise InputError(
            f"subset names must be non-empty single-line strings without surrounding spaces: {bad[:5]}"
        )
    return write_text(path, "".join(f"{n}\n" for n in names))


def read_subset(path: str | Path) -> list[str]:
    """Names from a subset file: one per line; blank lines and ``#`` comments skipped."""
    path = Path(str(path))
    if not path.is_file():
        raise InputError(f"subset file {path} does not exist; write one image name (stem) per line")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [n for n in names if n and not n.startswith("#")]


def names_to_indices(all_names: Sequence[str], wanted: Sequence[str]) -> list[int]:
    """Positions of ``wanted`` in ``all_names`` (in the order of ``wanted``)."""
    position = {name: i for i, name in enumerate(all_names)}
    missing = [n for n in wanted if n not in position]
    if missing:
        raise InputError(
            f"{len(missing)} subset names are not in the dataset, e.g. {missing[:5]}; "
            "check that the subset file was written for this dataset and split"
        )
    return [position[n] for n in wanted]
