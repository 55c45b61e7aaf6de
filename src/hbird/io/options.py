"""``key=value`` text, read one way everywhere: CLI options, overrides and spec strings.

Three shapes, one set of rules:

* a value: :func:`parse_value` (``"3"`` → 3, ``"1e-3"`` → 0.001, ``"true"`` → True,
  ``"null"`` → None, ``"[8, 9]"`` → [8, 9], anything else stays a string);
* pairs: :func:`parse_pairs` (``["k=50", "memory_size=null"]`` → a dict), for repeatable
  flags such as ``--index-param`` and eval's ``KEY=VALUE`` overrides;
* a spec: :func:`parse_spec` (``"voc:root=/data/VOC2012:split=val"`` → a name and a dict).

Keys are stripped and read ``-`` as ``_``; a key given twice is an error. Every error names
what was being read (the flag, or the spec) and shows an example.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from hbird.errors import InputError

_INT = re.compile(r"[+-]?(0|[1-9][0-9]*)")
_FLOAT = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?")
_NULL = ("null", "none", "~")


def parse_value(text: str) -> Any:
    """Read one value: int, float, bool, None, a ``[a, b]`` list of values, or the string.

    ``"007"`` and ``"1/128"`` stay strings (a zero-padded name, a fraction); ``true`` /
    ``false`` and ``null`` / ``none`` are matched without regard to case.
    """
    text = text.strip()
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text) and any(ch in text for ch in ".eE"):
        return float(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() in _NULL:
        return None
    if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
        inner = text[1:-1].strip()
        return [parse_value(item) for item in inner.split(",")] if inner else []
    return text


def _split_pair(item: str, what: str, example: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise InputError(f"{what}: {item!r} is not key=value (e.g. {example})")
    return key, value


def parse_pairs(items: Iterable[str] | None, what: str, example: str) -> dict[str, Any]:
    """``["k=50", "memory_size=null"]`` → ``{"k": 50, "memory_size": None}``.

    Args:
        what: what the items are, for errors (``"--index-param"``, ``"eval override"``).
        example: a correct item, shown in errors (``"k_factor=16"``).
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, value = _split_pair(item, what, example)
        if key in out:
            raise InputError(f"{what}: {key}= is given twice ({item!r}); give it once")
        out[key] = parse_value(value)
    return out


def parse_spec(
    spec: str, what: str = "dataset spec", example: str = "voc:root=/data/VOC2012:split=val"
) -> tuple[str, dict[str, Any]]:
    """``"voc:root=/data/VOC2012:split=val"`` → ``("voc", {"root": "/data/VOC2012", "split": "val"})``.

    Fields are separated by ``:``; a field without ``=`` continues the previous value (so
    ``root=C:\\data`` survives). Keys must be Python identifiers (they become keyword
    arguments); values go through :func:`parse_value`.
    """
    name, *fields = spec.split(":")
    name = name.strip()
    if not name or "=" in name:
        raise InputError(f"{what} {spec!r} must start with a dataset name, e.g. {example!r}")
    raw: dict[str, str] = {}
    last: str | None = None
    for field in fields:
        if "=" not in field:
            if last is None:
                raise InputError(
                    f"{what} {spec!r}: field {field!r} is not key=value; write it as "
                    f"name:key=value:key=value, e.g. {example!r}"
                )
            raw[last] += ":" + field
            continue
        key, value = _split_pair(field, f"{what} {spec!r}", example)
        if not key.isidentifier():
            raise InputError(f"{what} {spec!r}: {key!r} is not a valid argument name")
        if key in raw:
            raise InputError(f"{what} {spec!r} gives {key}= twice")
        raw[key], last = value, key
    return name, {k: parse_value(v) for k, v in raw.items()}
