"""Datasets by spec string, and the benchmark layouts users already have on disk.

A spec names a registered dataset and its arguments, fields separated by ``:``::

    voc:root=/data/VOCdevkit/VOC2012:split=val
    ade20k:root=/data/ADEChallengeData2016:split=validation
    cityscapes:root=/data/cityscapes:split=val:classes=27
    kitti_step:root=/data/kitti-step:split=val
    cocostuff:root=/data/cocostuff:split=val:classes=27
    nyuv2:root=/data/nyu_depth_v2_labeled.mat:split=test
    folder:root=/data/my_prompts:split=train:fraction=1/128:seed=0
    synthetic:n=64:seed=0:size=64:classes=4
    imagefolder:root=/data/imagenet/train

Values that look like integers or decimals become ``int``/``float``, ``true``/``false``
become ``bool``; everything else (paths included) stays a string. Because ``:`` separates
fields, a field without ``=`` is glued back to the previous value, so ``root=C:\\data``
works; a path with ``:`` followed by ``=`` cannot be written in a spec (pass it as a
keyword to :func:`create_dataset` instead).

Every dataset is a lazy sequence of :class:`Sample`: paths are listed (and checked to
exist) when it is built; files are read in ``__getitem__``. Segmentation labels come back
already mapped to the train-id convention (``0 .. C-1`` plus ``ignore_index``), depth in
metres. Three keys work with every dataset: ``subset=<file of names>`` (see
:func:`hbird.data.fewshot.read_subset`), ``fraction=`` and ``seed=`` (a seeded few-shot
subset, :func:`hbird.data.fewshot.fewshot_indices`).
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from hbird._optional import require
from hbird.data.fewshot import fewshot_indices, names_to_indices, read_subset
from hbird.data.vocabulary import Vocabulary
from hbird.errors import InputError, spell
from hbird.io.images import file_size, load_depth, load_image, load_mask
from hbird.io.options import parse_spec
from hbird.labelspec import LabelSpec
from hbird.registry import Registry

DATASETS: Registry[Any] = Registry("dataset")

D = TypeVar("D", bound="DenseDataset")


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True, eq=False)
class Sample:
    """One labelled image.

    Attributes:
        name: the image's stem (unique within its dataset).
        image: ``(3, H, W)`` float32 in [0, 1].
        label: ``(H, W)`` int64 class ids (``ignore_index`` for unlabelled pixels) for
            segmentation, or ``(H, W)`` float32 metres for depth (0 or NaN = invalid).
        image_path: the image file (for a ``.mat`` dataset: the ``.mat`` file; None for
            generated images).
        label_path: the label file, if the label has one of its own.
    """

    name: str
    image: torch.Tensor
    label: torch.Tensor
    image_path: Path | None = None
    label_path: Path | None = None


class DenseDataset:
    """Base class: a lazy, indexable sequence of :class:`Sample` with a :class:`LabelSpec`.

    Subclasses hold one item per image in ``self._items`` and implement ``_load(item)``
    and ``_name(item)``; ``subset`` only re-selects items, so it is cheap. Datasets whose
    images each have one class (image folders, synthetic scenes) also set
    ``image_classes`` and implement ``_image_label(item)``.
    """

    label_spec: LabelSpec
    image_classes: tuple[str, ...] = ()
    """Names of the image-level classes; empty when images have none."""

    def __init__(self, items: Sequence[Any], label_spec: LabelSpec, description: str) -> None:
        self._items = list(items)
        self.label_spec = label_spec
        self.description = description

    def _load(self, item: Any) -> Sample:
        raise NotImplementedError

    def _name(self, item: Any) -> str:
        raise NotImplementedError

    def _image_label(self, item: Any) -> int:
        return -1

    def bad_files(self, limit: int | None = None) -> list[tuple[int, str]]:
        """``(index, problem)`` for every entry among the first ``limit`` (default all) whose
        files cannot be used, found cheaply before any work (:mod:`hbird.data.checks`).
        Datasets whose samples are generated or come from one file have none to check."""
        return []

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Sample:
        if not isinstance(index, int | np.integer):
            raise TypeError(
                f"dataset indices must be integers, not {type(index).__name__}; use .subset() to select several"
            )
        n = len(self._items)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"index {index} is out of range for a dataset of {n} images")
        return self._load(self._items[i])

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    @property
    def names(self) -> list[str]:
        """The image stems, in dataset order."""
        return [self._name(item) for item in self._items]

    @property
    def image_labels(self) -> list[int]:
        """One image-level class id per image, in dataset order (``-1``: no class)."""
        return [self._image_label(item) for item in self._items]

    def subset(self: D, indices: Sequence[int]) -> D:
        """A dataset of the same kind holding only ``indices`` (in the order given)."""
        n = len(self._items)
        chosen = [int(i) for i in indices]
        bad = [i for i in chosen if not 0 <= i < n]
        if bad:
            raise IndexError(
                f"subset indices {bad[:10]} are out of range for a dataset of {n} images"
            )
        new = copy.copy(self)
        new._items = [self._items[i] for i in chosen]
        return new

    def __repr__(self) -> str:
        spec = self.label_spec
        what = f"{spec.num_classes} classes" if spec.task == "segmentation" else spec.task
        return f"{type(self).__name__}({self.description}: {len(self)} images, {what})"


# --------------------------------------------------------------------------- label checks


def check_class_ids(label: torch.Tensor, spec: LabelSpec, path: Path, hint: str) -> None:
    """Raise if ``label`` holds ids outside ``0 .. C-1`` other than the ignore index."""
    valid = (label >= 0) & (label < spec.num_classes)
    if spec.ignore_index is not None:
        valid |= label == spec.ignore_index
    if not bool(valid.all()):
        bad = torch.unique(label[~valid])[:10].tolist()
        raise InputError(
            f"mask {path} holds values {bad}, but the dataset has {spec.num_classes} classes "
            f"(ids 0..{spec.num_classes - 1}) and ignore_index={spec.ignore_index}; {hint}"
        )


def make_label_map(pairs: dict[int, int], size: int = 256) -> torch.Tensor:
    """Lookup table raw value → train id, ``(size,)`` int64; ``-1`` marks undefined values."""
    lut = torch.full((size,), -1, dtype=torch.int64)
    for raw, mapped in pairs.items():
        lut[raw] = mapped
    return lut


def apply_label_map(
    raw: torch.Tensor, lut: torch.Tensor, path: Path, convention: str
) -> torch.Tensor:
    """Map raw mask values through ``lut``; raise naming the file if a value is undefined."""
    inside = (raw >= 0) & (raw < len(lut))
    mapped = torch.where(inside, lut[raw.clamp(0, len(lut) - 1)], torch.full_like(raw, -1))
    undefined = mapped < 0
    if bool(undefined.any()):
        bad = torch.unique(raw[undefined])[:10].tolist()
        raise InputError(
            f"mask {path} holds raw values {bad} that the {convention} label convention does not "
            "define; check that root= points at that dataset and the file is not corrupt"
        )
    return mapped


# --------------------------------------------------------------------------- file pairs


@dataclass(frozen=True, eq=False)
class LabelledFile:
    """One image file with its label file and, optionally, a raw-id → train-id table."""

    name: str
    image_path: Path
    label_path: Path
    label_map: torch.Tensor | None = None


class FilePairDataset(DenseDataset):
    """Images and labels stored as one file each (masks as PNG/npy, depth as PNG/npy).

    Args:
        entries: the image/label files, one per image.
        label_spec: what the labels mean.
        description: shown in ``repr`` and errors, e.g. ``"voc(root=..., split=val)"``.
        convention: the label convention's name, used in errors about raw values.
        label_hint: what to tell the user when a mask holds ids outside the classes.
        depth_scale: PNG depth units per metre (1000: millimetres).
    """

    def __init__(
        self,
        entries: Sequence[LabelledFile],
        label_spec: LabelSpec,
        description: str,
        convention: str = "",
        label_hint: str = "check that the file belongs to this dataset",
        depth_scale: float = 1000.0,
    ) -> None:
        super().__init__(entries, label_spec, description)
        self.convention = convention or description
        self.label_hint = label_hint
        self.depth_scale = depth_scale

    def _name(self, item: LabelledFile) -> str:
        return item.name

    def read_label(self, item: LabelledFile) -> torch.Tensor:
        """The label of one entry: ``(H, W)`` int64 train ids or float32 metres."""
        if self.label_spec.task != "segmentation":
            return load_depth(item.label_path, png_scale=self.depth_scale)
        label = load_mask(item.label_path)
        if item.label_map is not None:
            label = apply_label_map(label, item.label_map, item.label_path, self.convention)
        check_class_ids(label, self.label_spec, item.label_path, self.label_hint)
        return label

    def bad_files(self, limit: int | None = None) -> list[tuple[int, str]]:
        """``(index, problem)`` for every entry (the first ``limit``) whose image or label
        cannot be read, or whose sizes differ; a cheap check to run before any work (image
        headers, no decoding; ``.npy`` labels are read and their values checked)."""
        what = "mask" if self.label_spec.task == "segmentation" else "depth map"
        bad = []
        for i, item in enumerate(self._items[:limit]):
            try:
                image = file_size(item.image_path, "image")
                label = file_size(item.label_path, what)
                if item.label_path.suffix == ".npy":  # values too: no decoding to save
                    self.read_label(item)
            except InputError as err:
                bad.append((i, str(err)))
                continue
            if image != label:
                bad.append((i, _size_mismatch(item, label, image)))
        return bad

    def _load(self, item: LabelledFile) -> Sample:
        image = load_image(item.image_path)
        label = self.read_label(item)
        if tuple(label.shape) != tuple(image.shape[-2:]):
            raise InputError(_size_mismatch(item, tuple(label.shape), tuple(image.shape[-2:])))
        return Sample(item.name, image, label, item.image_path, item.label_path)


def _size_mismatch(item: LabelledFile, label: tuple[int, ...], image: tuple[int, ...]) -> str:
    return (
        f"label {item.label_path} is {label[0]}x{label[1]} (HxW) but image "
        f"{item.image_path} is {image[0]}x{image[1]}; labels must have the "
        "image's exact size (re-export the label at full resolution)"
    )


def existing_dir(path: str | Path, what: str) -> Path:
    path = Path(str(path)).expanduser()
    if not path.is_dir():
        raise InputError(f"{what} {path} is not a folder; check {spell('root')}")
    return path


def require_files(entries: Sequence[LabelledFile], fix: str) -> None:
    """Raise if any image or label file of ``entries`` is missing (the first few are named)."""
    missing = [p for e in entries for p in (e.image_path, e.label_path) if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise InputError(f"missing files: {shown}{more}; {fix}")


def _require_images(entries: Sequence[LabelledFile], where: Path) -> None:
    if not entries:
        raise InputError(f"no images found under {where}; check root= and split=")


def _stems_from_list(path: Path) -> list[str]:
    """Stems from a list file: one per line; a line may also be ``/JPEGImages/x.jpg /Seg../x.png``."""
    return [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- PASCAL VOC

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


class VOCDataset(FilePairDataset):
    """PASCAL VOC 2012 segmentation: 21 classes, 255 = void (object borders) → ignored.

    Layout (``root`` = ``VOCdevkit/VOC2012``): ``JPEGImages/<stem>.jpg``,
    ``SegmentationClass/<stem>.png`` (palette PNG; indices are class ids) and
    ``ImageSets/Segmentation/<split>.txt``. ``split="trainaug"`` reads
    ``SegmentationClassAug/`` (the SBD-augmented masks, grey PNGs); other splits read
    ``SegmentationClass/``, falling back to ``SegmentationClassAug/`` if only that exists.
    ``mask_dir=`` overrides the mask folder name.
    """

    def __init__(self, root: str | Path, split: str = "val", mask_dir: str | None = None) -> None:
        root = existing_dir(root, "VOC root (VOCdevkit/VOC2012)")
        lists = root / "ImageSets" / "Segmentation"
        list_file = lists / f"{split}.txt"
        if not list_file.is_file():
            known = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
            raise InputError(
                f"VOC split list {list_file} not found (available: {known or 'none'}); "
                "pass split= one of them, or put the list file there (trainaug.txt for the SBD-augmented set)"
            )
        if mask_dir is None:
            mask_dir = "SegmentationClassAug" if split == "trainaug" else "SegmentationClass"
            if not (root / mask_dir).is_dir() and (root / "SegmentationClassAug").is_dir():
                mask_dir = "SegmentationClassAug"
        masks = root / mask_dir
        lut = make_label_map({**{c: c for c in range(21)}, 255: 255})
        entries = [
            LabelledFile(s, root / "JPEGImages" / f"{s}.jpg", masks / f"{s}.png", lut)
            for s in _stems_from_list(list_file)
        ]
        _require_images(entries, list_file)
        require_files(
            entries, f"the VOC folder is incomplete for split {split!r} (masks read from {masks})"
        )
        spec = LabelSpec("segmentation", num_classes=21, ignore_index=255, class_names=VOC_CLASSES)
        super().__init__(entries, spec, f"voc(root={root}, split={split})", convention="PASCAL VOC")


# --------------------------------------------------------------------------- ADE20K

ADE20K_CLASSES = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)

_ADE_SPLITS = {
    "train": "training",
    "training": "training",
    "val": "validation",
    "validation": "validation",
}


class ADE20KDataset(FilePairDataset):
    """ADE20K SceneParsing (ADEChallengeData2016): 150 classes.

    Layout: ``root/images/{training,validation}/<stem>.jpg`` and
    ``root/annotations/{training,validation}/<stem>.png``. Raw value 0 ("other") becomes
    ``ignore_index`` 255 and raw ``c`` in 1..150 becomes class ``c - 1``.
    ``split`` accepts ``training``/``train`` and ``validation``/``val``.
    """

    def __init__(self, root: str | Path, split: str = "validation") -> None:
        root = existing_dir(root, "ADE20K root (ADEChallengeData2016)")
        if split not in _ADE_SPLITS:
            raise InputError(f"ADE20K split must be one of {sorted(_ADE_SPLITS)}, not {split!r}")
        folder = _ADE_SPLITS[split]
        images = existing_dir(root / "images" / folder, "ADE20K image folder")
        annotations = root / "annotations" / folder
        lut = make_label_map({0: 255, **{c: c - 1 for c in range(1, 151)}})
        entries = [
            LabelledFile(p.stem, p, annotations / f"{p.stem}.png", lut)
            for p in sorted(images.glob("*.jpg"))
        ]
        _require_images(entries, images)
        require_files(entries, f"every image needs its annotation in {annotations}")
        spec = LabelSpec(
            "segmentation", num_classes=150, ignore_index=255, class_names=ADE20K_CLASSES
        )
        super().__init__(entries, spec, f"ade20k(root={root}, split={folder})", convention="ADE20K")


# --------------------------------------------------------------------------- Cityscapes

# The names of label ids 7..33 in order (cityscapesScripts labels.py; its "polegroup" is
# spelled as two words so that a text encoder can read it). They are also the 27 classes
# of unsupervised-segmentation work (STEGO, ReCo): label id i becomes class i - 7.
CITYSCAPES27_CLASSES = (
    "road",
    "sidewalk",
    "parking",
    "rail track",
    "building",
    "wall",
    "fence",
    "guard rail",
    "bridge",
    "tunnel",
    "pole",
    "pole group",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "caravan",
    "trailer",
    "train",
    "motorcycle",
    "bicycle",
)


# Official labelIds → trainIds (cityscapesScripts labels.py): ids not listed are void (255).
CITYSCAPES_ID_TO_TRAINID = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}


CITYSCAPES_CLASSES = tuple(CITYSCAPES27_CLASSES[i - 7] for i in sorted(CITYSCAPES_ID_TO_TRAINID))
"""The 19 train-id classes (road, sidewalk, building, ..., bicycle)."""


class CityscapesDataset(FilePairDataset):
    """Cityscapes fine annotations: 19 classes (or 27 with ``classes=27``), 255 = ignore.

    Layout: ``root/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` with labels
    ``root/gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png``. If an image has no
    ``labelTrainIds`` file but has ``<stem>_gtFine_labelIds.png``, the raw ids (0..33) are
    mapped to train ids with the official table (ids without a train id → 255).

    ``classes=27`` is the protocol of STEGO and ReCo: label id ``i`` in 7..33 becomes
    ``i - 7`` (:data:`CITYSCAPES27_CLASSES`), every other id (0..6, and 255 where the
    license plate's -1 was written) becomes 255. It reads the ``labelIds`` files, since
    train ids have already merged those classes away.
    """

    def __init__(self, root: str | Path, split: str = "val", classes: int = 19) -> None:
        root = existing_dir(root, "Cityscapes root")
        if int(classes) not in (19, 27):
            raise InputError(
                f"Cityscapes comes with classes=19 or classes=27, not classes={classes}"
            )
        images = existing_dir(root / "leftImg8bit" / split, "Cityscapes image folder")
        train_ids = make_label_map({**{c: c for c in range(19)}, 255: 255})
        label_ids = make_label_map({i: CITYSCAPES_ID_TO_TRAINID.get(i, 255) for i in range(34)})
        if int(classes) == 27:
            label_ids = make_label_map(
                {**{i: i - 7 if i >= 7 else 255 for i in range(34)}, 255: 255}
            )
        entries = []
        for path in sorted(images.glob("*/*_leftImg8bit.png")):
            stem = path.name[: -len("_leftImg8bit.png")]
            labels = root / "gtFine" / split / path.parent.name
            trainid_file = labels / f"{stem}_gtFine_labelTrainIds.png"
            labelid_file = labels / f"{stem}_gtFine_labelIds.png"
            if int(classes) == 19 and (trainid_file.is_file() or not labelid_file.is_file()):
                entries.append(LabelledFile(stem, path, trainid_file, train_ids))
            else:
                entries.append(LabelledFile(stem, path, labelid_file, label_ids))
        _require_images(entries, images)
        needed = "_labelIds.png" if int(classes) == 27 else "_labelTrainIds.png (or _labelIds.png)"
        require_files(
            entries, f"Cityscapes needs gtFine/<split>/<city>/<stem>_gtFine{needed} for every image"
        )
        names = CITYSCAPES_CLASSES if int(classes) == 19 else CITYSCAPES27_CLASSES
        spec = LabelSpec(
            "segmentation", num_classes=len(names), ignore_index=255, class_names=names
        )
        shown = "" if int(classes) == 19 else ", classes=27"
        super().__init__(
            entries, spec, f"cityscapes(root={root}, split={split}{shown})", convention="Cityscapes"
        )


# --------------------------------------------------------------------------- COCO-Stuff

# Raw ids 0..90 of the stuffthingmaps PNGs are COCO thing ids minus one, grouped by COCO
# supercategory; the 11 marked unused never occur in the annotations.
_COCO_THINGS = (
    ("person", ("person",)),
    ("vehicle", ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat")),
    (
        "outdoor",
        ("traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench"),
    ),
    (
        "animal",
        ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"),
    ),
    (
        "accessory",
        ("hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase"),
    ),
    (
        "sports",
        (
            "frisbee",
            "skis",
            "snowboard",
            "sports ball",
            "kite",
            "baseball bat",
            "baseball glove",
            "skateboard",
            "surfboard",
            "tennis racket",
        ),
    ),
    ("kitchen", ("bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon", "bowl")),
    (
        "food",
        (
            "banana",
            "apple",
            "sandwich",
            "orange",
            "broccoli",
            "carrot",
            "hot dog",
            "pizza",
            "donut",
            "cake",
        ),
    ),
    (
        "furniture",
        (
            "chair",
            "couch",
            "potted plant",
            "bed",
            "mirror",
            "dining table",
            "window",
            "desk",
            "toilet",
            "door",
        ),
    ),
    ("electronic", ("tv", "laptop", "mouse", "remote", "keyboard", "cell phone")),
    ("appliance", ("microwave", "oven", "toaster", "sink", "refrigerator", "blender")),
    (
        "indoor",
        (
            "book",
            "clock",
            "vase",
            "scissors",
            "teddy bear",
            "hair drier",
            "toothbrush",
            "hair brush",
        ),
    ),
)
_COCO_UNUSED = {
    "street sign",
    "hat",
    "shoe",
    "eye glasses",
    "plate",
    "mirror",
    "window",
    "desk",
    "door",
    "blender",
    "hair brush",
}
# Raw ids 91..181 are the 91 stuff classes in alphabetical order; their supercategories
# follow the COCO-Stuff hierarchy.
_COCO_STUFF = {
    "textile": (
        "banner",
        "blanket",
        "cloth",
        "clothes",
        "curtain",
        "mat",
        "napkin",
        "pillow",
        "rug",
        "textile-other",
        "towel",
    ),
    "plant": (
        "branch",
        "bush",
        "flower",
        "grass",
        "leaves",
        "moss",
        "plant-other",
        "straw",
        "tree",
    ),
    "building": ("bridge", "building-other", "house", "roof", "skyscraper", "tent"),
    "furniture-stuff": (
        "cabinet",
        "counter",
        "cupboard",
        "desk-stuff",
        "door-stuff",
        "furniture-other",
        "light",
        "mirror-stuff",
        "shelf",
        "stairs",
        "table",
    ),
    "structural": ("cage", "fence", "net", "railing", "structural-other"),
    "raw-material": ("cardboard", "metal", "paper", "plastic"),
    "floor": ("carpet", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood"),
    "ceiling": ("ceiling-other", "ceiling-tile"),
    "sky": ("clouds", "sky-other"),
    "ground": (
        "dirt",
        "gravel",
        "ground-other",
        "mud",
        "pavement",
        "platform",
        "playingfield",
        "railroad",
        "road",
        "sand",
        "snow",
    ),
    "water": ("fog", "river", "sea", "water-other", "waterdrops"),
    "food-stuff": ("food-other", "fruit", "salad", "vegetable"),
    "solid": ("hill", "mountain", "rock", "solid-other", "stone", "wood"),
    "wall": (
        "wall-brick",
        "wall-concrete",
        "wall-other",
        "wall-panel",
        "wall-stone",
        "wall-tile",
        "wall-wood",
    ),
    "window": ("window-blind", "window-other"),
}
# The 27 coarse classes in the order used by unsupervised-segmentation work (PiCIE, STEGO):
# 12 thing supercategories (0..11), then 15 stuff supercategories (12..26).
COCOSTUFF27_CLASSES = (
    "electronic",
    "appliance",
    "food",
    "furniture",
    "indoor",
    "kitchen",
    "accessory",
    "animal",
    "outdoor",
    "person",
    "sports",
    "vehicle",
    "ceiling",
    "floor",
    "food-stuff",
    "furniture-stuff",
    "raw-material",
    "textile",
    "wall",
    "window",
    "building",
    "ground",
    "plant",
    "sky",
    "solid",
    "structural",
    "water",
)


def _coco_fine_classes() -> list[tuple[str, str]]:
    """``(name, supercategory)`` for raw ids 0..181."""
    things = [(name, sup) for sup, names in _COCO_THINGS for name in names]
    stuff = sorted((name, sup) for sup, names in _COCO_STUFF.items() for name in names)
    return things + stuff


def cocostuff_label_map(classes: int) -> tuple[torch.Tensor, tuple[str, ...]]:
    """LUT raw stuffthingmaps id → train id, and the class names, for 171 or 27 classes.

    * 171: the 80 used thing ids and 91 stuff ids, in raw-id order, become 0..170.
    * 27: every fine id becomes its supercategory's index in ``COCOSTUFF27_CLASSES``.

    Raw 255 (unlabelled) stays 255 (ignore).
    """
    fine = _coco_fine_classes()
    if classes == 171:
        used = [(raw, name) for raw, (name, _) in enumerate(fine) if name not in _COCO_UNUSED]
        pairs = {raw: new for new, (raw, _) in enumerate(used)}
        names = tuple(name for _, name in used)
    elif classes == 27:
        pairs = {raw: COCOSTUFF27_CLASSES.index(sup) for raw, (_, sup) in enumerate(fine)}
        names = COCOSTUFF27_CLASSES
    else:
        raise InputError(f"COCO-Stuff comes with classes=171 or classes=27, not classes={classes}")
    return make_label_map({**pairs, 255: 255}), names


def clip_name(name: str) -> str:
    """A COCO-Stuff name as a text encoder should read it: ``-other`` and ``-stuff`` dropped
    (``sky-other`` → ``sky``, ``desk-stuff`` → ``desk``), other hyphens made spaces
    (``wall-brick`` → ``wall brick``). Over the 171 used names the result stays unique."""
    for suffix in ("-other", "-stuff"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.replace("-", " ")


def cocostuff_vocabulary(classes: int) -> Vocabulary:
    """The 171 COCO-Stuff names (for a text encoder, see :func:`clip_name`) and the label
    id each stands for: itself with ``classes=171``, its supercategory with ``classes=27``
    (the ReCo protocol: predict over 171 names, score over 27)."""
    fine = _coco_fine_classes()
    used = [(name, sup) for name, sup in fine if name not in _COCO_UNUSED]
    if classes == 171:
        to_label = list(range(len(used)))
    elif classes == 27:
        to_label = [COCOSTUFF27_CLASSES.index(sup) for _, sup in used]
    else:
        raise InputError(f"COCO-Stuff comes with classes=171 or classes=27, not classes={classes}")
    names = tuple(clip_name(name) for name, _ in used)
    return Vocabulary(names, torch.tensor(to_label, dtype=torch.int64), ignore_index=255)


_COCO_SPLITS = {
    "train": "train2017",
    "train2017": "train2017",
    "val": "val2017",
    "val2017": "val2017",
}
_COCO_LABEL_DIRS = ("stuffthingmaps", "stuffthingmaps_trainval2017", "annotations")


class COCOStuffDataset(FilePairDataset):
    """COCO-Stuff 164k with 171 classes or the 27 coarse supercategories.

    Layout: ``root/images/{train2017,val2017}/<stem>.jpg`` and label PNGs in the official
    ``stuffthingmaps`` convention (raw ids 0..181, 255 unlabelled) under
    ``root/stuffthingmaps/<split>/``, ``root/stuffthingmaps_trainval2017/<split>/`` or
    ``root/annotations/<split>/`` (the first that exists). ``image_list=`` restricts the
    set to the stems listed in a file (e.g. the curated lists of unsupervised work).

    Zero-shot methods predict over the 171 names of ``self.vocabulary`` whatever
    ``classes`` is; with ``classes=27`` each predicted name becomes its supercategory
    (:func:`cocostuff_vocabulary`; :mod:`hbird.data.vocabulary`).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        classes: int = 171,
        image_list: str | None = None,
    ) -> None:
        root = existing_dir(root, "COCO-Stuff root")
        if split not in _COCO_SPLITS:
            raise InputError(
                f"COCO-Stuff split must be one of {sorted(_COCO_SPLITS)}, not {split!r}"
            )
        folder = _COCO_SPLITS[split]
        lut, names = cocostuff_label_map(int(classes))
        images = existing_dir(root / "images" / folder, "COCO-Stuff image folder")
        label_dirs = [root / d / folder for d in _COCO_LABEL_DIRS]
        labels = next((d for d in label_dirs if d.is_dir()), None)
        if labels is None:
            raise InputError(
                f"no COCO-Stuff label folder found; expected one of {[str(d) for d in label_dirs]} "
                "holding the stuffthingmaps PNGs"
            )
        if image_list is not None:
            stems = _stems_from_list(Path(str(image_list)))
            paths = [images / f"{s}.jpg" for s in stems]
        else:
            paths = sorted(images.glob("*.jpg"))
        entries = [LabelledFile(p.stem, p, labels / f"{p.stem}.png", lut) for p in paths]
        _require_images(entries, images)
        require_files(entries, f"every image needs its label PNG in {labels}")
        spec = LabelSpec(
            "segmentation", num_classes=len(names), ignore_index=255, class_names=names
        )
        super().__init__(
            entries,
            spec,
            f"cocostuff(root={root}, split={folder}, classes={classes})",
            convention="COCO-Stuff stuffthingmaps",
        )
        self.vocabulary = cocostuff_vocabulary(int(classes))
        """Zero-shot prediction runs over the 171 names (:func:`cocostuff_vocabulary`)."""


# --------------------------------------------------------------------------- NYUv2 depth

NYU_MIN_DEPTH, NYU_MAX_DEPTH = 1e-3, 10.0


def _parse_indices(indices: str | int | Sequence[int]) -> list[int]:
    if isinstance(indices, int):
        return [indices]
    if isinstance(indices, str):
        return [int(tok) for tok in re.split(r"[,\s]+", indices.strip()) if tok]
    return [int(i) for i in indices]


def _read_mat_array(path: Path, key: str, what: str) -> np.ndarray:
    """Array ``key`` of a MATLAB file: v5 through scipy, v7.3 (HDF5) through h5py."""
    require("scipy", f"reading {what}")
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        try:
            return np.asarray(loadmat(str(path))[key])
        except NotImplementedError:  # scipy refuses v7.3 files: they are HDF5
            h5py = require("h5py", f"reading {what} (MATLAB v7.3)")
            with h5py.File(path, "r") as f:
                return np.asarray(f[key])
    except KeyError:
        raise InputError(f"{path} has no {key!r} array; is it the {what}?") from None
    except (MatReadError, ValueError, OSError) as err:
        raise InputError(
            f"{path} could not be read as a MATLAB file ({err}); is it the {what}?"
        ) from err


def nyu_split_indices(split_file: Path, split: str) -> list[int]:
    """0-based indices of the official split from ``splits.mat`` (``trainNdxs``/``testNdxs``, 1-based)."""
    key = {"train": "trainNdxs", "test": "testNdxs"}[split]
    if not split_file.is_file():
        raise InputError(
            f"NYUv2 split file {split_file} does not exist; pass split_file=<path to splits.mat>"
        )
    values = _read_mat_array(split_file, key, "NYUv2 splits.mat")
    return sorted(int(i) - 1 for i in values.reshape(-1))


class NYUv2MatDataset(DenseDataset):
    """NYU Depth v2 labelled set read straight from ``nyu_depth_v2_labeled.mat``.

    The file is MATLAB v7.3 (HDF5, read with ``h5py``): ``images`` is stored as
    ``(N, 3, W, H)`` uint8 and ``depths`` as ``(N, W, H)`` metres (in-painted), so both are
    transposed on read. The official split (795 train / 654 test) comes from
    ``splits.mat`` (``split_file=``, default: next to the ``.mat`` file); ``indices=``
    (0-based) picks images directly, and ``split="all"`` keeps all 1449.
    Sample names are the 0-based row numbers, ``"0000"`` .. ``"1448"``.
    """

    def __init__(
        self,
        path: str | Path,
        split: str = "test",
        split_file: str | Path | None = None,
        indices: str | Sequence[int] | None = None,
        min_depth: float = NYU_MIN_DEPTH,
        max_depth: float = NYU_MAX_DEPTH,
    ) -> None:
        self.path = Path(str(path)).expanduser()
        h5py = require("h5py", "reading nyu_depth_v2_labeled.mat")
        if not self.path.is_file():
            raise InputError(f"NYUv2 file {self.path} does not exist; check root=")
        try:
            with h5py.File(self.path, "r") as f:
                missing = [k for k in ("images", "depths") if k not in f]
                count = int(f["depths"].shape[0]) if not missing else 0
        except OSError as err:
            raise InputError(
                f"{self.path} is not a MATLAB v7.3 (HDF5) file ({err}); expected nyu_depth_v2_labeled.mat"
            ) from err
        if missing:
            raise InputError(
                f"{self.path} has no {missing} arrays; expected nyu_depth_v2_labeled.mat"
            )
        if indices is not None:
            chosen = _parse_indices(indices)
        elif split == "all":
            chosen = list(range(count))
        elif split in ("train", "test"):
            split_path = (
                Path(str(split_file)) if split_file is not None else self.path.parent / "splits.mat"
            )
            chosen = nyu_split_indices(split_path, split)
        else:
            raise InputError(f"NYUv2 split must be 'train', 'test' or 'all', not {split!r}")
        bad = [i for i in chosen if not 0 <= i < count]
        if bad:
            raise InputError(
                f"NYUv2 indices {bad[:10]} are out of range for {self.path} ({count} images)"
            )
        spec = LabelSpec("depth", min_value=float(min_depth), max_value=float(max_depth))
        super().__init__(chosen, spec, f"nyuv2(root={self.path}, split={split})")

    def _name(self, item: int) -> str:
        return f"{item:04d}"

    def _load(self, item: int) -> Sample:
        h5py = require("h5py", "reading nyu_depth_v2_labeled.mat")
        with h5py.File(self.path, "r") as f:
            image = np.asarray(f["images"][item])  # (3, W, H) uint8
            depth = np.asarray(f["depths"][item])  # (W, H) metres
        image_t = (
            torch.from_numpy(np.ascontiguousarray(image.transpose(0, 2, 1))).float().div_(255.0)
        )
        depth_t = torch.from_numpy(np.ascontiguousarray(depth.T).astype(np.float32))
        return Sample(self._name(item), image_t, depth_t, self.path, None)


def _nyuv2(
    root: str | Path,
    split: str = "test",
    split_file: str | None = None,
    indices: str | Sequence[int] | None = None,
    min_depth: float = NYU_MIN_DEPTH,
    max_depth: float = NYU_MAX_DEPTH,
    depth_scale: float = 1000.0,
) -> DenseDataset:
    """NYUv2 depth from ``nyu_depth_v2_labeled.mat`` (root is the file) or a folder.

    Folder layout (the generic folder format, see :class:`hbird.data.folder.FolderDataset`):
    ``root/<split>/images/<stem>.{jpg,png}`` with ``root/<split>/depth/<stem>.png``
    (16-bit, millimetres; ``depth_scale=`` units per metre) or ``<stem>.npy`` (metres).
    """
    if str(root).endswith(".mat"):
        return NYUv2MatDataset(root, split, split_file, indices, min_depth, max_depth)
    ds = _folder.FolderDataset(
        root,
        split=split,
        task="depth",
        min_depth=min_depth,
        max_depth=max_depth,
        depth_scale=depth_scale,
    )
    ds.description = f"nyuv2(root={root}, split={split})"
    return ds


# --------------------------------------------------------------------------- specs


def _check_arguments(name: str, factory: Any, kwargs: dict[str, Any]) -> None:
    params = inspect.signature(factory).parameters
    accepted = [n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD]
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())  # it checks its own
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown and not open_ended:
        raise InputError(
            f"dataset {name!r} does not take {', '.join(unknown)}; it takes "
            f"{', '.join(accepted)} (plus subset=, fraction=, seed= for every dataset)"
        )
    needed = [
        p.name
        for p in params.values()
        if p.default is inspect.Parameter.empty
        and p.kind is p.POSITIONAL_OR_KEYWORD
        and p.name not in kwargs
    ]
    if needed:
        raise InputError(
            f"dataset {name!r} needs {', '.join(f'{n}=' for n in needed)} (e.g. '{name}:root=/path/to/data')"
        )


def create_dataset(spec: str | None = None, **overrides: Any) -> DenseDataset:
    """Build a dataset from a spec string; keyword ``overrides`` win over spec fields.

    ``create_dataset(name="folder", root=...)`` works without a spec. Besides each
    dataset's own arguments, every dataset accepts ``subset=<file>`` (keep the names
    listed in that file, in its order), then ``fraction=`` (e.g. ``"1/128"`` or 0.1) with
    ``seed=`` (default 0) for a seeded few-shot subset. A dataset that takes a ``seed``
    itself (``synthetic``) gets it too.
    """
    if spec is None:
        if "name" not in overrides:
            raise InputError("give a dataset spec like 'voc:root=/data/VOC2012:split=val' or name=")
        name, kwargs = overrides.pop("name"), {}
    else:
        name, kwargs = parse_spec(spec)
    kwargs.update(overrides)
    subset_file = kwargs.pop("subset", None)
    fraction = kwargs.pop("fraction", None)
    factory = DATASETS.get(name)
    own_seed = "seed" in inspect.signature(factory).parameters
    seed = kwargs.get("seed") if own_seed else kwargs.pop("seed", None)
    if seed is not None and fraction is None and not own_seed:
        raise InputError(
            "seed= only applies together with fraction= (the few-shot subset it seeds)"
        )
    _check_arguments(name, factory, kwargs)
    dataset = factory(**kwargs)
    if subset_file is not None:
        dataset = dataset.subset(names_to_indices(dataset.names, read_subset(subset_file)))
    if fraction is not None:
        dataset = dataset.subset(
            fewshot_indices(len(dataset), fraction, 0 if seed is None else int(seed))
        )
    return dataset


SegmentationDataset = DenseDataset
"""Alias: the return type of :func:`create_dataset` (depth datasets included)."""

DATASETS.register("voc", VOCDataset)
DATASETS.register("ade20k", ADE20KDataset)
DATASETS.register("cityscapes", CityscapesDataset)
DATASETS.register("cocostuff", COCOStuffDataset)
DATASETS.register("nyuv2", _nyuv2)

# Imported last: these build on the classes above and register their own entries
# ("folder"; "synthetic" and "imagefolder"; "kitti_step"; the panoptic layouts).
from hbird.data import folder as _folder  # noqa: E402
from hbird.data import imagesets as _imagesets  # noqa: E402, F401
from hbird.data import kitti_step as _kitti_step  # noqa: E402, F401
from hbird.data import panoptic as _panoptic  # noqa: E402, F401
from hbird.data import panoptic_synthetic as _panoptic_synthetic  # noqa: E402, F401

__all__ = [
    "ADE20KDataset",
    "CityscapesDataset",
    "COCOStuffDataset",
    "DATASETS",
    "DenseDataset",
    "FilePairDataset",
    "LabelledFile",
    "NYUv2MatDataset",
    "Sample",
    "SegmentationDataset",
    "VOCDataset",
    "create_dataset",
    "parse_spec",
]
