"""Every file of a dataset checked before the expensive work (issue 10, "queries are
checked late"): a bad image or label stops the run naming the file, or, with
``skip_bad``, is left out and listed.

The check is a dataset's ``bad_files(limit)`` (see :class:`hbird.data.datasets.DenseDataset`):
image headers and sizes, no decoding (an image is decoded once, when it is used).
"""

from __future__ import annotations

import sys
from typing import Any

from hbird.errors import InputError, spell


def skip_bad_files(problems: list[str], what: str, skip_bad: bool, most: int = 5) -> None:
    """Stop with every problem listed (the first ``most``), or with ``skip_bad`` list them
    on stderr and go on without those files."""
    if not problems:
        return
    shown = "\n  ".join(problems[:most])
    if len(problems) > most:
        shown += f"\n  ... and {len(problems) - most} more"
    if not skip_bad:
        raise InputError(
            f"{len(problems)} {what} file(s) cannot be used:\n  {shown}\n"
            f"fix or remove them, or pass {spell('skip_bad')} to go on without them"
        )
    print(
        f"skipping {len(problems)} {what} file(s) ({spell('skip_bad')}):\n  {shown}",
        file=sys.stderr,
    )


def checked_dataset(
    dataset: Any, what: str, skip_bad: bool = False, limit: int | None = None
) -> Any:
    """``dataset`` with its files checked: the same dataset, or with ``skip_bad`` the subset
    without the bad entries (their problems in ``.skipped_files``).

    Args:
        dataset: a Dataset (``len``, ``subset``); one without ``bad_files`` (a user's own)
            is returned as it is.
        what: ``"prompt"`` or ``"query"``, for the messages.
        skip_bad: leave bad entries out (listed on stderr) instead of stopping.
        limit: check only the first ``limit`` entries (the only ones a run will use).

    A fully checked dataset is marked, and so are its subsets: checking again is free.

    Raises:
        InputError: a bad entry without ``skip_bad`` (every one is listed), or no entry left.
    """
    find = getattr(dataset, "bad_files", None)
    if find is None or getattr(dataset, "files_checked", False):
        return dataset
    bad = dict(find(limit))
    skip_bad_files(list(bad.values()), what, skip_bad)
    if len(bad) == len(dataset):
        raise InputError(f"no usable {what} image is left in {dataset.description}")
    kept = dataset.subset([i for i in range(len(dataset)) if i not in bad])
    kept.skipped_files = [*getattr(dataset, "skipped_files", []), *bad.values()]
    kept.files_checked = limit is None or limit >= len(dataset)
    return kept
