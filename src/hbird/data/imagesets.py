"""Image sets with one class per image: the ``synthetic`` and ``imagefolder`` datasets.

Both are ordinary :data:`~hbird.data.datasets.DATASETS` entries (``create_dataset``
builds them from a spec) and also carry image-level classes (``image_labels``), which
is what pretraining and kNN classification read::

    synthetic:n=512:seed=0:size=64:classes=4
    imagefolder:root=/data/imagenet/train
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hbird.data.datasets import DATASETS, DenseDataset, Sample
from hbird.errors import InputError
from hbird.io.images import IMAGE_SUFFIXES, file_size, load_image
from hbird.labelspec import LabelSpec


class SyntheticDataset(DenseDataset):
    """Seeded synthetic scenes (:mod:`hbird.data.synthetic`), drawn lazily on access.

    Scene ``i`` is scene ``i`` of ``make_scenes(n, seed, num_classes=classes,
    size=(size, size), **scene_options)``: any ``n`` costs no memory and scene ``i`` does
    not depend on ``n``. Labels are the ``(H, W)`` masks (``classes`` classes, background
    included); the image-level label of scene ``i`` is the shape class it always holds,
    ``i % (classes - 1)`` (0-based over the shapes).

    Args:
        n: number of scenes. seed: the seed of the whole set.
        size: image side in pixels. classes: classes including the background.
        **scene_options: further ``make_scene`` options (``noise``, ``colour_jitter``,
            ``num_objects``, ``object_size``, ``max_overlap``, ``ignore_boundary``).
    """

    def __init__(
        self, n: int = 512, seed: int = 0, size: int = 64, classes: int = 4, **scene_options: Any
    ) -> None:
        from hbird.data.synthetic import default_class_names, make_scene  # draws in PIL, viz

        drawn_here = {"rng_or_seed", "size", "num_classes", "include_class"}
        options = sorted(set(inspect.signature(make_scene).parameters) - drawn_here)
        unknown = sorted(set(scene_options) - set(options))
        if unknown:
            raise InputError(
                f"bad arguments for synthetic data: it does not take {', '.join(unknown)}; it takes "
                f"n, seed, size, classes, {', '.join(options)}"
            )
        if int(n) < 1 or int(classes) < 2:
            raise InputError(
                f"synthetic data needs n >= 1 images and classes >= 2 (background plus a shape), "
                f"got n={n}, classes={classes}"
            )
        self.size, self.num_scene_classes = int(size), int(classes)
        self.scene_options = scene_options
        self._seeds = np.random.SeedSequence(int(seed)).spawn(int(n))  # as make_scenes draws them
        names = default_class_names(self.num_scene_classes)
        spec = LabelSpec(
            "segmentation", num_classes=len(names), ignore_index=255, class_names=names
        )
        self.image_classes = names[1:]
        super().__init__(range(int(n)), spec, f"synthetic(n={n}, seed={seed}, size={size})")

    def _name(self, item: int) -> str:
        return f"synthetic_{item:05d}"

    def _image_label(self, item: int) -> int:
        return item % (self.num_scene_classes - 1)

    def _load(self, item: int) -> Sample:
        from hbird.data.synthetic import make_scene

        scene = make_scene(
            np.random.default_rng(self._seeds[item]),
            size=(self.size, self.size),
            num_classes=self.num_scene_classes,
            include_class=1 + self._image_label(item),
            **self.scene_options,
        )
        return Sample(self._name(item), scene.image, scene.mask)


def _walk_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` at any depth, in sorted order; hidden folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath, f) for f in sorted(filenames) if Path(f).suffix.lower() in IMAGE_SUFFIXES
        ]
    return found


class ImageFolderDataset(DenseDataset):
    """Images under ``root``, optionally one sub-folder per class (found at any depth).

    The class of an image is the index of its sub-folder in ``classes`` (default: the
    sorted sub-folder names); without sub-folders the images directly in ``root`` have
    no class (``-1``). The per-pixel label is the image's class everywhere (``-1``, the
    ignore index, for an image without a class). Names are paths relative to ``root`` without suffix.

    Args:
        root: the folder.
        classes: the class names in id order, e.g. to keep ids equal across the splits of
            a dataset (a class without a sub-folder here simply has no images).
    """

    def __init__(self, root: str | Path, classes: Sequence[str] | None = None) -> None:
        self.root = Path(str(root)).expanduser()
        if not self.root.is_dir():
            raise InputError(f"image folder {self.root} does not exist; check root=")
        found = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        self.image_classes = tuple(found if classes is None else classes)
        if self.image_classes:
            items = [
                (path, label)
                for label, name in enumerate(self.image_classes)
                if (self.root / name).is_dir()
                for path in _walk_images(self.root / name)
            ]
        else:
            items = [(path, -1) for path in _walk_images(self.root)]
        if not items:
            raise InputError(
                f"no images found under {self.root} (looked for {', '.join(IMAGE_SUFFIXES)}); "
                "point root= at a folder of images or of class sub-folders"
            )
        spec = LabelSpec(
            "segmentation",
            num_classes=max(len(self.image_classes), 1),
            ignore_index=-1,
            class_names=self.image_classes or None,
        )
        super().__init__(items, spec, f"imagefolder(root={self.root})")

    def _name(self, item: tuple[Path, int]) -> str:
        return item[0].relative_to(self.root).with_suffix("").as_posix()

    def _image_label(self, item: tuple[Path, int]) -> int:
        return item[1]

    def bad_files(self, limit: int | None = None) -> list[tuple[int, str]]:
        """``(index, problem)`` for every image (the first ``limit``) that does not open and
        verify (headers only, no decoding)."""
        bad = []
        for i, (path, _) in enumerate(self._items[:limit]):
            try:
                file_size(path, "image")
            except InputError as err:
                bad.append((i, str(err)))
        return bad

    def _load(self, item: tuple[Path, int]) -> Sample:
        path, label = item
        image = load_image(path)
        mask = torch.full(image.shape[-2:], label, dtype=torch.int64)
        return Sample(self._name(item), image, mask, path)


DATASETS.register("synthetic", SyntheticDataset)
DATASETS.register("imagefolder", ImageFolderDataset)
