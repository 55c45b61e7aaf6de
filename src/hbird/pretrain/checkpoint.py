"""Pretraining checkpoints in safetensors.

A run folder holds two files:

* ``checkpoint.safetensors`` — the exported backbone as a plain timm state dict, loadable
  with ``hbird.encoders.create_encoder(arch, weights=path, **model_kwargs)`` (or
  :func:`encoder_from_checkpoint`, which reads ``arch`` and ``model_kwargs`` from the
  file's metadata). Metadata keys (:mod:`hbird.io.checkpoints`): ``format``, ``arch``,
  ``model_kwargs``, ``mean``/``std``, ``objective``, ``step`` and ``config`` (JSON).
* ``trainer_state.safetensors`` — everything needed to resume: the objective's full state
  (online and target networks, heads, queues, centres) under ``objective.``, the
  optimizer's tensors under ``optimizer.``, and in the metadata the step, the optimizer's
  ``param_groups`` and the run config.

Files are written to a temporary name and renamed into place, so a killed run never
leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hbird.errors import InputError
from hbird.io.checkpoints import (
    FORMAT,
    architecture_options,
    is_hbird_checkpoint,
    read_metadata,
)
from hbird.io.files import save_tensors

EXPORT_NAME = "checkpoint.safetensors"
STATE_NAME = "trainer_state.safetensors"


def save_export(backbone: nn.Module, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write ``backbone.model``'s timm state dict with ``metadata`` (strings)."""
    path = Path(path)
    meta = {"format": FORMAT, **backbone.metadata(), **metadata}
    save_tensors(path, dict(backbone.model.state_dict()), meta)
    return path


def encoder_from_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Load an exported checkpoint as a frozen :class:`~hbird.encoders.Encoder`.

    The architecture and its non-default options come from the file's metadata.
    """
    from hbird.encoders import create_encoder

    meta = read_metadata(path)
    if "arch" not in meta:
        raise InputError(
            f"{path} has no 'arch' in its metadata, so it is not an hbird pretraining checkpoint; "
            "load it with create_encoder(<arch>, weights=...) instead"
        )
    kwargs = architecture_options(meta).get("model_kwargs", {})
    return create_encoder(meta["arch"], weights=path, device=device, **kwargs)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = json.dumps({"param_groups": state["param_groups"], "scalars": scalars})
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups_json: str) -> dict[str, Any]:
    info = json.loads(groups_json)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in info["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": info["param_groups"]}


def save_state(
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    path: str | Path,
    config: dict[str, Any],
) -> Path:
    """Write everything :func:`load_state` needs to resume at ``step``."""
    path = Path(path)
    tensors = {f"objective.{k}": v for k, v in objective.state_dict().items()}
    opt_tensors, groups = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    meta = {
        "format": FORMAT,
        "step": str(step),
        "optimizer": groups,
        "config": json.dumps(config, sort_keys=True, default=str),
    }
    save_tensors(path, tensors, meta)
    return path


def load_state(
    path: str | Path, objective: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[int, dict[str, Any]]:
    """Restore ``objective`` (and ``optimizer``) from :func:`save_state`; return ``(step, config)``.

    Raises:
        InputError: the file is not a trainer state or does not fit the objective.
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    if not is_hbird_checkpoint(meta, path) or "step" not in meta:
        raise InputError(f"{path} is not an hbird trainer state (format {meta.get('format')!r})")
    tensors = load_file(str(path))
    own = {k[len("objective.") :]: v for k, v in tensors.items() if k.startswith("objective.")}
    try:
        objective.load_state_dict(own)
    except RuntimeError as err:
        raise InputError(
            f"trainer state {path} does not fit this objective/architecture ({err}); "
            "resume with the same --objective, --arch and options, or use a new --out folder"
        ) from None
    if optimizer is not None:
        # Optimizer.load_state_dict moves each state tensor next to its parameter.
        opt = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
        optimizer.load_state_dict(_unflatten_optimizer(opt, meta["optimizer"]))
    return int(meta["step"]), json.loads(meta.get("config", "{}"))


def resume_state(
    out: Path,
    resume: bool,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    must_match: dict[str, Any],
    what: str = "run",
) -> tuple[int, dict[str, Any]] | None:
    """Continue the run in ``out`` (``--resume``) or check that a new one may start there.

    Returns:
        ``(step, saved config)`` after restoring ``module`` and ``optimizer`` from
        ``out/`` :data:`STATE_NAME`; ``None`` when a new run starts (nothing saved there).

    Raises:
        InputError: ``resume`` without a saved state, a saved state without ``resume``
            (it is never overwritten), or a saved config that differs from ``must_match``
            (``{config field: this run's value}``).
    """
    state = out / STATE_NAME
    if not state.exists():
        if resume:
            where = "folder" if out.is_dir() else "folder, and it does not exist"
            raise InputError(
                f"--resume: {out} holds no {what} to continue (no {state.name} in the "
                f"{where}); check --out, or drop --resume to start a new run"
            )
        return None
    if not resume:
        raise InputError(
            f"{out} already holds a {what} ({state.name}); pass --resume to continue it "
            "or choose another --out folder"
        )
    step, saved = load_state(state, module, optimizer)
    for key, value in must_match.items():
        if key in saved and saved[key] != value:
            raise InputError(
                f"cannot resume {state}: it was trained with {key}={saved[key]!r}, not {value!r}"
            )
    return step, saved
