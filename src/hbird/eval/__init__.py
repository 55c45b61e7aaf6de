"""Evaluation protocols: retrieval, data-efficiency fractions, fast adaptation, linear probe,
panoptic retrieval."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hbird.eval.config import EvalConfig, load_preset, parse_overrides, resolve_config
    from hbird.eval.fast_adaptation import FastAdaptationReport, fast_adaptation
    from hbird.eval.fractions import FractionsReport, evaluate_fractions
    from hbird.eval.linear_probe import LinearProbeReport, linear_probe
    from hbird.eval.panoptic import PanopticReport, evaluate_panoptic
    from hbird.eval.report import Report, compare_reports
    from hbird.eval.retrieval import evaluate

# imported on first use (PEP 562): reading a preset or a report does not load the protocols
_LAZY = {
    "EvalConfig": "config",
    "load_preset": "config",
    "parse_overrides": "config",
    "resolve_config": "config",
    "FastAdaptationReport": "fast_adaptation",
    "fast_adaptation": "fast_adaptation",
    "FractionsReport": "fractions",
    "evaluate_fractions": "fractions",
    "LinearProbeReport": "linear_probe",
    "linear_probe": "linear_probe",
    "PanopticReport": "panoptic",
    "evaluate_panoptic": "panoptic",
    "Report": "report",
    "compare_reports": "report",
    "evaluate": "retrieval",
}

__all__ = [
    "EvalConfig",
    "FastAdaptationReport",
    "FractionsReport",
    "LinearProbeReport",
    "PanopticReport",
    "Report",
    "compare_reports",
    "evaluate",
    "evaluate_fractions",
    "evaluate_panoptic",
    "fast_adaptation",
    "linear_probe",
    "load_preset",
    "parse_overrides",
    "resolve_config",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hbird.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hbird.eval.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
