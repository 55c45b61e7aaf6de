"""What every protocol starts from: its settings, its prompt and query datasets, its encoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from hbird.data.checks import checked_dataset
from hbird.data.datasets import create_dataset
from hbird.encoders import Encoder, create_encoder
from hbird.encoders.normalization import with_normalize
from hbird.errors import InputError
from hbird.eval.config import EvalConfig, resolve_config
from hbird.io.options import parse_spec

# (prompt split, query split) per dataset, as in the paper's protocol
DEFAULT_SPLITS = {
    "voc": ("trainaug", "val"),
    "ade20k": ("train", "val"),
    "cityscapes": ("train", "val"),
    "cocostuff": ("train", "val"),
    "nyuv2": ("train", "test"),
    "folder": ("train", "val"),
}


class Inputs(NamedTuple):
    """A protocol's resolved settings, its two datasets and how the datasets read."""

    cfg: EvalConfig
    prompt: Any
    queries: Any
    description: str


def prepare(
    encoder: str | Encoder | None,
    dataset: str | tuple[Any, Any],
    preset: str | None,
    overrides: dict[str, Any] | None,
    config: dict[str, Any],
    prompt_indices: Sequence[int] | None = None,
) -> Inputs:
    """Settings resolved with the encoder's name, datasets opened (prompt subset if given)
    and every file they will use checked (:func:`hbird.data.checks.checked_dataset`; bad
    ones stop here, before the expensive work, or are skipped with ``skip_bad``).

    Args:
        encoder: a registry name or an :class:`Encoder` (None: ``config['encoder']``).
        dataset: a spec string or ``(prompt, queries)``.
        preset, overrides, config: :class:`EvalConfig` fields, see :func:`resolve_config`.
        prompt_indices: keep only these prompt images.
    """
    if isinstance(encoder, str | Encoder):
        config = {**config, "encoder": encoder if isinstance(encoder, str) else encoder.name}
    cfg = resolve_config(preset, overrides, **config)
    prompt, queries, description = open_datasets(dataset, cfg)
    if prompt_indices is not None:
        prompt = prompt.subset(prompt_indices)
    prompt = checked_dataset(prompt, "prompt", cfg.skip_bad)
    queries = checked_dataset(queries, "query", cfg.skip_bad, limit=cfg.max_queries)
    return Inputs(cfg, prompt, queries, str(description))


def open_datasets(dataset: Any, cfg: EvalConfig) -> tuple[Any, Any, str]:
    """``(prompt dataset, query dataset, description)`` from a spec string or a pair."""
    if isinstance(dataset, tuple | list):
        prompt, queries = dataset
        return prompt, queries, getattr(queries, "description", type(queries).__name__)
    name, fields = parse_spec(dataset)
    default_prompt, default_query = DEFAULT_SPLITS.get(name, ("train", "val"))
    query_split = cfg.query_split or fields.get("split") or default_query
    prompt_split = cfg.prompt_split or default_prompt
    try:
        prompt = create_dataset(dataset, split=prompt_split)
    except InputError:
        if name != "voc" or cfg.prompt_split is not None:
            raise
        prompt = create_dataset(
            dataset, split="train"
        )  # no SegmentationClassAug: the 1,464 train images
    queries = create_dataset(dataset, split=query_split)
    return prompt, queries, dataset


def load_encoder(encoder: str | Encoder | None, cfg: EvalConfig) -> Encoder:
    """The frozen encoder an evaluation uses: ``encoder`` itself, or built from ``cfg``."""
    if isinstance(encoder, Encoder):
        return with_normalize(encoder.to(cfg.device).eval(), cfg.normalize)
    return create_encoder(
        encoder or cfg.encoder,
        weights=cfg.weights,
        pretrained=cfg.pretrained and cfg.weights is None,
        device=cfg.device,
        normalize=cfg.normalize,
    )
