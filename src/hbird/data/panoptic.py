"""Panoptic labels: a semantic map and an instance map per image, in the layouts users have.

A panoptic sample is a :class:`PanopticSample`: the usual ``label`` is the ``(H, W)``
semantic map (train ids, ``ignore_index`` = void), so every semantic protocol reads a
panoptic dataset unchanged; ``instance`` is an ``(H, W)`` int64 map numbering the
instances *within their class*. One convention for every layout (Cityscapes'):

* a stuff pixel has instance 0 (a stuff class is one segment per image);
* a thing pixel with instance ``>= 1`` belongs to segment ``(class, instance)``;
* a thing pixel with instance 0 is a *crowd* region of its class (``iscrowd``, or
  Cityscapes' group labels): never a false negative, and it excuses predictions that
  fall on it (:class:`hbird.metrics.PanopticQuality`).

A panoptic dataset also carries ``thing_classes`` (the ids of the thing classes).

Layouts (spec names in brackets), each decoded by one public function:

* Cityscapes ``gtFine/<split>/<city>/<stem>_gtFine_instanceIds.png`` (``cityscapes_panoptic``):
  ids ``>= 1000`` are ``labelId · 1000 + instance``, smaller ids are a label id
  (:func:`decode_cityscapes_ids`);
* COCO panoptic PNGs, id = R + 256·G + 256²·B, with their JSON ``segments_info``
  (``coco_panoptic``; :func:`coco_rgb_to_id`, :func:`decode_coco_segments`);
* KITTI-STEP ``panoptic_maps``: R = semantic train id, 256·G + B = instance
  (``kitti_step_panoptic``; :func:`decode_kitti_step`);
* the folder format's ``panoptic/<stem>.png`` (``folder``; :func:`decode_class_instance`);
* seeded synthetic scenes whose same-class instances may touch (``synthetic_panoptic``,
  :mod:`hbird.data.panoptic_synthetic`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from hbird.data.datasets import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAINID,
    DATASETS,
    DenseDataset,
    Sample,
    existing_dir,
    make_label_map,
)
from hbird.data.folder import class_file, folder_files, read_thing_classes, segmentation_spec
from hbird.errors import InputError
from hbird.io.images import load_image, load_mask, load_rgb_codes
from hbird.labelspec import LabelSpec

INSTANCE_OFFSET = 1000
"""``class · 1000 + instance``: the Cityscapes and folder-format packing."""
FOLDER_VOID = 65535
"""Pixel value of void in a folder-format panoptic PNG."""
CITYSCAPES_THINGS = (11, 12, 13, 14, 15, 16, 17, 18)  # person .. bicycle (train ids)
KITTI_STEP_THINGS = (11, 13)  # person, car
CITYSCAPES_SPEC = LabelSpec(
    "segmentation", num_classes=19, ignore_index=255, class_names=CITYSCAPES_CLASSES
)
"""The 19 train-id classes (Cityscapes, KITTI-STEP)."""


class PanopticMap(NamedTuple):
    """A panoptic labelling: ``semantic`` ``(H, W)`` class ids and ``instance`` ``(H, W)``
    ids within the class (0 for stuff and crowd), both int64."""

    semantic: torch.Tensor
    instance: torch.Tensor


@dataclass(frozen=True, eq=False)
class PanopticSample(Sample):
    """A :class:`~hbird.data.Sample` whose ``label`` is the semantic map, plus ``instance``
    ``(H, W)`` int64 (the module's convention)."""

    instance: torch.Tensor | None = None

    @property
    def panoptic(self) -> PanopticMap:
        return PanopticMap(self.label, self.instance)


# --------------------------------------------------------------------------- decoding


def _long(x: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x)).to(torch.int64)


def decode_class_instance(
    ids: Any,
    offset: int = INSTANCE_OFFSET,
    small_ids_are_classes: bool = False,
    void: int | None = FOLDER_VOID,
    ignore_index: int = 255,
) -> PanopticMap:
    """Split ``class · offset + instance`` ids ``(H, W)`` into a :class:`PanopticMap`.

    Args:
        small_ids_are_classes: Cityscapes' rule: an id below ``offset`` is a class id
            with no instance (not class 0's instance ``id``).
        void: the id of void pixels (the folder format's 65535), or None.
        ignore_index: the semantic id void pixels get.
    """
    ids = _long(ids)
    semantic, instance = ids // offset, ids % offset
    if small_ids_are_classes:
        small = ids < offset
        semantic = torch.where(small, ids, semantic)
        instance = torch.where(small, torch.zeros_like(ids), instance)
    if void is not None:
        is_void = ids == void
        semantic = semantic.masked_fill(is_void, ignore_index)
        instance = instance.masked_fill(is_void, 0)
    return PanopticMap(semantic, instance)


def decode_cityscapes_ids(ids: Any) -> PanopticMap:
    """``*_instanceIds.png`` values → train-id semantic map (19 classes, 255 void) and
    instances; label ids without a train id are void, a thing id below 1000 is a crowd."""
    raw = decode_class_instance(ids, small_ids_are_classes=True, void=None)
    lut = make_label_map({i: CITYSCAPES_ID_TO_TRAINID.get(i, 255) for i in range(34)})
    semantic = lut[raw.semantic.clamp(0, 255)]
    semantic = semantic.masked_fill(raw.semantic > 33, 255)
    return PanopticMap(semantic, raw.instance.masked_fill(semantic == 255, 0))


def coco_rgb_to_id(rgb: Any) -> torch.Tensor:
    """``(H, W, 3)`` COCO panoptic PNG channels → segment ids ``R + 256·G + 256²·B``."""
    rgb = _long(rgb)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def decode_coco_segments(
    segment_ids: torch.Tensor,
    segments_info: Sequence[dict[str, Any]],
    category_to_class: dict[int, int],
    thing_classes: Sequence[int],
    ignore_index: int = 255,
) -> PanopticMap:
    """COCO segment ids ``(H, W)`` and an image's ``segments_info`` → a :class:`PanopticMap`.

    Pixels of id 0 or of a segment not listed are void; ``iscrowd`` segments keep their
    class with instance 0 (crowd); thing segments are numbered 1, 2... per class in
    ``segments_info`` order.
    """
    semantic = torch.full_like(segment_ids, ignore_index)
    instance = torch.zeros_like(segment_ids)
    things, counts = set(thing_classes), {}
    for seg in segments_info:
        cls = category_to_class[int(seg["category_id"])]
        where = segment_ids == int(seg["id"])
        semantic[where] = cls
        if cls in things and not seg.get("iscrowd", 0):
            counts[cls] = counts.get(cls, 0) + 1
            instance[where] = counts[cls]
    return PanopticMap(semantic, instance)


def decode_kitti_step(rgb: Any) -> PanopticMap:
    """``(H, W, 3)`` KITTI-STEP panoptic map channels: R = semantic train id (255 void),
    256·G + B = instance (0: stuff, or a crowd of a thing class)."""
    rgb = _long(rgb)
    semantic = rgb[..., 0]
    return PanopticMap(semantic, (256 * rgb[..., 1] + rgb[..., 2]).masked_fill(semantic == 255, 0))


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True, eq=False)
class PanopticFile:
    """One image file, its panoptic label file and what decoding it needs (``extra``)."""

    name: str
    image_path: Path
    label_path: Path
    extra: Any = None


class PanopticDataset(DenseDataset):
    """Images with panoptic labels on disk, decoded by ``decode(file) -> PanopticMap``.

    Attributes:
        thing_classes: ids of the thing classes; the others are stuff.
    """

    def __init__(
        self,
        items: Sequence[PanopticFile],
        label_spec: LabelSpec,
        thing_classes: Sequence[int],
        description: str,
        decode: Callable[[PanopticFile], PanopticMap],
    ) -> None:
        if not items:
            raise InputError(f"{description}: no images found; check root= and split=")
        missing = [p for f in items for p in (f.image_path, f.label_path) if not p.is_file()]
        if missing:
            raise InputError(
                f"{description}: missing files, e.g. {', '.join(map(str, missing[:3]))}; every "
                "image needs its panoptic label"
            )
        bad = [c for c in thing_classes if not 0 <= c < int(label_spec.num_classes)]
        if bad:
            raise InputError(f"{description}: thing classes {bad} are not class ids")
        super().__init__(items, label_spec, description)
        self.thing_classes = tuple(int(c) for c in thing_classes)
        self._decode = decode

    def _name(self, item: PanopticFile) -> str:
        return item.name

    def read_panoptic(self, item: PanopticFile) -> PanopticMap:
        pan = self._decode(item)
        spec = self.label_spec
        valid = (pan.semantic >= 0) & (pan.semantic < int(spec.num_classes))
        valid |= pan.semantic == spec.ignore_index
        if not bool(valid.all()):
            shown = torch.unique(pan.semantic[~valid])[:10].tolist()
            raise InputError(
                f"panoptic label {item.label_path} holds classes {shown}, but the dataset has "
                f"{spec.num_classes} classes; check the file and the class list"
            )
        return pan

    def _load(self, item: PanopticFile) -> PanopticSample:
        image = load_image(item.image_path)
        pan = self.read_panoptic(item)
        if tuple(pan.semantic.shape) != tuple(image.shape[-2:]):
            raise InputError(
                f"panoptic label {item.label_path} is {tuple(pan.semantic.shape)} (HxW) but "
                f"image {item.image_path} is {tuple(image.shape[-2:])}; they must match"
            )
        return PanopticSample(
            item.name, image, pan.semantic, item.image_path, item.label_path, pan.instance
        )


class PanopticFolderDataset(PanopticDataset):
    """The folder format with ``panoptic/<stem>.png`` (see :mod:`hbird.data.folder`):
    16-bit, ``class · 1000 + instance``, 65535 void; ``classes.txt`` marks things."""

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        num_classes: int | None = None,
        ignore_index: int = 255,
    ) -> None:
        root, base, _, entries = folder_files(root, split, "panoptic")
        found = class_file(base, root)
        if found is None:
            raise InputError(
                f"{root} has panoptic labels but no classes.txt; write one class name per line "
                "and end thing classes with ' [thing]' (e.g. 'car [thing]')"
            )
        spec = segmentation_spec(base, root, num_classes, ignore_index)
        files = [PanopticFile(e.name, e.image_path, e.label_path) for e in entries]
        super().__init__(
            files,
            spec,
            read_thing_classes(found),
            f"folder(root={root}, split={split}, panoptic)",
            lambda f: decode_class_instance(load_mask(f.label_path), ignore_index=ignore_index),
        )


class CityscapesPanopticDataset(PanopticDataset):
    """Cityscapes fine panoptic labels from ``*_gtFine_instanceIds.png``: 19 train-id
    classes (8 things: person .. bicycle), 255 void.

    Layout: ``root/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` and
    ``root/gtFine/<split>/<city>/<stem>_gtFine_instanceIds.png``.
    """

    def __init__(self, root: str | Path, split: str = "val") -> None:
        root = existing_dir(root, "Cityscapes root")
        images = existing_dir(root / "leftImg8bit" / split, "Cityscapes image folder")
        files = []
        for path in sorted(images.glob("*/*_leftImg8bit.png")):
            stem = path.name[: -len("_leftImg8bit.png")]
            label = root / "gtFine" / split / path.parent.name / f"{stem}_gtFine_instanceIds.png"
            files.append(PanopticFile(stem, path, label))
        super().__init__(
            files,
            CITYSCAPES_SPEC,
            CITYSCAPES_THINGS,
            f"cityscapes_panoptic(root={root}, split={split})",
            lambda f: decode_cityscapes_ids(load_mask(f.label_path)),
        )


_COCO_PANOPTIC_SPLITS = {"train": "train2017", "val": "val2017"}


class COCOPanopticDataset(PanopticDataset):
    """COCO panoptic: ``root/annotations/panoptic_<split>2017.json`` and its PNG folder
    ``root/annotations/panoptic_<split>2017/``, images in ``root/<split>2017/`` or
    ``root/images/<split>2017/``. Classes are the JSON's categories in id order
    (133 for COCO), things by their ``isthing`` flag; id 0 is void."""

    def __init__(self, root: str | Path, split: str = "val") -> None:
        root = existing_dir(root, "COCO root")
        if split not in _COCO_PANOPTIC_SPLITS.values():
            split = _COCO_PANOPTIC_SPLITS.get(split, split)
        annotations = root / "annotations" / f"panoptic_{split}.json"
        if not annotations.is_file():
            raise InputError(f"COCO panoptic annotations {annotations} not found; check root=")
        try:
            data = json.loads(annotations.read_text())
            categories = sorted(data["categories"], key=lambda c: int(c["id"]))
            records = data["annotations"]
        except (ValueError, KeyError) as err:
            raise InputError(f"{annotations} is not a COCO panoptic JSON file ({err})") from None
        to_class = {int(c["id"]): i for i, c in enumerate(categories)}
        things = tuple(i for i, c in enumerate(categories) if c.get("isthing"))
        images = next(
            (d for d in (root / split, root / "images" / split) if d.is_dir()), root / split
        )
        pngs = root / "annotations" / f"panoptic_{split}"
        files = [
            PanopticFile(
                Path(r["file_name"]).stem,
                images / f"{Path(r['file_name']).stem}.jpg",
                pngs / r["file_name"],
                r["segments_info"],
            )
            for r in sorted(records, key=lambda r: r["file_name"])
        ]
        spec = LabelSpec(
            "segmentation",
            num_classes=len(categories),
            ignore_index=255 if len(categories) < 255 else -1,
            class_names=tuple(str(c["name"]) for c in categories),
        )
        super().__init__(
            files,
            spec,
            things,
            f"coco_panoptic(root={root}, split={split})",
            lambda f: decode_coco_segments(
                coco_rgb_to_id(load_rgb_codes(f.label_path)),
                f.extra,
                to_class,
                things,
                int(spec.ignore_index),
            ),
        )


class KITTISTEPPanopticDataset(PanopticDataset):
    """KITTI-STEP with instances: the layout and PNG reader of
    :class:`hbird.data.kitti_step.KittiStepDataset` (R = class, 256·G + B = instance);
    the 19 Cityscapes train-id classes, things person and car."""

    def __init__(self, root: str | Path, split: str = "val") -> None:
        from hbird.data.kitti_step import KittiStepDataset, read_panoptic_png

        semantic = KittiStepDataset(root, split)
        files = [PanopticFile(e.name, e.image_path, e.label_path) for e in semantic._items]
        super().__init__(
            files,
            CITYSCAPES_SPEC,
            KITTI_STEP_THINGS,
            f"kitti_step_panoptic(root={root}, split={split})",
            lambda f: decode_kitti_step(read_panoptic_png(f.label_path)),
        )


def is_panoptic(dataset: Any) -> bool:
    """Whether ``dataset`` yields instance maps (has ``thing_classes``)."""
    return hasattr(dataset, "thing_classes")


for _name, _layout in {
    "cityscapes_panoptic": CityscapesPanopticDataset,
    "coco_panoptic": COCOPanopticDataset,
    "kitti_step_panoptic": KITTISTEPPanopticDataset,
}.items():
    DATASETS.register(_name, _layout)

__all__ = [
    "COCOPanopticDataset",
    "CityscapesPanopticDataset",
    "KITTISTEPPanopticDataset",
    "PanopticDataset",
    "PanopticFolderDataset",
    "PanopticMap",
    "PanopticSample",
    "coco_rgb_to_id",
    "decode_class_instance",
    "decode_cityscapes_ids",
    "decode_coco_segments",
    "decode_kitti_step",
    "is_panoptic",
]
