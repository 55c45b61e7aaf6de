"""What a memory bank was built with, apart from how it is searched.

* :class:`BankSpec` (frozen): everything that decides the bank's keys and values —
  encoder, layers, image size, memory size, augmentation, sampling, key dtype, seed,
  feature extractor, autocast. It is recorded in the bank's manifest; a loaded bank
  cannot change it (rebuild the bank instead).
* :class:`SearchConfig`: how the bank is read — ``k``, temperature β, index kind and
  options, device, batch size. Any of it may be overridden when a bank is loaded.

Every field carries its help text and valid values in its metadata (:func:`setting`),
so ``validate`` and the command line's flags (``hbird.cli.common``) come from one place.
Defaults live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from hbird.errors import InputError

DEFAULT_ENCODER = "vit_small_patch14_dinov2.lvd142m"


@dataclass(frozen=True)
class Range:
    """Valid numbers: finite, ``low <= x`` (``low < x`` if ``open_low``), ``x <= high``."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def __contains__(self, x: float) -> bool:
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
            return False
        if self.low is not None and (x <= self.low if self.open_low else x < self.low):
            return False
        return self.high is None or x <= self.high

    def __str__(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.open_low else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"<= {self.high:g}")
        return " and ".join(parts)


class Normalization:
    """Valid ``normalize`` texts (:func:`hbird.encoders.normalization.parse_normalize`)."""

    def __contains__(self, text: object) -> bool:
        from hbird.encoders.normalization import parse_normalize

        try:
            parse_normalize(text)  # type: ignore[arg-type]
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return "model, imagenet or MEAN,MEAN,MEAN/STD,STD,STD (RGB, 0..1 scale)"


def setting(
    default: Any,
    help: str,
    *,
    kind: type | str = str,
    valid: Range | Normalization | None = None,
    choices: Iterable[str] | Callable[[], Iterable[str]] | None = None,
    default_text: str | None = None,
) -> Any:
    """A spec field: ``default`` plus what a person (or a flag) needs to set it.

    Args:
        help: one line, shown in ``--help`` (the default is appended there).
        kind: the type of a set value: ``int``, ``float``, ``bool``, ``str``,
            ``"layers"`` (an int or a tuple of ints) or ``"options"`` (a ``dict``).
        valid: numeric range of a set value (``None`` is allowed when the default is None),
            or another container of the valid values (:class:`Normalization`).
        choices: allowed strings, or a function returning them (e.g. registry names).
        default_text: what the default means, when its value does not say (``None``).
    """
    meta = dict(help=help, kind=kind, valid=valid, choices=choices, default_text=default_text)
    return field(default=default, metadata=meta)


def choices_of(f: dataclasses.Field) -> list[str] | None:
    choices = f.metadata.get("choices")
    if choices is None:
        return None
    return sorted(choices() if callable(choices) else choices)


def check_value(f: dataclasses.Field, value: Any) -> None:
    """Raise :class:`InputError` (a ``ValueError``) naming ``f`` and its valid values if
    ``value`` does not fit."""
    if value is None and f.default is None:
        return
    kind, valid = f.metadata.get("kind", str), f.metadata.get("valid")
    if kind == "layers":
        items = value if isinstance(value, tuple) else (value,)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in items) or not items:
            raise InputError(f"{f.name} must be a block index or indices (ints), got {value!r}")
    elif kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise InputError(f"{f.name} must be an integer, got {value!r}")
    elif kind is bool and not isinstance(value, bool):
        raise InputError(f"{f.name} must be true or false, got {value!r}")
    elif kind == "options" and not isinstance(value, dict):
        raise InputError(f"{f.name} must be a mapping of option names to values, got {value!r}")
    if valid is not None and value not in valid:
        finite = " and finite" if kind is float else ""
        raise InputError(f"{f.name} must be {valid}{finite}, got {value!r}")
    choices = choices_of(f)
    if choices is not None and value not in choices:
        raise InputError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")


def normalise_value(f: dataclasses.Field, value: Any) -> Any:
    """JSON and YAML give lists where a spec holds tuples (``layers``)."""
    if f.metadata.get("kind") == "layers" and isinstance(value, list):
        return tuple(value)
    return value


class Settings:
    """Shared behaviour of the spec dataclasses: validation, dicts, field lookup."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def validate(self) -> None:
        """Raise :class:`InputError` for the first field outside its valid values."""
        for f in fields(self):
            check_value(f, getattr(self, f.name))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists, mappings are copied."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
            if isinstance(value, dict):
                out[f.name] = dict(value)
        return out

    @classmethod
    def from_values(cls, values: dict[str, Any]):
        """An instance from the entries of ``values`` that are fields of ``cls`` (others ignored)."""
        known = {
            f.name: normalise_value(f, values[f.name]) for f in fields(cls) if f.name in values
        }
        return cls(**known)


def _feature_extractors() -> list[str]:
    from hbird.features import FEATURE_EXTRACTORS

    return FEATURE_EXTRACTORS.names()


def _index_kinds() -> list[str]:
    from hbird.index import INDEXES

    return ["auto", *INDEXES.names()]


@dataclass(frozen=True)
class BankSpec(Settings):
    """How a memory bank was built: recorded in its manifest, fixed once built."""

    encoder: str = setting(
        DEFAULT_ENCODER, "registry name: any timm ViT, hf:<id or dir>, test_vit..."
    )
    weights: str | None = setting(
        None, "local checkpoint (.safetensors or .pth) for the encoder", default_text="none"
    )
    pretrained: bool = setting(
        True,
        "use the encoder's published weights when no weights file is given, downloaded once",
        kind=bool,
    )
    layers: int | tuple[int, ...] | None = setting(
        None,
        "block index or comma-separated indices whose patch features are used",
        kind="layers",
        default_text="the last block",
    )
    image_size: int = setting(
        224,
        "short side the encoder sees (sides rounded to the patch size)",
        kind=int,
        valid=Range(1),
    )
    normalize: str = setting(
        "model",
        "image mean/std: model (the weights' own), imagenet, or MEAN,MEAN,MEAN/STD,STD,STD",
        valid=Normalization(),
    )
    resize: str = setting(
        "short-side",
        "how images reach image_size: short-side (aspect kept) or square (squashed to SxS); "
        "predictions are at the original size either way",
        choices=("short-side", "square"),
    )
    memory_size: int | None = setting(
        None,
        "total memory budget |M|",
        kind=int,
        valid=Range(1),
        default_text="keep every labelled patch",
    )
    aug_epochs: int = setting(
        1, "passes over the prompt; passes after the first are augmented", kind=int, valid=Range(1)
    )
    augment_first_epoch: bool = setting(
        False, "augment the first pass over the prompt too", kind=bool
    )
    sampling: str | None = setting(
        None,
        "patch sampler",
        choices=("rarity", "random"),
        default_text="rarity for classes, random otherwise",
    )
    label_pooling: str = setting(
        "exclude_ignore",
        "patch class fractions: exclude_ignore (ignore pixels left out) or ignore_as_class0 "
        "(ignore pixels counted as class 0, as open-hummingbird-eval does)",
        choices=("exclude_ignore", "ignore_as_class0"),
    )
    key_dtype: str = setting("float16", "storage of the keys", choices=("float16", "float32"))
    value_storage: str = setting(
        "dense",
        "storage of the values: dense rows, or sparse (class banks: a few (class, weight) "
        "pairs per entry, the dense row only where a patch holds more classes; lossless)",
        choices=("dense", "sparse"),
    )
    seed: int = setting(0, "seed of augmentation, sampling and feature extractors", kind=int)
    features: str = setting(
        "patch",
        "feature extractor: patch (encoder patch features) or fungi (dense FUNGI)",
        choices=_feature_extractors,
    )
    feature_options: dict[str, Any] | None = setting(
        None,
        "feature extractor option, e.g. support_size=100000 for fungi",
        kind="options",
        default_text="the extractor's",
    )
    autocast: str | None = setting(
        None,
        "run the encoder under autocast: about 2x faster on a GPU, features change slightly",
        choices=("bf16", "fp16"),
        default_text="float32",
    )


@dataclass(frozen=True)
class SearchConfig(Settings):
    """How a bank is searched and decoded: may change every time it is loaded."""

    k: int = setting(30, "neighbours per query patch", kind=int, valid=Range(1))
    temperature: float = setting(
        0.02, "softmax temperature β of eq. 1", kind=float, valid=Range(0, open_low=True)
    )
    index: str = setting("auto", "search backend", choices=_index_kinds)
    index_params: dict[str, Any] | None = setting(
        None,
        "index backend option, e.g. k_factor=16 nprobe=16 for ivfpq",
        kind="options",
        default_text="the backend's",
    )
    device: str = setting("cpu", "torch device of the encoder and exact search (cpu, cuda...)")
    batch_size: int = setting(16, "images per encoder forward", kind=int, valid=Range(1))
    feature_cache: str | None = setting(
        None,
        "folder keeping every view's features, so a re-run with other k, β, index or "
        "fraction settings skips the encoder (hbird.features.cache)",
        default_text="none",
    )
    workers: int = setting(
        0,
        "DataLoader worker processes decoding and resizing the next images while the "
        "encoder runs (at most the core count; results are the same)",
        kind=int,
        valid=Range(0),
    )
    shard_bank: bool = setting(
        False,
        "under torchrun: each process holds 1/N of the bank and searches are merged across "
        "processes (hbird.index.sharded); exact search gives the one-process results",
        kind=bool,
    )


RECORDED_SEARCH = ("k", "temperature", "index", "index_params", "batch_size")
"""Search settings a bank records as its defaults (``device`` belongs to the machine)."""

RUNTIME_SEARCH = ("device", "batch_size", "feature_cache", "workers")
"""Search settings that never change a result: a run may resume with other values."""

DERIVED = ("budget_per_image", "extractor")
"""Manifest ``config`` entries computed at build time (per-image budget, extractor identity)."""

LEGACY = {"fungi_support": ("feature_options", "support_size")}
"""Manifest ``config`` entries of earlier versions: name → (field, option)."""


def split_stored_config(
    config: dict[str, Any], search: dict[str, Any] | None, source: str
) -> tuple[BankSpec, dict[str, Any]]:
    """A manifest's ``config`` (and ``search``) → ``(BankSpec, recorded search settings)``.

    Banks of earlier versions kept the search settings in ``config`` and FUNGI's support
    size as ``fungi_support``; both still load. Unknown entries are reported with a
    warning naming them.
    """
    config = dict(config)
    for old, (name, option) in LEGACY.items():
        if old in config:
            value = config.pop(old)
            if config.get("features") == "fungi":
                config[name] = {option: value, **(config.get(name) or {})}
    if search is None:  # before the split: search settings lived in the config
        search = {n: config.pop(n) for n in SearchConfig.field_names() if n in config}
    unknown = sorted(set(config) - set(BankSpec.field_names()) - set(DERIVED))
    unknown += sorted(set(search) - set(SearchConfig.field_names()))
    if unknown:
        warnings.warn(
            f"{source}: unknown setting(s) {', '.join(unknown)} ignored (written by another "
            "hbird version?)",
            stacklevel=3,
        )
    recorded = {n: v for n, v in search.items() if n in SearchConfig.field_names()}
    return BankSpec.from_values(config), recorded
