"""Evaluation settings: a frozen dataclass, YAML presets, ``key=value`` overrides.

Presets live in ``hbird/configs/<name>.yaml`` (also reachable as ``configs/`` at the
repository root); a preset sets some fields and everything else keeps its default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from hbird.errors import InputError
from hbird.io.options import parse_pairs, parse_value


@dataclass(frozen=True)
class EvalConfig:
    """Everything that decides an evaluation's numbers.

    Attributes:
        encoder, weights, pretrained, layers: the frozen encoder (see ``create_encoder``).
        image_size: short side the encoder sees (paper: 512).
        k, temperature, memory_size, aug_epochs, index, sampling: the retrieval protocol.
        prompt_split, query_split: dataset splits (default: the dataset's train / val).
        batch_size, device, seed: execution.
        max_queries: score only the first N queries (smoke tests; None = all).
        overlays: how many image | ground truth | prediction pictures to write.
        features: ``"patch"`` (encoder features) or ``"fungi"`` (dense FUNGI).
        autocast: ``"bf16"``/``"fp16"`` to encode under autocast (GPU speed; changes the
            numbers slightly), ``None`` for float32.
        index_params: options of the index backend, e.g. ``{"k_factor": 16}`` for IVF-PQ.
    """

    encoder: str = "vit_small_patch16_224.dino"
    weights: str | None = None
    pretrained: bool = True
    layers: int | tuple[int, ...] | None = None
    image_size: int = 512
    k: int = 30
    temperature: float = 0.02
    memory_size: int | None = 10_240_000
    aug_epochs: int = 2
    index: str = "auto"
    sampling: str | None = None
    prompt_split: str | None = None
    query_split: str | None = None
    batch_size: int = 16
    device: str = "cpu"
    seed: int = 0
    max_queries: int | None = None
    overlays: int = 6
    features: str = "patch"
    autocast: str | None = None
    index_params: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(self.layers, tuple):
            d["layers"] = list(self.layers)
        return d

    def predictor_kwargs(self) -> dict[str, Any]:
        """Arguments for :class:`~hbird.predictor.InContextPredictor`."""
        keys = ("encoder", "weights", "pretrained", "layers", "image_size", "k", "temperature", "memory_size",
                "aug_epochs", "index", "sampling", "batch_size", "device", "seed", "features",
                "autocast", "index_params")  # fmt: skip
        return {k: getattr(self, k) for k in keys}


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
    data = yaml.safe_load(text) or {}
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
    """Defaults ← preset ← keyword arguments ← ``overrides`` (later wins)."""
    data: dict[str, Any] = {}
    if preset is not None:
        data.update(load_preset(preset))
    data.update(kwargs)
    data.update(overrides or {})
    _check_keys(data, "settings")
    if isinstance(data.get("layers"), list):
        data["layers"] = tuple(data["layers"])
    return replace(EvalConfig(), **data)
