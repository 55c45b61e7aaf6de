"""A workspace: a folder of images, a class list and a growing prompt, kept on disk.

The state of ``hbird serve`` without the web: everything the routes do is a method here,
so it is tested and usable from Python alone.

On disk, under ``state/``::

    workspace.json          task, classes, prompt (image names, in order), predictor settings
    masks/<stem>.png        the confirmed prompt masks (palette PNGs, pixel = class id)
    depth/<stem>.npy        or, in a depth workspace, the prompt depth maps (metres)
    features/               the feature cache (hbird.features.cache), keyed by view pixels

Every prompt change writes its mask, then ``workspace.json``, each atomically; the JSON
is the commit point, so a kill at any moment leaves the workspace as of the last
confirmed change (a mask without a JSON entry is ignored and overwritten later).

Predictions never re-encode an image already seen: the feature cache serves every view,
so a prompt change re-runs only search and decode. Adding a prompt image grows the bank
(``InContextPredictor.add``); removing one drops its entries
(``InContextPredictor.remove``), which with the default settings gives exactly the bank
a fresh build of the remaining prompt gives. The predictor numbers the prompt's images
in prompt order (``image_ids_``), so the workspace's prompt list maps names to its ids.
Changes are confirmed on disk first; if the predictor then fails to follow, it is
dropped and rebuilt from the confirmed state on next use.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hbird.decode import DensePrediction
from hbird.errors import HbirdError, InputError
from hbird.io.files import atomic_file, atomic_folder, has_file, write_json, write_text
from hbird.io.images import list_images, load_depth, load_image, load_mask, save_label_png
from hbird.labelspec import LabelSpec

FORMAT_VERSION = 1
STATE_FILE = "workspace.json"
IGNORE_INDEX = 255
TASKS = ("segmentation", "depth")
MIN_DEPTH = 1e-3
"""Depths below a millimetre are invalid, as in a prompt folder (hbird.data.folder)."""
NPY_MAGIC = b"\x93NUMPY"


def check_class_names(names: Sequence[str]) -> list[str]:
    """Refuse an empty, duplicated or over-long class list (at most 255 classes)."""
    names = [str(n).strip() for n in names]
    if len(names) < 2:
        raise InputError("give at least two classes (e.g. background and one object)")
    if len(names) > IGNORE_INDEX:
        raise InputError(f"at most {IGNORE_INDEX} classes fit in a palette mask, not {len(names)}")
    if any(not n for n in names):
        raise InputError("class names must not be empty")
    if len(set(names)) != len(names):
        raise InputError(f"class names must be distinct: {names}")
    return names


def read_upload(data: bytes, filename: str, what: str, read: Callable[[Path], Any]) -> Any:
    """``read`` (a CLI file reader: same checks, same pixel limit) on uploaded bytes, its
    errors naming ``what`` instead of the temporary file the bytes went through."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(filename).name
        path.write_bytes(data)
        try:
            return read(path)
        except InputError as err:
            raise InputError(str(err).replace(str(path), f"({what})")) from None


class Workspace:
    """Images of one folder, their classes and prompt, and a predictor over the prompt.

    Args:
        images: the folder of images to segment (read only).
        state: where the workspace lives (created; an existing one is resumed).
        classes: class names for a new workspace (ignored when resuming).
        settings: :class:`~hbird.InContextPredictor` settings (encoder, image_size, k...).
        task: ``"segmentation"`` (prompt labels are class masks) or ``"depth"`` (depth
            maps as the CLI reads them: a 16-bit PNG in millimetres or a ``.npy`` in
            metres; there are no classes) for a new workspace (ignored when resuming).
    """

    def __init__(
        self,
        images: str | Path,
        state: str | Path,
        classes: Sequence[str] | None = None,
        settings: dict[str, Any] | None = None,
        task: str = "segmentation",
    ) -> None:
        self.images_dir = Path(images)
        paths = list_images(self.images_dir)
        if not paths:
            raise InputError(f"{self.images_dir} holds no images (.png, .jpg...)")
        self._paths = {p.name: p for p in paths}
        self.state = Path(state)
        self.lock = threading.RLock()
        self._predictor: Any = None
        self._predictions: dict[str, DensePrediction] = {}
        self.revision = 0
        """Counts the changes that can change a prediction (prompt, classes): pictures drawn
        from predictions at one revision stay valid until it moves."""
        if (self.state / STATE_FILE).is_file():
            self._resume()
        else:
            if task not in TASKS:
                raise InputError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
            self.task = task
            depth = task == "depth"
            self.classes = [] if depth else check_class_names(classes or ["background", "object"])
            self.prompt: list[str] = []
            self.settings = dict(settings or {})
            self._save()

    # -- state ------------------------------------------------------------------------
    def _resume(self) -> None:
        record = json.loads((self.state / STATE_FILE).read_text())
        if record.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{self.state} holds a workspace of another hbird version")
        self.classes, self.settings = record["classes"], record["settings"]
        self.task = record.get("task", "segmentation")
        self.prompt = [n for n in record["prompt"] if n in self._paths]

    def _save(self, prompt: list[str] | None = None, classes: list[str] | None = None) -> None:
        """Commit the workspace (with ``prompt``/``classes`` in place of the current ones:
        the in-memory state changes only once this returned)."""
        write_json(
            self.state / STATE_FILE,
            {
                "format_version": FORMAT_VERSION,
                "task": self.task,
                "images": str(self.images_dir.resolve()),
                "classes": self.classes if classes is None else classes,
                "prompt": self.prompt if prompt is None else prompt,
                "settings": self.settings,
            },
        )

    def describe(self) -> dict[str, Any]:
        """Task, classes, prompt and images, as of one moment (taken under the lock)."""
        with self.lock:
            return {
                "task": self.task,
                "classes": list(self.classes),
                "prompt": list(self.prompt),
                "images": self.image_names,
            }

    @property
    def image_names(self) -> list[str]:
        return sorted(self._paths)

    def image_path(self, name: str) -> Path:
        """The folder's image called ``name`` (never a path from the client)."""
        if name not in self._paths:
            raise InputError(f"no image {name!r} in {self.images_dir}; see the image list")
        return self._paths[name]

    def mask_path(self, name: str) -> Path:
        """Where ``name``'s confirmed prompt label is: a class mask, or a depth map."""
        if self.task == "depth":
            return self.state / "depth" / f"{Path(name).stem}.npy"
        return self.state / "masks" / f"{Path(name).stem}.png"

    @property
    def label_spec(self) -> LabelSpec:
        if self.task == "depth":
            return LabelSpec(task="depth", min_value=MIN_DEPTH)
        return LabelSpec(
            task="segmentation", num_classes=len(self.classes), ignore_index=IGNORE_INDEX
        )

    # -- edits ------------------------------------------------------------------------
    def set_classes(self, names: Sequence[str]) -> None:
        """Rename or add classes; removing one is refused while a prompt mask may use it."""
        if self.task == "depth":
            raise InputError("a depth workspace has no classes; its prompt labels are depth maps")
        names = check_class_names(names)
        with self.lock:
            if self.prompt and len(names) < len(self.classes):
                raise InputError(
                    f"the prompt's masks use ids up to {len(self.classes) - 1}; remove the "
                    "prompt images first, or keep the classes and rename them"
                )
            self._save(classes=names)
            self.classes = names
            self._forget()

    def check_label(self, name: str, data: bytes) -> torch.Tensor:
        """An uploaded prompt label, decoded and checked as the CLI does: ``(H, W)`` class
        ids (:meth:`check_mask`) or depths in metres (:meth:`check_depth`)."""
        return self.check_depth(name, data) if self.task == "depth" else self.check_mask(name, data)

    def check_depth(self, name: str, data: bytes) -> torch.Tensor:
        """Decode an uploaded depth map (a ``.npy`` in metres, recognised by its magic
        bytes, else a 16-bit PNG in mm) with the CLI's reader: ``(H, W)`` float32 metres."""
        suffix = ".npy" if data.startswith(NPY_MAGIC) else ".png"
        what = f"the upload for {name}"
        depth = read_upload(data, Path(name).stem + suffix, what, load_depth)
        self._check_size(name, depth, "depth map")
        valid = torch.isfinite(depth) & (depth >= MIN_DEPTH)
        if not bool(valid.any()):
            raise InputError(
                f"the depth map for {name} holds no valid depth (every pixel is 0, NaN, inf "
                f"or under {MIN_DEPTH * 1000:g} mm); a PNG holds millimetres, a .npy metres"
            )
        return depth

    def _check_size(self, name: str, label: torch.Tensor, what: str) -> None:
        image_size = load_image(self.image_path(name)).shape[-2:]
        if tuple(label.shape) != tuple(image_size):
            raise InputError(
                f"the {what} for {name} is {label.shape[1]}x{label.shape[0]} but the image is "
                f"{image_size[1]}x{image_size[0]}; paint it on the image itself"
            )

    def check_mask(self, name: str, data: bytes) -> torch.Tensor:
        """Decode an uploaded PNG mask with the CLI's own checks: ``(H, W)`` int64 ids."""
        mask = read_upload(data, f"{Path(name).stem}.png", f"the upload for {name}", load_mask)
        self._check_size(name, mask, "mask")
        spec = self.label_spec
        bad = torch.unique(mask[(mask >= spec.num_classes) & (mask != IGNORE_INDEX)])
        if bad.numel() or bool((mask < 0).any()):
            raise InputError(
                f"the mask for {name} holds ids {bad[:10].tolist()}, but the workspace has "
                f"{spec.num_classes} classes (ids 0..{spec.num_classes - 1}, {IGNORE_INDEX} = "
                "unlabelled); add the classes first"
            )
        return mask

    def add_prompt(self, name: str, mask_png: bytes) -> list[str]:
        """Add (or replace) ``name``'s prompt label (a PNG mask, or a depth map in a depth
        workspace); the bank grows with ``add()``. Returns the prompt it committed."""
        with self.lock:
            mask = self.check_label(name, mask_png)
            replaced = name in self.prompt
            if replaced:  # its old entries are in the bank: rebuild on next use
                self._forget()
            self._write_label(self.mask_path(name), mask)  # a new name's: ignored until...
            self._save(prompt=self.prompt if replaced else [*self.prompt, name])  # ...this
            if not replaced:
                self.prompt.append(name)
            self._follow(lambda p: p.add([self.image_path(name)], [mask]))
            return list(self.prompt)

    def remove_prompt(self, name: str) -> list[str]:
        """Drop ``name`` from the prompt; its bank entries go with ``remove()``. Returns
        the prompt it committed."""
        with self.lock:
            if name not in self.prompt:
                raise InputError(f"{name} is not in the prompt; nothing to remove")
            position = self.prompt.index(name)
            self._save(prompt=[n for n in self.prompt if n != name])
            self.prompt.remove(name)
            self.mask_path(name).unlink(missing_ok=True)
            if not self.prompt:
                self._forget()
            self._follow(lambda p: p.remove(p.image_ids_[position]))
            return list(self.prompt)

    def _write_label(self, path: Path, label: torch.Tensor) -> None:
        if self.task == "depth":
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:
                np.save(tmp, label.numpy())
        else:
            save_label_png(path, label)

    def _follow(self, change: Callable[[Any], Any]) -> None:
        """Apply a confirmed prompt change to the live predictor, if there is one; if that
        fails (e.g. the memory would be empty) it is rebuilt from disk on next use."""
        self._predictions.clear()
        self.revision += 1
        if self._predictor is None:
            return
        try:
            change(self._predictor)
        except HbirdError:  # the rebuild from disk gives the same error, where it belongs
            self._forget()
        except BaseException:
            self._forget()
            raise

    def _forget(self) -> None:
        self._predictor = None
        self._predictions.clear()
        self.revision += 1

    # -- predictions ------------------------------------------------------------------
    def predictor(self) -> Any:
        """The predictor over the current prompt (built on first use)."""
        from hbird.predictor import InContextPredictor

        with self.lock:
            if not self.prompt:
                raise InputError("the prompt is empty: paint a mask on an image first")
            if self._predictor is None:
                settings = {"progress": False, **self.settings}
                settings.setdefault("feature_cache", str(self.state / "features"))
                images = [self.image_path(n) for n in self.prompt]
                masks = [self.mask_path(n) for n in self.prompt]
                self._predictor = InContextPredictor(**settings).fit(
                    images, masks, label_spec=self.label_spec
                )
            return self._predictor

    def predict(self, name: str) -> DensePrediction:
        """``name``'s prediction (labels and confidence at the image's size), cached until
        the prompt changes."""
        with self.lock:
            if name not in self._predictions:
                path = self.image_path(name)
                self._predictions[name] = self.predictor().predict_dense([path])[0]
            return self._predictions[name]

    def predicted_names(self) -> list[str]:
        """The images whose prediction at the current revision is already computed."""
        with self.lock:
            return [n for n in self.image_names if n in self._predictions]

    def predict_all(self, progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
        """Predict every image; returns mean confidence per image (least confident first)."""
        names = self.image_names
        scores = {}
        for i, name in enumerate(names):
            scores[name] = float(self.predict(name).confidence.mean())
            if progress is not None:
                progress(i + 1, len(names))
        return dict(sorted(scores.items(), key=lambda kv: kv[1]))

    # -- export -----------------------------------------------------------------------
    def export(self, out: str | Path) -> Path:
        """Write, atomically, everything needed to leave the app::

        out/prompt/images/, masks/, classes.txt   the prompt as an hbird folder (depth/
                                                  of .npy maps in a depth workspace)
        out/masks/<stem>.png                      every image's prediction, as ``hbird
                                                  predict`` writes it (depth/<stem>.png
                                                  and .npy in a depth workspace)
        out/bank/                                 the bank, as ``hbird bank build`` writes
        out/settings.json                         settings and the CLI commands that
                                                  reproduce the masks and the bank
        """
        from hbird.cli.predict import write_prediction

        with self.lock:
            predictor, spec = self.predictor(), self.label_spec
            predictions = {n: self.predict(n) for n in self.image_names}
            labels = "depth" if self.task == "depth" else "masks"
            with atomic_folder(out, "an hbird serve export", has_file("settings.json")) as tmp:
                prompt = tmp / "prompt"
                (prompt / "images").mkdir(parents=True)
                (prompt / labels).mkdir()
                for name in self.prompt:
                    shutil.copy2(self.image_path(name), prompt / "images" / name)
                    label = self.mask_path(name)
                    shutil.copy2(label, prompt / labels / label.name)
                if self.classes:
                    write_text(prompt / "classes.txt", "\n".join(self.classes) + "\n")
                (tmp / labels).mkdir()
                for name, prediction in predictions.items():
                    write_prediction(tmp / labels, Path(name).stem, None, prediction, spec, False)
                predictor.save(tmp / "bank")
                write_json(tmp / "settings.json", self._settings_record())
        return Path(out)

    def _settings_record(self) -> dict[str, Any]:
        """Settings, and commands that rebuild the bank and masks, run from the export."""
        flags = []
        for key, value in self.settings.items():
            if key in ("progress", "feature_cache") or value is None:
                continue
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                flags += [flag] if value else []
            else:
                flags += [flag, str(value)]
        common = ["--prompt", "prompt", "--task", self.task, *flags]
        return {
            "classes": self.classes,
            "prompt": self.prompt,
            "images": str(self.images_dir.resolve()),
            "settings": self.settings,
            "commands": {
                "bank": shlex.join(["hbird", "bank", "build", *common, "--out", "BANK"]),
                "masks": shlex.join(
                    ["hbird", "predict", *common, "--query", str(self.images_dir), "--out", "MASKS"]
                ),
            },
        }
