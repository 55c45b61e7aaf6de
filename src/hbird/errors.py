"""Exceptions meant for people: each says what was wrong, where, and what to do."""

from __future__ import annotations


class HbirdError(Exception):
    """Base class for hbird's user-facing errors."""


class InputError(HbirdError, ValueError):
    """An input file or array is unusable (missing, unreadable, wrong size or values)."""


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
