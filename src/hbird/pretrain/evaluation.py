"""Online retrieval evaluation: the model-selection signal of Hummingbird (appendix D.2).

Every N steps the exported backbone is frozen into an encoder, a memory is built from a
small annotated prompt set, and the query set is segmented by eq.-1 retrieval; the
score is the mIoU over the query set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hbird.data.datasets import DenseDataset, create_dataset
from hbird.data.imagesets import SyntheticDataset
from hbird.errors import InputError
from hbird.pretrain.backbone import Backbone


@dataclass
class LabelledSet:
    """Images ``(3, H, W)`` in [0, 1] with ``(H, W)`` int64 masks."""

    images: list[torch.Tensor]
    masks: list[torch.Tensor]
    num_classes: int
    ignore_index: int | None = 255

    @classmethod
    def from_dataset(cls, dataset: DenseDataset, limit: int | None = None) -> LabelledSet:
        """The first ``limit`` (default: all) samples of a segmentation dataset."""
        if not dataset.label_spec.is_classification:
            raise InputError(
                f"online evaluation needs a segmentation dataset; {dataset!r} is {dataset.label_spec.task}"
            )
        count = len(dataset) if limit is None else min(limit, len(dataset))
        samples = [dataset[i] for i in range(count)]
        return cls(
            [s.image for s in samples],
            [s.label for s in samples],
            dataset.label_spec.num_classes,
            dataset.label_spec.ignore_index,
        )


def synthetic_set(
    n: int, seed: int, size: int = 64, classes: int = 4, **scene_options: Any
) -> LabelledSet:
    """``n`` seeded synthetic scenes (``scene_options`` go to ``make_scene``)."""
    return LabelledSet.from_dataset(SyntheticDataset(n, seed, size, classes, **scene_options))


def labelled_set(spec: str, limit: int | None = None) -> LabelledSet:
    """A prompt/query set from any segmentation dataset spec (``synthetic:n=..:seed=..``,
    ``voc:root=...:split=val``, ``folder:...``), capped at ``limit`` images."""
    return LabelledSet.from_dataset(create_dataset(spec), limit)


class RetrievalProbe:
    """Retrieval mIoU of a backbone on a fixed prompt/query split.

    Args:
        prompt, query: the annotated sets (same classes).
        image_size: short side the encoder sees. k, temperature: eq. 1.
        memory_size: prompt memory budget (None = every labelled patch).
    """

    def __init__(
        self,
        prompt: LabelledSet,
        query: LabelledSet,
        image_size: int = 224,
        k: int = 30,
        temperature: float = 0.02,
        memory_size: int | None = None,
        batch_size: int = 32,
    ) -> None:
        if prompt.num_classes != query.num_classes:
            raise ValueError(
                f"prompt and query sets have {prompt.num_classes} and {query.num_classes} classes"
            )
        self.prompt, self.query = prompt, query
        self.image_size, self.k, self.temperature = image_size, k, temperature
        self.memory_size, self.batch_size = memory_size, batch_size

    @torch.no_grad()
    def __call__(self, backbone: Backbone, device: str | torch.device = "cpu") -> dict[str, Any]:
        """``{"miou": float, "pixel_accuracy": float}`` for a frozen copy of ``backbone``."""
        from hbird.eval.scoring import in_memory, score_queries
        from hbird.metrics import ConfusionMatrix
        from hbird.predictor import InContextPredictor

        encoder = backbone.frozen_encoder()
        predictor = InContextPredictor(
            encoder=encoder,
            image_size=self.image_size,
            k=self.k,
            temperature=self.temperature,
            memory_size=self.memory_size,
            index="exact",
            batch_size=self.batch_size,
            device=device,
            progress=False,
        )
        predictor.fit(
            self.prompt.images,
            self.prompt.masks,
            num_classes=self.prompt.num_classes,
            ignore_index=self.prompt.ignore_index,
        )
        scored = score_queries(
            lambda images: [labels.cpu() for labels in predictor.predict(images)],
            in_memory(self.query.images, self.query.masks),
            ConfusionMatrix(self.query.num_classes, ignore_index=self.query.ignore_index),
            batch_size=self.batch_size,
            progress=False,
        )
        scores = scored.metric.compute()
        return {"miou": float(scores.miou), "pixel_accuracy": float(scores.pixel_accuracy)}


def probe_from_specs(
    prompt: str, query: str, image_size: int, k: int, temperature: float, limit: int | None = None
) -> RetrievalProbe:
    return RetrievalProbe(
        labelled_set(prompt, limit), labelled_set(query, limit), image_size, k, temperature
    )
