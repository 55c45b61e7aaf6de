"""The ``hbird`` console script: one subcommand per module, callable in-process.

Each ``cli/<command>.py`` exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Sequence

from hbird.errors import HbirdError

COMMANDS = {
    "predict": "predict labels for query images from a prompt folder or a saved bank",
    "bank": "build a memory bank from a prompt folder (resumable), or show one",
    "eval": "evaluate an encoder with the retrieval protocol on a benchmark or a folder",
    "fungi": "FUNGI gradient features: kNN classification with and without gradients",
    "pretrain": "pretrain an encoder for retrieval (Hummingbird, iBOT, CO2...), torchrun-ready",
    "encoders": "list the encoders hbird can load",
    "demo": "run the whole loop offline on synthetic scenes with a tiny untrained encoder",
}


def _installed_version() -> str:
    """The version pip installed (the package metadata), or a note that there is none."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hbird")
    except PackageNotFoundError:
        return "(not installed: no package metadata; pip install -e . records it)"


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``hbird`` parser. Every subcommand is listed; only ``commands`` (default: all)
    get their arguments, so a run imports just the one module it needs (``hbird --help``
    imports none)."""
    parser = argparse.ArgumentParser(
        prog="hbird",
        description="In-context dense scene understanding with frozen vision encoders.",
    )
    parser.add_argument("--version", action="version", version=f"hbird {_installed_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    configured = set(COMMANDS if commands is None else commands)
    for name, help_text in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name in configured:
            module = importlib.import_module(f"hbird.cli.{name}")
            module.add_arguments(cmd)
            cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the first positional
    args = build_parser([command] if command in COMMANDS else []).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (HbirdError, FileNotFoundError, ImportError) as err:
        print(f"hbird {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
