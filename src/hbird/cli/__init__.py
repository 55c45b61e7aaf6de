"""The ``hbird`` console script: one subcommand per module, callable in-process.

Each ``cli/<command>.py`` exposes ``add_arguments(parser)`` and ``run(args) -> int``, and
may expose ``SETTING_FLAGS`` (library setting name → the flag that sets it, where it is not
``--<name>``), ``interrupted(args) -> str`` (what Ctrl-C kept and how to resume) and
``OVERRIDES`` (the name of its ``KEY=VALUE`` positional, whose items may then stand
anywhere on the line, between flags too).

Errors meant for people (:class:`hbird.errors.HbirdError`, missing files, unwritable
paths) end in one ``hbird <command>: error: ...`` line and exit status 2; Ctrl-C ends in
one line and exit status 130. Library messages name settings through
:func:`hbird.errors.spell`, which here writes their flags.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Sequence

from hbird.errors import HbirdError, spelled_as

COMMANDS = {
    "predict": "predict labels for query images from a prompt folder or a saved bank",
    "bank": "build a memory bank from a prompt folder (resumable), or show one",
    "eval": "evaluate an encoder with the retrieval protocol on a benchmark or a folder",
    "fungi": "FUNGI gradient features: kNN classification with and without gradients",
    "pretrain": "pretrain an encoder for retrieval (Hummingbird, iBOT, CO2...), torchrun-ready",
    "zeroshot": "zero-shot segmentation of named classes (ReCo): index, build references, predict",
    "encoders": "list the encoders hbird can load",
    "demo": "run the whole loop offline on synthetic scenes with a tiny untrained encoder",
    "serve": "serve a REST API for interactive prompting of a folder of images (hbird[serve])",
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
            cmd.set_defaults(
                _run=module.run,
                _flags=getattr(module, "SETTING_FLAGS", {}),
                _interrupted=getattr(module, "interrupted", None),
                _overrides=getattr(module, "OVERRIDES", None),
            )
    return parser


def _collect_overrides(
    parser: argparse.ArgumentParser, args: argparse.Namespace, extras: list[str]
) -> None:
    """Append the ``KEY=VALUE`` items argparse left over (those after a flag, since a
    ``nargs="*"`` positional takes one contiguous run) to the command's ``OVERRIDES``
    positional; anything else is refused as ``parse_args`` would."""
    name = getattr(args, "_overrides", None)
    pairs = [a for a in extras if name and "=" in a and not a.startswith("-")]
    stray = [a for a in extras if a not in pairs]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if pairs:
        setattr(args, name, [*getattr(args, name), *pairs])


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the first positional
    parser = build_parser([command] if command in COMMANDS else [])
    args, extras = parser.parse_known_args(argv)
    _collect_overrides(parser, args, extras)
    from hbird.cli.common import flag_spelling, max_pixels_from, process_group

    try:
        with spelled_as(flag_spelling(args._flags)), max_pixels_from(args), process_group(args):
            return int(args._run(args) or 0)
    except (HbirdError, OSError, ImportError) as err:
        print(f"hbird {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = args._interrupted(args) if args._interrupted else "run the command again"
        print(f"\nhbird {args.command}: interrupted (Ctrl-C); {kept}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
