"""Evaluation settings: the bank spec and search settings plus the protocol's own, YAML
presets, ``key=value`` overrides.

Presets live in ``hbird/configs/<name>.yaml`` (also reachable as ``configs/`` at the
repository root); a preset sets some fields and everything else keeps its default (the
defaults of :mod:`hbird.specs`). Without a preset, ``hummingbird`` (the paper's settings)
applies.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from hbird.errors import InputError
from hbird.io.options import parse_pairs, parse_value
from hbird.specs import BankSpec, Range, SearchConfig, setting

DEFAULT_PRESET = "hummingbird"


@dataclass(frozen=True)
class EvalConfig(BankSpec, SearchConfig):
    """Everything that decides an evaluation's numbers: every :class:`BankSpec` and
    :class:`SearchConfig` field (the predictor's settings), and the protocol's own below.
    """

    prompt_split: str | None = setting(
        None, "dataset split of the prompt", default_text="the dataset's train split"
    )
    query_split: str | None = setting(
        None, "dataset split of the queries", default_text="the dataset's val split"
    )
    max_queries: int | None = setting(
        None,
        "score only the first N queries (smoke tests)",
        kind=int,
        valid=Range(1),
        default_text="all",
    )
    overlays: int = setting(
        6, "how many image | ground truth | prediction pictures to write", kind=int, valid=Range(0)
    )
    skip_bad: bool = setting(
        False,
        "skip unreadable prompt and query files (each is listed) instead of stopping",
        kind=bool,
    )

    def predictor_kwargs(self) -> dict[str, Any]:
        """Arguments for :class:`~hbird.predictor.InContextPredictor`."""
        names = BankSpec.field_names() + SearchConfig.field_names()
        return {name: getattr(self, name) for name in names}


PROTOCOL_FIELDS = tuple(
    name
    for name in EvalConfig.field_names()
    if name not in BankSpec.field_names() + SearchConfig.field_names()
)
"""The evaluation's own settings (splits, query count, pictures)."""


def preset_names() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")]
        for p in resources.files("hbird.configs").iterdir()
        if p.name.endswith(".yaml")
    )


def load_preset(name_or_path: str | Path) -> dict[str, Any]:
    """A preset's fields: by name (``hummingbird``) or from a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text()
    else:
        candidate = resources.files("hbird.configs").joinpath(f"{name_or_path}.yaml")
        if not candidate.is_file():
            raise InputError(
                f"unknown preset {name_or_path!r}; presets: {', '.join(preset_names())}, or a .yaml path"
            )
        text = candidate.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise InputError(
            f"preset {name_or_path} is not valid YAML{line} ({getattr(err, 'problem', err)}); "
            "write one 'setting: value' per line, e.g. 'k: 30'"
        ) from None
    if not isinstance(data, dict):
        raise InputError(f"preset {name_or_path} must map settings to values, e.g. 'k: 30'")
    _check_keys(data, f"preset {name_or_path}")
    return data


def _check_keys(data: dict[str, Any], where: str) -> None:
    known = {f.name for f in fields(EvalConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(
            f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["k=50", "memory_size=null", "layers=8,9"]`` → ``{"k": 50, "memory_size": None,
    "layers": (8, 9)}`` (values read by :func:`hbird.io.options.parse_value`; lists become
    tuples, and ``layers`` may be comma-separated)."""
    out = parse_pairs(items, "eval override", "k=50")
    _check_keys(out, "overrides")
    if isinstance(out.get("layers"), str):
        out["layers"] = parse_value(f"[{out['layers']}]")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def resolve_config(
    preset: str | None = None, overrides: dict[str, Any] | None = None, **kwargs: Any
) -> EvalConfig:
    """Defaults ← preset (``hummingbird`` if None) ← keyword arguments ← ``overrides``."""
    data = load_preset(DEFAULT_PRESET if preset is None else preset)
    data.update(kwargs)
    data.update(overrides or {})
    _check_keys(data, "settings")
    cfg = EvalConfig.from_values(data)
    try:
        cfg.validate()
    except ValueError as err:
        raise InputError(f"settings: {err}") from None
    return cfg
