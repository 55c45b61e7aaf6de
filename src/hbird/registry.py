"""One registry class; one instance per kind of thing (encoders, indexes, datasets, ...).

Names follow timm's ``arch.tag`` style. Registering a name twice is an error, so two
modules can never silently shadow each other.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from hbird.errors import HbirdError, InputError, spell

T = TypeVar("T")


class UnknownNameError(HbirdError, KeyError):
    """A name that is not registered; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """A name → factory mapping for one kind of component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name``; usable as ``@registry.register("name")``."""

        def _add(item: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = item
            return item

        return _add(obj) if obj is not None else _add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; registered: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted registered names, optionally filtered by a shell-style ``pattern``."""
        names = sorted(self._entries)
        return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        factory = self.get(name)
        if not callable(factory):
            raise TypeError(f"{self.kind} {name!r} is not callable")
        return factory(*args, **kwargs)


def check_options(
    what: str, factory: Callable[..., Any], options: Iterable[str], setting: str, fixed=()
) -> None:
    """Raise :class:`InputError` if ``factory`` takes no keyword of that name for some of
    ``options``; the message lists the ones it takes.

    Args:
        what: the component, for the message (``"index 'hnsw'"``).
        setting: the setting the options came from (``"index_params"``), named in the fix.
        fixed: arguments hbird passes itself (not listed as options).
    """
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return  # it checks its own
    takes = [
        n
        for n, p in params.items()
        if n not in ("self", *fixed) and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise InputError(
            f"{what} has no option {', '.join(unknown)}; it takes "
            f"{', '.join(takes) or 'none'} (set them with {spell(setting)})"
        )


Factory = Callable[..., Any]
