"""Exceptions meant for people: each says what was wrong, where, and what to do."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any


class HbirdError(Exception):
    """Base class for hbird's user-facing errors."""


class InputError(HbirdError, ValueError):
    """An input file or array is unusable (missing, unreadable, wrong size or values)."""


UNSET = object()
"""Marks a message that names a setting without a value."""
_spelling: ContextVar[Callable[[str, Any], str] | None] = ContextVar("spelling", default=None)


def spell(name: str, value: Any = UNSET) -> str:
    """How the user gives setting ``name`` (and ``value``), for error messages.

    In Python: ``task='depth'`` (or ``task`` without a value). Under the command line
    (:func:`spelled_as`), its flag: ``--task depth`` (or ``--task``).
    """
    to_text = _spelling.get()
    if to_text is not None:
        return to_text(name, value)
    return name if value is UNSET else f"{name}={value!r}"


@contextlib.contextmanager
def spelled_as(to_text: Callable[[str, Any], str]) -> Iterator[None]:
    """Within the block, :func:`spell` writes settings with ``to_text(name, value)``
    (``value`` is :data:`UNSET` when a message names only the setting)."""
    token = _spelling.set(to_text)
    try:
        yield
    finally:
        _spelling.reset(token)


class BankError(HbirdError):
    """A memory bank on disk is missing, corrupt, or incompatible with the encoder in use."""


def check_format_version(found: object, supported: int, source: object, error: type) -> None:
    """The one rule for every versioned file hbird writes: versions 1 to ``supported`` are
    read; a newer one, or a file without a version, raises ``error`` saying what to do.

    Args:
        found: the file's ``format_version`` entry (None if missing).
        supported: the newest version this hbird reads.
        source: the file, for the message.
        error: the exception class to raise (e.g. ``BankError``, ``InputError``).
    """
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise error(
            f"{source} has no valid format version ({found!r}); it was not written by hbird"
        )
    if found > supported:
        raise error(
            f"{source} has format version {found}, newer than this hbird reads ({supported}); "
            "upgrade hbird"
        )
