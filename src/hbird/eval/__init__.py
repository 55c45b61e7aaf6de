"""Evaluation protocols: retrieval, data-efficiency fractions, fast adaptation, linear probe."""

from hbird.eval.config import EvalConfig, load_preset, parse_overrides, resolve_config
from hbird.eval.fast_adaptation import FastAdaptationReport, fast_adaptation
from hbird.eval.fractions import FractionsReport, evaluate_fractions
from hbird.eval.linear_probe import LinearProbeReport, linear_probe
from hbird.eval.report import Report, compare_reports
from hbird.eval.retrieval import evaluate

__all__ = [
    "EvalConfig",
    "FastAdaptationReport",
    "FractionsReport",
    "LinearProbeReport",
    "Report",
    "compare_reports",
    "evaluate",
    "evaluate_fractions",
    "fast_adaptation",
    "linear_probe",
    "load_preset",
    "parse_overrides",
    "resolve_config",
]
