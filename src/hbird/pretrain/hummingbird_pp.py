"""Hummingbird++ (Balazevic et al. 2023, §3.4): retrieval-based supervision added.

The memory ``M_p`` also stores each entry's image label. The pooled online feature of a
view cross-attends over the labelled entries (cosine similarity over a temperature), and
the attention-weighted one-hot labels are its class prediction; their cross-entropy with
the image's label is added to the Hummingbird loss with weight α. Entries without a
label (the random initial memory) are left out; images whose class has no entry in the
memory yet do not count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hbird.pretrain.backbone import Backbone
from hbird.pretrain.distributed import mean_over_processes
from hbird.pretrain.hummingbird import Hummingbird, HummingbirdConfig, LabelledMemory
from hbird.pretrain.objective import OBJECTIVES, Batch


def retrieval_class_loss(
    pooled: torch.Tensor,
    memory_keys: torch.Tensor,
    memory_labels: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    temperature: float,
) -> torch.Tensor:
    """Cross-entropy of the class prediction retrieved from the memory.

    Args:
        pooled: ``(B, D)`` pooled online features (queries).
        memory_keys: ``(M, D)`` keys; memory_labels: ``(M,)`` their labels (``-1`` = none).
        labels: ``(B,)`` image labels (``-1`` = unknown, not counted).
        num_classes: number of image classes ``C``.
        temperature: softmax temperature of the attention.

    Returns:
        ``Σ_b −log p_b[y_b]`` over the counted images, divided by their number averaged
        over processes (so the DDP average equals the global mean), where
        ``p_b = Σ_j softmax_j(ŷ_b · k̂_j / τ) onehot(l_j)``.
    """
    labelled = memory_labels >= 0
    onehot = F.one_hot(memory_labels.clamp_min(0), num_classes).to(pooled.dtype)
    onehot = onehot * labelled.unsqueeze(1)  # (M, C)
    present = onehot.sum(dim=0) > 0  # (C,)
    counted = (labels >= 0) & present[labels.clamp_min(0)]
    count = mean_over_processes(counted.sum().to(pooled.dtype)).clamp_min(1.0)
    if not bool(counted.any()):
        return pooled.sum() * 0.0
    sims = F.normalize(pooled, dim=-1) @ F.normalize(memory_keys, dim=-1).T / temperature
    attention = sims.masked_fill(~labelled, float("-inf")).softmax(dim=-1)  # (B, M)
    probs = attention @ onehot  # (B, C)
    picked = probs[counted, labels[counted]]
    return -torch.log(picked.clamp_min(1e-12)).sum() / count


@dataclass(frozen=True)
class HummingbirdPlusPlusConfig(HummingbirdConfig):
    """:class:`HummingbirdConfig` plus α (``label_weight``) and the label attention temperature."""

    label_weight: float = 1.0
    label_temperature: float = 0.1


@OBJECTIVES.register("hummingbird++")
class HummingbirdPlusPlus(Hummingbird):
    """Hummingbird with the retrieval-based supervised term (needs image labels)."""

    name = "hummingbird++"
    Config = HummingbirdPlusPlusConfig
    needs_labels = True

    def __init__(
        self, backbone: Backbone, config: HummingbirdPlusPlusConfig, num_classes: int
    ) -> None:
        if num_classes < 2:
            raise ValueError(
                f"hummingbird++ needs labelled images of at least 2 classes, got {num_classes}; "
                "use an image folder with one sub-folder per class"
            )
        self.num_classes = num_classes
        super().__init__(backbone, config)

    @property
    def uses_memory(self) -> bool:
        return True

    def extra_losses(
        self, batch: Batch, pooled: list[torch.Tensor], memory: LabelledMemory | None
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        keys, labels = memory
        terms = [
            retrieval_class_loss(
                y, keys, labels, batch.labels, self.num_classes, cfg.label_temperature
            )
            for y in pooled
        ]
        return {"retrieval_ce": cfg.label_weight * sum(terms) / len(terms)}
