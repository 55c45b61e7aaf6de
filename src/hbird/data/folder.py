"""The generic folder format (spec name ``folder``): your own images with masks or depth.

Layout::

    root/
      images/<stem>.{jpg,jpeg,png,bmp,tif,tiff,webp}
      masks/<stem>.png     class ids as pixel values (palette or grey PNG), or <stem>.npy (not both)
      depth/<stem>.png     16-bit PNG in millimetres (depth_scale=1000), or <stem>.npy in metres (the PNG wins)
      classes.txt          optional: one class name per line (gives num_classes)

Splits (``split=``), either of:

* ``root/<split>/images/`` (+ ``masks/`` or ``depth/``): each split is a folder in the
  layout above; ``classes.txt`` is read from ``root/<split>/`` or else ``root/``;
* ``root/splits/<split>.txt``: one image stem per line, selecting from ``root/images/``.

``split=None`` uses ``root/images/`` as a whole. The task is inferred from which of
``masks/`` and ``depth/`` exists (pass ``task=`` if both do). Label files are found by
stem; every image must have one.
"""

from __future__ import annotations

import math
from pathlib import Path

from hbird.data.datasets import DATASETS, FilePairDataset, LabelledFile, existing_dir
from hbird.data.fewshot import read_subset
from hbird.errors import InputError, spell
from hbird.io.images import list_images
from hbird.labelspec import LabelSpec

LABEL_FOLDERS = {"segmentation": "masks", "depth": "depth"}
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


def read_class_names(path: Path) -> tuple[str, ...]:
    """Names from ``classes.txt``: one per non-blank line."""
    names = tuple(
        line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    )
    if not names:
        raise InputError(f"{path} is empty; write one class name per line")
    return names


def _segmentation_spec(
    base: Path, root: Path, num_classes: int | None, ignore_index: int | None
) -> LabelSpec:
    class_file = next(
        (d / "classes.txt" for d in (base, root) if (d / "classes.txt").is_file()), None
    )
    names = read_class_names(class_file) if class_file is not None else None
    if names is not None and num_classes is not None and int(num_classes) != len(names):
        raise InputError(
            f"{spell('num_classes', num_classes)} disagrees with {class_file} ({len(names)} "
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
        if len(found) > 1 and what == "mask":  # depth maps: the PNG wins (NYUv2 exports)
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


class FolderDataset(FilePairDataset):
    """A dataset in the generic folder format (see the module docstring).

    Args:
        root: the dataset folder.
        split: ``None`` (everything in ``root/images``) or a split name.
        task: ``"segmentation"`` or ``"depth"``; inferred when only one label folder exists.
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
        what = "mask" if task == "segmentation" else "depth map"
        entries = _pair_files(images, base / LABEL_FOLDERS[task], what)
        if task == "segmentation":
            spec = _segmentation_spec(base, root, num_classes, ignore_index)
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


DATASETS.register("folder", FolderDataset)
