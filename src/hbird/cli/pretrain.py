"""``hbird pretrain``: pretrain a ViT for retrieval (one process, or many under torchrun).

    hbird pretrain --objective hummingbird --arch vit_small_patch16_224 \\
        --data imagefolder:root=/data/imagenet/train --out runs/hb
    torchrun --nproc-per-node 8 -m hbird.cli pretrain --objective ibot ...
    hbird pretrain --tiny --data synthetic:n=512:seed=0:size=64 --out runs/tiny \\
        --eval-prompt synthetic:n=24:seed=100:size=64 --eval-query synthetic:n=24:seed=200:size=64

Settings come from the flags, on top of an optional ``--config run.yaml`` whose keys are
:class:`~hbird.pretrain.PretrainConfig` fields. The encoder lands in
``<out>/checkpoint.safetensors``; use it with
``hbird predict --encoder <arch> --weights <out>/checkpoint.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hbird.errors import InputError
from hbird.io.options import parse_pairs

# flag destination → PretrainConfig field (same name unless listed)
_RENAMED = {
    "option": "objective_options",
    "model_option": "model_kwargs",
    "view_option": "view_options",
}


def _key_value_flag(group: Any, *flags: str, help: str) -> None:
    """A repeatable ``KEY=VALUE`` flag; its values are collected in a list (see _RENAMED)."""
    group.add_argument(
        *flags,
        action="append",
        default=argparse.SUPPRESS,
        metavar="KEY=VALUE",
        help=f"{help}; repeatable",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hbird.pretrain import OBJECTIVES

    s = argparse.SUPPRESS  # only flags given on the command line override --config
    parser.add_argument("--config", type=Path, default=s, help="YAML file of PretrainConfig fields")
    run = parser.add_argument_group("objective and model")
    run.add_argument(
        "--objective", choices=OBJECTIVES.names(), default=s, help="default hummingbird"
    )
    _key_value_flag(run, "--option", "-O", help="objective setting (e.g. -O pooling=mean)")
    run.add_argument(
        "--arch",
        default=s,
        help="timm ViT name (default vit_small_patch16_224) or a registered encoder "
        "(test_vit, test_elastic, elastic_resnext50, ...; ibot needs a ViT)",
    )
    _key_value_flag(run, "--model-option", help="timm.create_model option (drop_path_rate=0.1)")
    run.add_argument("--init-weights", default=s, help="weights file to start from")
    run.add_argument(
        "--tiny",
        action="store_true",
        default=s,
        help="a tiny ViT (patch 8, width 32, 2 blocks) with narrow heads, for CPU trials",
    )
    data = parser.add_argument_group("data and run")
    data.add_argument(
        "--data",
        default=s,
        help="dataset spec: imagefolder:root=<dir>, synthetic:n=..:seed=.., voc:root=...",
    )
    data.add_argument(
        "--out", default=s, help="run folder (checkpoints, metrics.jsonl, config.json)"
    )
    data.add_argument("--steps", type=int, default=s, help="optimizer steps (default 1000)")
    data.add_argument("--epochs", type=int, default=s, help="epochs (overrides --steps)")
    data.add_argument("--batch-size", type=int, default=s, help="global batch (default 256)")
    data.add_argument("--crop-size", type=int, default=s, help="view side in pixels (default 224)")
    data.add_argument("--min-scale", type=float, default=s, help="smallest crop area fraction")
    _key_value_flag(data, "--view-option", help="augmentation setting of every view (hue=0)")
    data.add_argument("--num-workers", type=int, default=s, help="loader workers per process")
    data.add_argument("--seed", type=int, default=s)
    data.add_argument(
        "--device", default=s, help="default cuda:<local rank> if available, else cpu"
    )
    data.add_argument(
        "--no-amp", dest="amp", action="store_false", default=s, help="no bf16 on GPU"
    )
    data.add_argument("--resume", action="store_true", default=s, help="continue the run in --out")
    data.add_argument("--log-every", type=int, default=s)
    data.add_argument("--save-every", type=int, default=s, help="steps between checkpoints")
    opt = parser.add_argument_group("optimisation (AdamW, warm-up + cosine)")
    opt.add_argument("--lr", type=float, default=s, help="peak learning rate (default 1e-3)")
    opt.add_argument("--min-lr", type=float, default=s)
    opt.add_argument("--weight-decay", type=float, default=s)
    opt.add_argument("--warmup-steps", type=int, default=s, help="default 10%% of the steps")
    opt.add_argument("--clip-grad", type=float, default=s, help="max gradient norm (default 1)")
    ev = parser.add_argument_group("online retrieval evaluation")
    ev.add_argument("--eval-prompt", default=s, help="annotated prompt set (dataset spec)")
    ev.add_argument("--eval-query", default=s, help="annotated query set (dataset spec)")
    ev.add_argument("--eval-every", type=int, default=s, help="steps between evaluations")
    ev.add_argument("--eval-image-size", type=int, default=s)
    ev.add_argument("--eval-k", type=int, default=s)
    ev.add_argument("--eval-temperature", type=float, default=s)
    ev.add_argument("--eval-limit", type=int, default=s, help="read at most N images per set")


def config_from_args(args: argparse.Namespace) -> Any:
    """Merge ``--config`` (YAML), ``--tiny`` and the flags given into a PretrainConfig."""
    from hbird.pretrain import PretrainConfig
    from hbird.pretrain.backbone import is_registered_arch
    from hbird.pretrain.presets import TINY_ARCH, TINY_VIT_KWARGS, tiny_options

    fields: dict[str, Any] = {}
    if "config" in args:
        import yaml

        if not args.config.is_file():
            raise InputError(f"config file {args.config} does not exist")
        loaded = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise InputError(
                f"config file {args.config} must hold a mapping of PretrainConfig fields"
            )
        fields.update(loaded)
    given = {
        _RENAMED.get(k, k): v
        for k, v in vars(args).items()
        if k not in ("config", "command", "tiny") and not k.startswith("_")
    }
    for flag, field in _RENAMED.items():
        if field in given:
            option = "--" + flag.replace("_", "-")
            pairs = parse_pairs(given[field], option, "contextualize=false")
            given[field] = {**fields.get(field, {}), **pairs}
    fields.update(given)
    if getattr(args, "tiny", False):
        objective = fields.get("objective", "hummingbird")
        fields.setdefault("arch", TINY_ARCH)
        if not is_registered_arch(fields["arch"]):  # registered test_* models are tiny already
            fields["model_kwargs"] = {**TINY_VIT_KWARGS, **fields.get("model_kwargs", {})}
        fields["objective_options"] = tiny_options(objective, **fields.get("objective_options", {}))
        fields.setdefault("crop_size", 64)
        fields.setdefault("eval_image_size", 64)
    known = set(PretrainConfig.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise InputError(
            f"unknown pretraining setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
    config = PretrainConfig(**fields)
    try:
        config.validate()
    except ValueError as err:
        raise InputError(str(err)) from None
    return config


def interrupted(args: argparse.Namespace) -> str:
    out = config_from_args(args).out
    return (
        f"the checkpoints saved so far (every --save-every steps) are in {out}; "
        "add --resume to the same command to continue from the last one"
    )


def run(args: argparse.Namespace) -> int:
    from hbird.pretrain import Trainer
    from hbird.pretrain.distributed import cleanup_distributed, init_distributed

    config = config_from_args(args)
    if config.data is None:
        raise InputError("give --data (imagefolder:root=<dir> or synthetic:n=..:seed=..)")
    info = init_distributed(device=config.device)
    try:
        try:
            last = Trainer(config, dist=info).fit()
        except ValueError as err:  # bad objective options and the like
            raise InputError(str(err)) from None
        if info.is_main:
            out = Path(config.out)
            print(json.dumps(last, sort_keys=True))
            print(
                f"encoder written to {out / 'checkpoint.safetensors'}; use it with "
                f"hbird predict --encoder {config.arch} --weights {out / 'checkpoint.safetensors'}"
                + (
                    " (its model options are read from the file's metadata)"
                    if config.model_kwargs
                    else ""
                )
            )
    finally:
        cleanup_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m hbird.cli.pretrain`` (also under torchrun) without the ``hbird`` wrapper."""
    from hbird.errors import HbirdError

    parser = argparse.ArgumentParser(prog="hbird pretrain", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (HbirdError, FileNotFoundError, ImportError) as err:
        print(f"hbird pretrain: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
