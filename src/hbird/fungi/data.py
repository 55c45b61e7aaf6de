"""Labelled image sets for kNN classification (``hbird fungi knn --dataset ...``); audio
sets are in :mod:`hbird.data.audio` (``--modality audio``).

Specs (fields separated by ``:``, as for dense datasets):

``folder:root=/data/pets``
    ``root/<split>/<class name>/<image>`` (the ImageFolder layout); classes are the
    sorted sub-folder names of the training split. A split in hbird's dense layout
    (``root/<split>/images`` + ``masks``) also works: an image's label is the most frequent
    non-zero class of its mask (class 0 is taken as background).
``synthetic:train=200:val=100:classes=8:size=64:seed=0``
    seeded synthetic images with a single textured shape each, labelled by its class
    (``hbird.data.synthetic``); ``<split>=N`` gives each split's size. Offline; for demos
    and tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import torch

from hbird.data.datasets import DenseDataset, create_dataset
from hbird.errors import InputError
from hbird.io.images import list_images, load_image, load_mask
from hbird.io.options import parse_spec
from hbird.io.seeds import derive_seed


class LazyImages(Sequence):
    """Images read on access (``(3, H, W)`` float32 in [0, 1]); slicing stays lazy.

    ``sources`` are what ``load`` reads one image from: image files (the default) or the
    indices of a dataset (``LazyImages.of(dataset)``).
    """

    def __init__(
        self, sources: Sequence[Any], load: Callable[[Any], torch.Tensor] = load_image
    ) -> None:
        self.sources, self.load = list(sources), load

    @classmethod
    def of(cls, dataset: DenseDataset) -> LazyImages:
        return cls(range(len(dataset)), lambda i: dataset[i].image)

    def __len__(self) -> int:
        return len(self.sources)

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self.load(p) for p in self.sources[index]]
        return self.load(self.sources[index])


@dataclass(frozen=True)
class LabelledImages:
    """Images with one class id each.

    Attributes:
        images: ``N`` images ``(3, H, W)`` in [0, 1] (a list or a lazy sequence).
        labels: ``(N,)`` int64 class ids.
        class_names: one name per class id.
    """

    images: Sequence[torch.Tensor]
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def inputs(self) -> Sequence[torch.Tensor]:
        """What a FUNGI image backbone takes: the images."""
        return self.images

    @classmethod
    def of(cls, dataset: DenseDataset) -> LabelledImages:
        """The images of a dataset with image-level classes, read lazily."""
        labels = torch.tensor(dataset.image_labels, dtype=torch.int64)
        return cls(LazyImages.of(dataset), labels, dataset.image_classes)


def synthetic_classification(
    n: int, seed: int = 0, num_classes: int = 4, size: int = 64
) -> LabelledImages:
    """``n`` seeded images of one shape each; image ``i`` shows class ``i % num_classes``.

    The ``synthetic`` dataset with one shape per image: the shape's class sets its look
    (shape, hue, texture: ``hbird.data.synthetic``); position, size, rotation, colour
    jitter and the background vary per image.
    """
    if n < 1 or num_classes < 2:
        raise InputError(
            f"synthetic classification needs at least 1 image and 2 classes, got {n} images "
            f"and classes={num_classes}; give each split a size >= 1 (e.g. synthetic:train=200:val=100)"
        )
    dataset = create_dataset(
        name="synthetic",
        n=n,
        seed=seed,
        size=size,
        classes=num_classes + 1,  # the background is never an image's class
        num_objects=(1, 1),
        object_size=(0.45 * size, 0.85 * size),
    )
    return LabelledImages.of(dataset)


def _dominant_classes(split_dir: Path) -> LabelledImages:
    paths = list_images(split_dir / "images")
    labels = []
    for path in paths:
        mask_path = split_dir / "masks" / f"{path.stem}.png"
        if not mask_path.is_file():
            raise InputError(f"{path} has no mask {mask_path}; every image needs one")
        mask = load_mask(mask_path)
        counts = torch.bincount(mask[(mask > 0) & (mask < 255)].reshape(-1))
        if counts.numel() == 0:
            raise InputError(
                f"{mask_path} has no foreground class (only 0 or 255); cannot label the image"
            )
        labels.append(int(counts.argmax()))
    names_file = split_dir / "classes.txt"
    if not names_file.is_file():
        names_file = split_dir.parent / "classes.txt"
    top = max(labels)
    names = (
        tuple(names_file.read_text(encoding="utf-8").splitlines())[: top + 1]
        if names_file.is_file()
        else tuple(str(c) for c in range(top + 1))
    )
    return LabelledImages(LazyImages(paths), torch.tensor(labels, dtype=torch.int64), names)


def _class_folders(root: Path, split: str) -> LabelledImages:
    """``root/<split>/<class>/<image>``; classes are the sub-folder names of every split,
    so class ids agree across splits."""
    splits = [d for d in root.iterdir() if d.is_dir()]
    classes = sorted({c.name for s in splits for c in s.iterdir() if c.is_dir()})
    if not classes:
        raise InputError(f"{root / split} has no images in class sub-folders <class>/<image>")
    return LabelledImages.of(create_dataset(name="imagefolder", root=root / split, classes=classes))


def load_classification(spec: str, split: str, modality: str = "image") -> Any:
    """The ``split`` of the labelled set named by ``spec``: images (see the module docs), or
    with ``modality="audio"`` clips (:mod:`hbird.data.audio`); ``.inputs`` are what the
    FUNGI backbone takes, ``.labels`` their classes."""
    if modality not in ("image", "audio"):
        raise InputError(f"unknown modality {modality!r}; the kNN datasets are image or audio")
    name, kwargs = parse_spec(spec)
    if name == "synthetic":
        if split not in kwargs:
            raise InputError(f"{spec!r} gives no size for split {split!r}; add :{split}=<count>")
        n, seed = int(kwargs[split]), derive_seed(int(kwargs.get("seed", 0)), "split", split)
        num_classes = int(kwargs.get("classes", 4))
        if modality == "audio":
            from hbird.data.audio import synthetic_tones

            rate, seconds = int(kwargs.get("rate", 8000)), float(kwargs.get("seconds", 0.5))
            return synthetic_tones(n, seed % 2**32, num_classes, rate, seconds)
        return synthetic_classification(n, seed % 2**32, num_classes, int(kwargs.get("size", 64)))
    if modality == "audio":
        from hbird.data.audio import load_audio_classification

        return load_audio_classification(spec, split)
    if name == "folder":
        if "root" not in kwargs:
            raise InputError(f"{spec!r} needs root=<folder>, e.g. folder:root=/data/pets")
        split_dir = Path(str(kwargs["root"])) / split
        if not split_dir.is_dir():
            raise InputError(
                f"{split_dir} does not exist; the folder needs one sub-folder per split"
            )
        if (split_dir / "images").is_dir() and (split_dir / "masks").is_dir():
            return _dominant_classes(split_dir)
        return _class_folders(split_dir.parent, split)
    raise InputError(
        f"unknown classification dataset {name!r} in {spec!r}; use folder:root=... or synthetic:..."
    )
