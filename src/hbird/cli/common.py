"""Arguments shared by several subcommands, and turning them into library objects."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hbird.data.checks import checked_dataset
from hbird.errors import UNSET
from hbird.io.options import parse_pairs
from hbird.specs import BankSpec, SearchConfig, check_value, choices_of

if TYPE_CHECKING:
    from hbird.predictor import InContextPredictor


def parse_layers(text: str) -> int | tuple[int, ...]:
    """``"-1"`` → -1; ``"8,9,10"`` → (8, 9, 10)."""
    items = [int(t) for t in text.split(",") if t.strip()]
    return items[0] if len(items) == 1 else tuple(items)


PARSERS: dict[Any, Callable[[str], Any]] = {
    int: int,
    float: float,
    str: str,
    "layers": parse_layers,
}
EXAMPLES = {"index_params": "k_factor=16", "feature_options": "support_size=1000"}
KIND_NAMES = {int: "an integer", float: "a number", str: "text", "layers": "ints like 8,9,10"}


def flag_of(f: dataclasses.Field) -> str:
    """``image_size`` → ``--image-size``; option mappings take one ``KEY=VALUE`` per flag,
    so ``index_params`` → ``--index-param``."""
    return flag_spelling({})(f.name, UNSET)


OPTION_FIELDS = tuple(
    f.name
    for spec in (BankSpec, SearchConfig)
    for f in fields(spec)
    if f.metadata["kind"] == "options"
)


def flag_spelling(flags: dict[str, str]) -> Callable[[str, Any], str]:
    """Library setting ``name`` → how it is given on this command line, for
    :func:`hbird.errors.spell`: ``flags[name]`` (``"--prompt"``, or ``"root="`` for a key of
    a ``--dataset`` spec), else ``--name`` (``index_params`` → ``--index-param``)."""

    def to_text(name: str, value: Any) -> str:
        singular = name[:-1] if name in OPTION_FIELDS else name  # one KEY=VALUE per flag
        flag = flags.get(name) or "--" + singular.replace("_", "-")
        if value is UNSET or value is True:  # a switch: --overwrite
            return flag
        return f"{flag}{value}" if flag.endswith("=") else f"{flag} {value}"

    return to_text


def add_max_pixels_argument(parser: argparse.ArgumentParser) -> None:
    """``--max-pixels``: the largest image read (see :func:`hbird.io.images.pixel_limit`)."""
    from hbird.io.images import DEFAULT_MAX_PIXELS

    parser.add_argument(
        "--max-pixels",
        type=_positive_int("--max-pixels"),
        help="refuse images with more pixels than this, a guard against decompression bombs "
        f"(default {DEFAULT_MAX_PIXELS:,}); raise it for trusted huge images",
    )


@contextlib.contextmanager
def max_pixels_from(args: argparse.Namespace) -> Iterator[None]:
    """Apply ``--max-pixels`` (if the command has it and it was given) within the block."""
    if getattr(args, "max_pixels", None) is None:
        yield
        return
    from hbird.io.images import pixel_limit

    with pixel_limit(args.max_pixels):
        yield


@contextlib.contextmanager
def process_group(args: argparse.Namespace) -> Iterator[None]:
    """Under ``torchrun`` with several processes, join the group for the command (gloo on
    the CPU, NCCL when ``--device cuda``) and leave it afterwards; otherwise nothing.
    ``pretrain`` sets up its own group."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or args.command == "pretrain":
        yield
        return
    from hbird.distributed import cleanup_distributed, init_from_env, is_distributed

    owned = not is_distributed()  # a caller's own group is left to the caller
    init_from_env(getattr(args, "device", None))
    try:
        yield
    finally:
        if owned:
            cleanup_distributed()


def _positive_int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= 1, got {text!r}")
        return value

    return parse


def int_list(flag: str) -> Callable[[str], list[int]]:
    """An argparse type: ``"42,400,783"`` → ``[42, 400, 783]``, errors naming ``flag``."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(
                f"{flag} must be comma-separated integers like 42,400,783, got {text!r}"
            )
        return values

    return parse


def _value_parser(f: dataclasses.Field) -> Callable[[str], Any]:
    """Parse a flag's text and check it against the field's valid values."""
    kind = f.metadata.get("kind", str)

    def parse(text: str) -> Any:
        try:
            value = PARSERS[kind](text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{f.name} must be {KIND_NAMES[kind]}, got {text!r}"
            ) from None
        try:
            check_value(f, value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value

    return parse


def _default_text(f: dataclasses.Field, preset: dict[str, Any] | None) -> str:
    if f.metadata.get("default_text"):
        text = f.metadata["default_text"]
    elif isinstance(f.default, bool):
        text = "on" if f.default else "off"
    else:
        text = str(f.default)
    if preset is not None and f.name in preset:
        text = f"the preset's; hummingbird: {preset[f.name]}"
    return text


def add_spec_arguments(
    parser: argparse.ArgumentParser,
    spec: type,
    title: str,
    names: Iterable[str] | None = None,
    note: str | None = None,
    preset: dict[str, Any] | None = None,
    notes: dict[str, str] | None = None,
) -> None:
    """One flag per field of ``spec`` (a :mod:`hbird.specs` dataclass), from its metadata.

    Flags not given stay out of the namespace (read them with :func:`given_settings`),
    so the defaults are the spec's, a bank's, or a preset's. Numbers are checked against
    the field's valid range when parsed.

    Args:
        names: only these fields (default: all).
        note: appended to every default in the help (e.g. what ``--bank`` does to it).
        preset: the fields the default preset sets, shown as the defaults.
        notes: per-field notes that replace ``note``.
    """
    group = parser.add_argument_group(title)
    wanted = set(names) if names is not None else None
    for f in fields(spec):
        if wanted is not None and f.name not in wanted:
            continue
        kind = f.metadata.get("kind", str)
        field_note = (notes or {}).get(f.name, note)
        default = _default_text(f, preset) + (f"; {field_note}" if field_note else "")
        options: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind == "options":
            options.update(action="append", metavar="KEY=VALUE")
            default += "; repeatable"
        elif choices_of(f) is not None:
            options["choices"] = choices_of(f)
        else:
            options["type"] = _value_parser(f)
        group.add_argument(flag_of(f), help=f"{f.metadata['help']} (default: {default})", **options)


def given_settings(args: argparse.Namespace, spec: type) -> dict[str, Any]:
    """The fields of ``spec`` given on the command line, parsed (``KEY=VALUE`` → dict)."""
    given = {}
    for f in fields(spec):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            if f.metadata.get("kind") == "options":
                value = parse_pairs(value, flag_of(f), EXAMPLES.get(f.name, "name=value"))
            given[f.name] = value
    return given


def add_predictor_arguments(parser: argparse.ArgumentParser, with_bank: bool = False) -> None:
    """The bank spec's, the search settings' and the prompt labels' flags (``predict``,
    ``bank build``)."""
    add_spec_arguments(
        parser,
        BankSpec,
        "memory (how the bank is built)",
        note="fixed by the bank with --bank" if with_bank else None,
        notes={n: "with --bank: the bank's" for n in ("encoder", "weights")} if with_bank else None,
    )
    add_spec_arguments(
        parser,
        SearchConfig,
        "search",
        note="with --bank: the bank's" if with_bank else None,
    )
    add_label_arguments(parser)
    add_max_pixels_argument(parser)
    add_skip_bad_argument(parser)


LABEL_FLAGS = {"task": "--task", "num_classes": "--num-classes", "ignore_index": "--ignore-index"}
"""The prompt labels' flags (default None: not given)."""


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("labels")
    group.add_argument(
        "--task",
        choices=["segmentation", "depth"],
        help="default: from the label folder (masks/ or depth/)",
    )
    group.add_argument(
        "--num-classes", type=int, help="number of classes (default: from classes.txt)"
    )
    group.add_argument(
        "--ignore-index", type=int, help="class id of unlabelled pixels (default 255)"
    )


def predictor_from_args(args: argparse.Namespace) -> InContextPredictor:
    """A predictor with the flags given; the others keep the defaults of :mod:`hbird.specs`."""
    from hbird.predictor import InContextPredictor

    return InContextPredictor(
        **given_settings(args, BankSpec),
        **given_settings(args, SearchConfig),
        progress=not getattr(args, "quiet", False),
    )


def prompt_dataset(args: argparse.Namespace, root: str | Path) -> Any:
    """The user's prompt folder (``images/`` + ``masks/`` or ``depth/``) as a dataset, every
    file checked before any work (bad ones skipped with ``--skip-bad``)."""
    from hbird.data.folder import FolderDataset

    dataset = FolderDataset(
        root,
        task=args.task,
        num_classes=args.num_classes,
        ignore_index=255 if args.ignore_index is None else args.ignore_index,
    )
    return checked_dataset(dataset, "prompt", args.skip_bad)


def add_skip_bad_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable images and labels (each is listed) instead of stopping",
    )
