"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
from pathlib import Path
from typing import Any

import torch

from hbird import _optional


def rss_bytes() -> int:
    """Current resident set size of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Largest resident set size this process has had: ``VmHWM`` of its own memory map.

    ``getrusage``'s ``ru_maxrss`` is kept across ``exec``: a child started by a large
    parent reports at least the parent's size, so it is only the fallback."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def set_threads(threads: int | None) -> None:
    """Use ``threads`` torch (and faiss, if installed) threads; ``None`` leaves the defaults."""
    if not threads:
        return
    torch.set_num_threads(threads)
    if _optional.is_available("faiss"):
        _optional.require("faiss", "--threads").omp_set_num_threads(threads)


def environment() -> dict[str, Any]:
    """Versions, threads and load of this machine, for the JSON every benchmark writes."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }
    if _optional.is_available("faiss"):
        faiss = _optional.require("faiss", "the benchmark")
        env["faiss"] = faiss.__version__
        env["faiss_threads"] = faiss.omp_get_max_threads()
    return env


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed command line as JSON-friendly settings (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def report_results(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """``{"settings", "environment", "results"}`` for a run, written to ``args.out``."""
    report = {"settings": settings(args), "environment": environment(), "results": results}
    write_report(report, args.out)
    return report


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write ``report`` as indented JSON to ``out`` (parents created) and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def child_row(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a measurement in its own process; its last stdout line is the JSON row.

    A child that fails gives ``{"error": <its last stderr line>}``.
    """
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])
