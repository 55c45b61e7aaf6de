"""Training the linear head: SGD over shuffled mini-batches of prompt patches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hbird.eval.linear_probe.head import LinearHead
from hbird.eval.linear_probe.patches import PatchTable
from hbird.eval.linear_probe.settings import ProbeSettings, learning_rate
from hbird.labelspec import LabelSpec


def _mean_std(x: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and std of ``(N, D)`` in float64, without a float64 copy of ``x``."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].to(torch.float64)
        total += part.sum(0)
        squares += (part**2).sum(0)
    mean = total / x.shape[0]
    var = (squares / x.shape[0] - mean**2).clamp_min(0)
    return mean, var.sqrt().clamp_min(1e-6)


def _loss(output: torch.Tensor, target: torch.Tensor, spec: LabelSpec, settings: ProbeSettings):
    if spec.is_classification:
        return F.cross_entropy(output, target)  # soft targets: class fractions per patch
    if settings.regression_loss == "l1":
        return F.l1_loss(output, target)
    return F.mse_loss(output, target)


def train_linear_head(
    table: PatchTable, spec: LabelSpec, settings: ProbeSettings, progress: bool = True
) -> tuple[LinearHead, list[float]]:
    """Train a :class:`LinearHead` on ``table``; returns it and the mean loss of every epoch."""
    settings.validate()
    feature_mean, feature_std = _mean_std(table.features)
    targets = table.targets
    target_mean = target_std = None
    if not spec.is_classification:
        target_mean, target_std = _mean_std(targets)
        targets = (targets - target_mean.float()) / target_std.float()
    head = LinearHead(feature_mean, feature_std, spec.value_dim, target_mean, target_std)
    optimiser = torch.optim.SGD(
        head.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    generator = torch.Generator().manual_seed(settings.seed)
    n, batch = len(table), settings.patch_batch_size
    steps_per_epoch = math.ceil(n / batch)
    losses, step = [], 0
    bar = tqdm(range(settings.epochs), desc="linear probe", unit="epoch", disable=not progress)
    for _ in bar:
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, batch):
            ids = order[start : start + batch]
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(settings, step, steps_per_epoch)
            loss = _loss(head.standardised(table.features[ids]), targets[ids], spec, settings)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(ids)
            step += 1
        losses.append(total / n)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return head.eval(), losses
