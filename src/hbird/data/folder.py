"""The generic folder format (spec name ``folder``): your own images with masks or depth.

Layout::

    root/
      images/<stem>.{jpg,jpeg,png,bmp,tif,tiff,webp}
      masks/<stem>.png     class ids as pixel values (palette or grey PNG), or <stem>.npy (not both)
      depth/<stem>.png     16-bit PNG in millimetres (depth_scale=1000), or <stem>.npy in metres (not both)
      panoptic/<stem>.png  16-bit grey PNG, pixel = class · 1000 + instance, 65535 = void
      classes.txt          optional: one class name per line (gives num_classes); a name may
                           end in " [thing]" or " [stuff]" (default) for panoptic labels

Splits (``split=``), either of:

* ``root/<split>/images/`` (+ ``masks/`` or ``depth/``): each split is a folder in the
  layout above; ``classes.txt`` is read from ``root/<split>/`` or else ``root/``;
* ``root/splits/<split>.txt``: one image stem per line, selecting from ``root/images/``.

``split=None`` uses ``root/images/`` as a whole. The task is inferred from which of
``masks/`` and ``depth/`` exists (pass ``task=`` if both do); a folder with only
``panoptic/`` is panoptic. Label files are found by stem; every image must have exactly
one (a ``.png`` and a ``.npy`` of the same stem are refused, masks and depth maps alike:
hbird does not guess which one is right).

Panoptic labels (``task=panoptic``, :class:`hbird.data.panoptic.PanopticFolderDataset`):
instance 0 of a stuff class is the class's one segment; instance 0 of a thing class is
a crowd region (as in Cityscapes); instances are numbered within their class (so at
most 65 classes and 999 instances per class fit); ``classes.txt`` is required and marks
the thing classes, e.g. ``car [thing]``. The sample's ``label`` is the semantic map, so
the folder serves the semantic protocols too.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

from hbird.data.datasets import DATASETS, FilePairDataset, LabelledFile, existing_dir
from hbird.data.fewshot import read_subset
from hbird.errors import InputError, spell
from hbird.io.images import list_images
from hbird.labelspec import LabelSpec

LABEL_FOLDERS = {"segmentation": "masks", "depth": "depth", "panoptic": "panoptic"}
CLASS_KINDS = {"[thing]": True, "[stuff]": False}
"""Tags ending a ``classes.txt`` line: is the class a thing (panoptic labels)."""
LABEL_SUFFIXES = (".png", ".npy")


def _resolve_split(root: Path, split: str | None) -> tuple[Path, list[str] | None]:
    """The folder holding ``images/`` for ``split``, and the stems it keeps (None = all)."""
    split_folders = sorted(d.name for d in root.iterdir() if (d / "images").is_dir())
    split_lists = sorted(p.stem for p in (root / "splits").glob("*.txt"))
    if split is None:
        if (root / "images").is_dir():
            return root, None
        if split_folders:
            raise InputError(f"{root} holds split folders {split_folders}; pass split= one of them")
        raise InputError(
            f"{root} has no images/ folder; put the images in {root / 'images'} "
            "(and their masks in masks/ or depth maps in depth/, same stems)"
        )
    if (root / split / "images").is_dir():
        return root / split, None
    if (root / "splits" / f"{split}.txt").is_file():
        return root, read_subset(root / "splits" / f"{split}.txt")
    raise InputError(
        f"{root} has no split {split!r}: expected {root / split / 'images'} or "
        f"{root / 'splits' / (split + '.txt')} (found split folders {split_folders or 'none'}, "
        f"split lists {split_lists or 'none'})"
    )


def _resolve_task(base: Path, task: str | None) -> str:
    present = [t for t, folder in LABEL_FOLDERS.items() if (base / folder).is_dir()]
    if task is None:
        if present == ["panoptic"]:
            return "panoptic"
        present = [t for t in present if t != "panoptic"]  # masks/ or depth/ decide
        if len(present) == 1:
            return present[0]
        if not present:
            raise InputError(
                f"{base} has no masks/ or depth/ folder next to images/; add masks/<stem>.png "
                "(class ids) for segmentation or depth/<stem>.png (16-bit mm) / .npy (metres) for depth"
            )
        raise InputError(
            f"{base} has both masks/ and depth/; pass {spell('task', 'segmentation')} or "
            f"{spell('task', 'depth')}"
        )
    if task not in LABEL_FOLDERS:
        raise InputError(f"task must be one of {sorted(LABEL_FOLDERS)}, not {task!r}")
    if task not in present:
        raise InputError(
            f"task={task!r} needs the folder {base / LABEL_FOLDERS[task]}; it does not exist"
        )
    return task


def _class_lines(path: Path) -> list[tuple[str, bool]]:
    """``(name, is_thing)`` per non-blank line of ``classes.txt`` (tags stripped)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name, thing = line.strip(), False
        for tag, flag in CLASS_KINDS.items():
            if name.endswith(tag):
                name, thing = name[: -len(tag)].strip(), flag
        if name:
            lines.append((name, thing))
    if not lines:
        raise InputError(f"{path} is empty; write one class name per line")
    return lines


def read_class_names(path: Path) -> tuple[str, ...]:
    """Names from ``classes.txt``: one per non-blank line (a ``[thing]``/``[stuff]`` tag
    at the end of a line is not part of the name)."""
    return tuple(name for name, _ in _class_lines(path))


def read_thing_classes(path: Path) -> tuple[int, ...]:
    """Ids of the classes whose ``classes.txt`` line ends in ``[thing]``."""
    return tuple(i for i, (_, thing) in enumerate(_class_lines(path)) if thing)


def class_file(base: Path, root: Path) -> Path | None:
    """The ``classes.txt`` of a split folder: ``base``'s own, else the root's."""
    return next((d / "classes.txt" for d in (base, root) if (d / "classes.txt").is_file()), None)


def segmentation_spec(
    base: Path, root: Path, num_classes: int | None, ignore_index: int | None
) -> LabelSpec:
    found = class_file(base, root)
    names = read_class_names(found) if found is not None else None
    if names is not None and num_classes is not None and int(num_classes) != len(names):
        raise InputError(
            f"{spell('num_classes', num_classes)} disagrees with {found} ({len(names)} "
            f"names); drop {spell('num_classes')} or fix the file"
        )
    if names is None and num_classes is None:
        raise InputError(
            f"the number of classes is unknown: add {root / 'classes.txt'} "
            "(one class name per line) or pass num_classes="
        )
    count = len(names) if names is not None else int(num_classes)
    return LabelSpec(
        "segmentation", num_classes=count, ignore_index=ignore_index, class_names=names
    )


def _pair_files(images: list[Path], label_dir: Path, what: str) -> list[LabelledFile]:
    entries, missing = [], []
    for image in images:
        found = [label_dir / f"{image.stem}{s}" for s in LABEL_SUFFIXES]
        found = [p for p in found if p.is_file()]
        if len(found) > 1:
            raise InputError(
                f"image {image} has two {what}s, {' and '.join(map(str, found))}; "
                "keep one of them (hbird will not guess which is right)"
            )
        if not found:
            missing.append(image)
        else:
            entries.append(LabelledFile(image.stem, image, found[0]))
    if missing:
        first = missing[0]
        more = f" ({len(missing) - 1} more images have none either)" if len(missing) > 1 else ""
        raise InputError(
            f"image {first} has no {what}: expected {label_dir / (first.stem + '.png')} "
            f"(or .npy){more}; add the {what} or remove the image"
        )
    return entries


def folder_files(
    root: str | Path, split: str | None, task: str | None
) -> tuple[Path, Path, str, list[LabelledFile]]:
    """``(root, split folder, task, one entry per image)`` of a folder-format dataset."""
    root = existing_dir(root, "dataset folder")
    base, stems = _resolve_split(root, split)
    task = _resolve_task(base, task)
    images = list_images(base / "images")
    if not images:
        raise InputError(f"{base / 'images'} holds no images (looked for .jpg, .png, ...)")
    by_stem: dict[str, Path] = {}
    for image in images:
        if image.stem in by_stem:
            raise InputError(
                f"{by_stem[image.stem]} and {image} share the stem {image.stem!r}; "
                "rename one (labels are matched by stem)"
            )
        by_stem[image.stem] = image
    if stems is not None:
        unknown = [s for s in stems if s not in by_stem]
        if unknown:
            raise InputError(
                f"split {split!r} lists {len(unknown)} images not in {base / 'images'}, e.g. {unknown[:5]}"
            )
        images = [by_stem[s] for s in stems]
    what = {"segmentation": "mask", "depth": "depth map", "panoptic": "panoptic map"}[task]
    return root, base, task, _pair_files(images, base / LABEL_FOLDERS[task], what)


class FolderDataset(FilePairDataset):
    """A dataset in the generic folder format (see the module docstring).

    Args:
        root: the dataset folder.
        split: ``None`` (everything in ``root/images``) or a split name.
        task: ``"segmentation"`` or ``"depth"``; inferred when only one label folder exists
            (``"panoptic"`` folders are read by the ``folder`` spec's
            :class:`~hbird.data.panoptic.PanopticFolderDataset`).
        num_classes: needed when there is no ``classes.txt``; must agree with it otherwise.
        ignore_index: mask value of unlabelled pixels (default 255; ``None`` for none).
        depth_scale: PNG depth units per metre (1000 = millimetres).
        min_depth, max_depth: the valid depth range, recorded in ``label_spec``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        task: str | None = None,
        num_classes: int | None = None,
        ignore_index: int | None = 255,
        depth_scale: float = 1000.0,
        min_depth: float = 1e-3,
        max_depth: float = math.inf,
    ) -> None:
        root, base, task, entries = folder_files(root, split, task)
        if task == "panoptic":
            raise InputError(
                f"{base} holds panoptic labels; open it with the 'folder' spec or "
                "hbird.data.panoptic.PanopticFolderDataset"
            )
        if task == "segmentation":
            spec = segmentation_spec(base, root, num_classes, ignore_index)
        else:
            spec = LabelSpec("depth", min_value=float(min_depth), max_value=float(max_depth))
        super().__init__(
            entries,
            spec,
            f"folder(root={root}, split={split})",
            label_hint=(
                "fix the mask, list every class in classes.txt (or pass num_classes=), or set "
                "ignore_index= to the value that marks unlabelled pixels"
            ),
            depth_scale=float(depth_scale),
        )


def open_folder(
    root: str | Path, split: str | None = None, task: str | None = None, **options: Any
) -> FilePairDataset:
    """The ``folder`` spec: a :class:`FolderDataset`, or for panoptic labels a
    :class:`hbird.data.panoptic.PanopticFolderDataset` (arguments as there)."""
    if task is None:
        base, _ = _resolve_split(existing_dir(root, "dataset folder"), split)
        task = _resolve_task(base, None)
    if task == "panoptic":
        from hbird.data.panoptic import PanopticFolderDataset

        allowed = {"num_classes", "ignore_index"}
        if set(options) - allowed:
            raise InputError(
                f"panoptic folders take {', '.join(sorted(allowed))}, not "
                f"{', '.join(sorted(set(options) - allowed))}"
            )
        return PanopticFolderDataset(root, split, **options)
    return FolderDataset(root, split, task, **options)


open_folder.__signature__ = inspect.signature(FolderDataset)  # the keys a spec may give


DATASETS.register("folder", open_folder)
