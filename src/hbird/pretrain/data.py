"""Pretraining data: images of any registered dataset, and the per-sample view
generation that makes runs reproducible on any number of processes.

Data specs (``--data``) name a :data:`hbird.data.DATASETS` entry (:mod:`hbird.data.imagesets`):

* ``imagefolder:root=/data/imagenet/train`` — every image under ``root``; if ``root`` has
  sub-folders, each one is a class (labels for Hummingbird++), images found recursively.
* ``synthetic:n=512:seed=0:size=64:classes=4`` — seeded synthetic scenes
  (:mod:`hbird.data.synthetic`); an image's label is the shape class it always contains.
* any other dataset (``voc:root=...``): its images, without image labels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from hbird.data.datasets import DenseDataset, create_dataset
from hbird.data.imagesets import ImageFolderDataset, SyntheticDataset
from hbird.errors import InputError
from hbird.io.seeds import make_generator
from hbird.pretrain.augment import ViewSampler
from hbird.pretrain.objective import Batch
from hbird.registry import UnknownNameError


class ImageLabels(Dataset):
    """Items ``(image (3, H, W) in [0, 1], image-level class or -1)`` of any dataset.

    ``dataset`` is a :data:`hbird.data.DATASETS` dataset; its ``image_labels`` are the
    labels (Hummingbird++ reads them), ``-1`` for a dataset whose images have no class.
    """

    def __init__(self, dataset: DenseDataset) -> None:
        self.dataset = dataset
        self.classes = dataset.image_classes
        self.labels = dataset.image_labels

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.dataset[i].image, self.labels[i]


class ImageFolder(ImageLabels):
    """``imagefolder``: the images under ``root``, labelled by class sub-folder."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(ImageFolderDataset(root))


class SyntheticImages(ImageLabels):
    """``synthetic``: seeded scenes, labelled by the shape class each always holds."""

    def __init__(
        self, n: int = 512, seed: int = 0, size: int = 64, classes: int = 4, **scene_options: Any
    ) -> None:
        super().__init__(SyntheticDataset(n, seed, size, classes, **scene_options))


def create_image_dataset(spec: str) -> ImageLabels:
    """The images of any registered dataset spec (see the module docstring), with labels."""
    try:
        return ImageLabels(create_dataset(spec))
    except UnknownNameError as err:
        raise InputError(f"unknown pretraining data in --data {spec!r}: {err}") from None


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample's augmentation: a function of ``(seed, epoch, index)`` only."""
    return make_generator(seed, "views", epoch, index)


class ViewDataset(Dataset):
    """Wraps an image dataset: item ``i`` → its views for the current epoch.

    Call :meth:`set_epoch` before each epoch (the sampler does it through the trainer).
    """

    def __init__(self, images: Dataset, views: ViewSampler, seed: int = 0) -> None:
        self.images, self.views, self.seed = images, views, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, label = self.images[i]
        out = self.views(image, sample_generator(self.seed, self.epoch, i))
        return {"views": out.views, "masks": out.masks, "label": int(label)}


def collate(items: Sequence[dict[str, Any]]) -> Batch:
    """Stack per-sample views into a :class:`Batch` (view sizes must agree per position)."""
    views = [torch.stack(vs) for vs in zip(*(it["views"] for it in items))]
    masks = None
    if items[0]["masks"] is not None:
        masks = [torch.stack(ms) for ms in zip(*(it["masks"] for it in items))]
    labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
    return Batch(views=views, labels=labels, masks=masks)


class EpochSampler(Sampler[int]):
    """Seeded shuffling split across processes, resumable mid-epoch.

    Each epoch is a permutation of ``range(n)`` fixed by ``(seed, epoch)``, truncated to a
    multiple of the global batch; process ``r`` takes its own contiguous slice of each
    global batch, so global batch ``t`` holds the same images for any number of
    processes. ``start_batch`` skips the batches already done (resume).
    """

    def __init__(
        self,
        n: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if n < global_batch:
            raise InputError(
                f"the data has {n} images, fewer than one global batch of {global_batch}; "
                "lower --batch-size or add images"
            )
        if global_batch % world_size:
            raise ValueError(
                f"--batch-size {global_batch} must be divisible by the number of processes {world_size}"
            )
        self.n, self.global_batch = n, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.local_batch = global_batch // world_size
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.local_batch

    def __iter__(self) -> Iterator[int]:
        gen = make_generator(self.seed, "order", self.epoch)
        order = torch.randperm(self.n, generator=gen)
        for t in range(self.start_batch, self.batches_per_epoch):
            start = t * self.global_batch + self.rank * self.local_batch
            yield from order[start : start + self.local_batch].tolist()
