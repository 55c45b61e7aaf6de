"""KITTI-STEP semantic segmentation: the class id is the R channel of its panoptic PNGs.

Layout (deeplab2's ``kitti_step.md``)::

    root/images/{train,val}/<sequence %04d>/<frame %06d>.png
    root/panoptic_maps/{train,val}/<sequence>/<frame>.png     R = class, 256·G + B = instance

Images still in KITTI's own ``root/training/image_02/<sequence>/`` are found there too
(the split is then given by the sequences under ``panoptic_maps/<split>``). The classes
are Cityscapes' 19 train ids; 255 is void. Sample names are ``<sequence>_<frame>``.

:func:`read_panoptic_png` is the one reader of the PNGs; this module uses its semantic
channel only, so a panoptic dataset can extend it with the instance ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hbird.data.datasets import (
    CITYSCAPES_CLASSES,
    DATASETS,
    FilePairDataset,
    LabelledFile,
    check_class_ids,
    existing_dir,
    require_files,
)
from hbird.errors import InputError
from hbird.io.images import load_image
from hbird.labelspec import LabelSpec

SPLITS = ("train", "val")


def read_panoptic_png(path: str | Path) -> np.ndarray:
    """A KITTI-STEP panoptic PNG as ``(H, W, 3)`` uint8 (R = class id, G and B = instance)."""
    rgb = load_image(path)  # (3, H, W) in [0, 1], multiples of 1/255
    return rgb.mul(255.0).round_().to(torch.uint8).permute(1, 2, 0).numpy()


def semantic_from_panoptic(rgb: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` panoptic array → ``(H, W)`` int64 class ids (its R channel)."""
    return torch.from_numpy(rgb[..., 0].astype(np.int64))


def _image_folder(root: Path, split: str, sequence: str) -> Path:
    moved = root / "images" / split / sequence
    return moved if moved.is_dir() else root / "training" / "image_02" / sequence


class KittiStepDataset(FilePairDataset):
    """KITTI-STEP with its 19 Cityscapes classes, 255 = void (see the module docstring)."""

    def __init__(self, root: str | Path, split: str = "val") -> None:
        root = existing_dir(root, "KITTI-STEP root")
        if split not in SPLITS:
            raise InputError(
                f"KITTI-STEP split must be one of {list(SPLITS)} (the test split has no labels), "
                f"not {split!r}"
            )
        maps = existing_dir(root / "panoptic_maps" / split, "KITTI-STEP panoptic_maps folder")
        entries = [
            LabelledFile(
                f"{path.parent.name}_{path.stem}",
                _image_folder(root, split, path.parent.name) / path.name,
                path,
            )
            for path in sorted(maps.glob("*/*.png"))
        ]
        if not entries:
            raise InputError(f"no panoptic maps found under {maps}/<sequence>/; check root=")
        require_files(
            entries,
            f"every panoptic map needs its image in {root / 'images' / split}/<sequence>/ "
            f"(or KITTI's {root / 'training' / 'image_02'}/<sequence>/)",
        )
        spec = LabelSpec(
            "segmentation", num_classes=19, ignore_index=255, class_names=CITYSCAPES_CLASSES
        )
        super().__init__(
            entries, spec, f"kitti_step(root={root}, split={split})", convention="KITTI-STEP"
        )

    def read_label(self, item: LabelledFile) -> torch.Tensor:
        label = semantic_from_panoptic(read_panoptic_png(item.label_path))
        check_class_ids(
            label,
            self.label_spec,
            item.label_path,
            "the R channel must hold train ids 0..18 or 255",
        )
        return label


DATASETS.register("kitti_step", KittiStepDataset)
