"""Labelled audio clips for kNN classification (``hbird fungi knn --modality audio``).

A clip is a ``.wav`` path (read when it is used; every header is checked when the set
is listed) or a ``(waveform (T,), sample_rate)`` pair. Specs (fields separated by ``:``):

``folder:root=/data/sounds``
    ``root/<split>/<class name>/<clip>.wav``; classes are the sorted sub-folder names
    of every split, so class ids agree across splits.
``esc50:root=/data/ESC-50:fold=5``
    ESC-50's release layout: ``root/meta/esc50.csv`` (columns ``filename``, ``fold``,
    ``target``, ``category``) and ``root/audio/<filename>``. Split ``test`` is the clips
    of fold ``fold`` (default 5), ``train`` those of the four other folds (ESC-50's
    cross-validation folds; it has no validation split). Class ids are ``target``.
``speechcommands:root=/data/speech_commands_v0.02``
    SpeechCommands' layout: ``root/<word>/<clip>.wav`` with ``validation_list.txt`` and
    ``testing_list.txt`` (paths relative to ``root``). Splits ``val`` and ``test`` are
    those lists, ``train`` every other clip; folders starting with ``_``
    (``_background_noise_``) are not classes.
``synthetic:train=64:val=32:classes=4:rate=8000:seconds=0.5:seed=0``
    seeded tone bursts whose classes differ in pitch and rhythm (:func:`synthetic_tones`).
    Offline; for demos and tests.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hbird.errors import InputError
from hbird.io.audio import AUDIO_SUFFIXES, CONVERT_HINT, wav_info
from hbird.io.options import parse_spec
from hbird.io.seeds import derive_seed

AUDIO_SPECS = "folder:root=..., esc50:root=...[:fold=5], speechcommands:root=... or synthetic:..."
"""The audio dataset specs, for messages."""


@dataclass(frozen=True)
class LabelledClips:
    """Audio clips with one class id each.

    Attributes:
        clips: ``N`` clips: ``.wav`` paths or ``(waveform (T,), sample_rate)`` pairs.
        labels: ``(N,)`` int64 class ids.
        class_names: one name per class id.
    """

    clips: Sequence[Any]
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def inputs(self) -> Sequence[Any]:
        """What a FUNGI audio backbone takes: the clips."""
        return self.clips


def _checked(
    paths: list[Path], labels: list[int], names: Sequence[str], where: Path
) -> LabelledClips:
    """Every clip's header read (a bad file is named before any compute), then the set."""
    if not paths:
        raise InputError(f"{where} holds no .wav clips")
    for path in paths:
        wav_info(path)
    return LabelledClips(paths, torch.tensor(labels, dtype=torch.int64), tuple(names))


def _wav_files(folder: Path) -> list[Path]:
    """The ``.wav`` files of a class folder; any other (non-hidden) file is refused."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    other = [p for p in files if p.suffix.lower() not in AUDIO_SUFFIXES]
    if other:
        raise InputError(
            f"{other[0]} is not a .wav clip ({len(other)} such file(s) in {folder}); "
            f"{CONVERT_HINT}, or move it out of the class folders"
        )
    return files


def class_folder_clips(root: Path, split: str) -> LabelledClips:
    """``root/<split>/<class>/<clip>.wav``."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise InputError(f"{split_dir} does not exist; the folder needs one sub-folder per split")
    splits = [d for d in root.iterdir() if d.is_dir()]
    classes = sorted({c.name for s in splits for c in s.iterdir() if c.is_dir()})
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = split_dir / name
        if folder.is_dir():
            files = _wav_files(folder)
            paths += files
            labels += [label] * len(files)
    if not paths:
        raise InputError(f"{split_dir} has no .wav clips in class sub-folders <class>/<clip>.wav")
    return _checked(paths, labels, classes, split_dir)


ESC50_COLUMNS = ("filename", "fold", "target", "category")


def esc50_clips(root: Path, split: str, fold: int = 5) -> LabelledClips:
    """ESC-50: ``test`` is fold ``fold``, ``train`` the other folds (see the module docs)."""
    if split not in ("train", "test"):
        raise InputError(
            f"ESC-50 has splits train and test (fold {fold}), not {split!r}; "
            "pass --train-split train --test-split test"
        )
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file():
        raise InputError(f"{meta} does not exist; root= must be the ESC-50 folder (meta/, audio/)")
    with meta.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ESC50_COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        raise InputError(f"{meta} needs the columns {', '.join(ESC50_COLUMNS)}; missing {missing}")
    try:
        parsed = [(r["filename"], int(r["fold"]), int(r["target"]), r["category"]) for r in rows]
    except ValueError as err:
        raise InputError(f"{meta}: fold and target must be integers ({err})") from None
    folds = sorted({r[1] for r in parsed})
    if fold not in folds:
        raise InputError(f"esc50 fold={fold} is not in {meta}; its folds are {folds}")
    names: dict[int, str] = {}
    for _, _, target, category in parsed:
        if names.setdefault(target, category) != category:
            raise InputError(f"{meta}: target {target} is both {names[target]!r} and {category!r}")
    if sorted(names) != list(range(len(names))):
        raise InputError(f"{meta}: targets must be 0..{len(names) - 1}, got {sorted(names)}")
    chosen = [r for r in parsed if (r[1] == fold) == (split == "test")]
    paths = [root / "audio" / r[0] for r in chosen]
    return _checked(paths, [r[2] for r in chosen], [names[t] for t in range(len(names))], meta)


SPEECH_LISTS = {"val": "validation_list.txt", "test": "testing_list.txt"}


def speechcommands_clips(root: Path, split: str) -> LabelledClips:
    """SpeechCommands: the ``val`` / ``test`` lists, and ``train`` = every other clip."""
    if split not in ("train", *SPEECH_LISTS):
        raise InputError(f"SpeechCommands has splits train, val and test, not {split!r}")
    if not root.is_dir():
        raise InputError(f"{root} is not a folder; root= must be the SpeechCommands folder")
    classes = sorted(
        d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))
    )
    if not classes:
        raise InputError(f"{root} has no word folders <word>/<clip>.wav")
    listed: dict[str, set[str]] = {}
    for name, file in SPEECH_LISTS.items():
        path = root / file
        if not path.is_file():
            raise InputError(f"{path} does not exist; SpeechCommands lists its {name} clips there")
        listed[name] = {line.strip() for line in path.read_text().splitlines() if line.strip()}
    index = {name: i for i, name in enumerate(classes)}
    if split == "train":
        held_out = listed["val"] | listed["test"]
        relative = [f"{word}/{p.name}" for word in classes for p in _wav_files(root / word)]
        relative = [r for r in relative if r not in held_out]
    else:
        relative = sorted(listed[split])
        unknown = [r for r in relative if r.split("/")[0] not in index]
        if unknown:
            raise InputError(
                f"{root / SPEECH_LISTS[split]} lists {unknown[0]}, whose word folder does not exist"
            )
    labels = [index[r.split("/")[0]] for r in relative]
    return _checked([root / r for r in relative], labels, classes, root)


SYNTHETIC_PITCHES = (1.0, 1.5, 2.25, 3.375)
"""Pitch of class ``c`` relative to the base frequency: ``SYNTHETIC_PITCHES[c % 4]``."""


def synthetic_tones(
    n: int, seed: int = 0, num_classes: int = 4, rate: int = 8000, seconds: float = 0.5
) -> LabelledClips:
    """``n`` seeded clips of tone bursts; clip ``i`` is of class ``i % num_classes``.

    Class ``c`` plays ``1 + (c // 4) % 3`` bursts (its rhythm) of a tone at ``rate / 16 · SYNTHETIC_PITCHES[c % 4]`` Hz (its pitch) and its second harmonic.
    Per clip the pitch is jittered by ±3 %, the onset by up to a tenth of the clip, the
    amplitude is in [0.3, 0.9], the phase random, and white noise of std 0.05 is added.
    """
    if n < 1 or num_classes < 2:
        raise InputError(
            f"synthetic audio needs at least 1 clip and 2 classes, got {n} clips and "
            f"classes={num_classes}; give each split a size >= 1 (e.g. synthetic:train=64:val=32)"
        )
    rng = np.random.default_rng(derive_seed(seed, "synthetic-tones"))
    length = max(1, int(round(seconds * rate)))
    t = np.arange(length) / rate
    clips, labels = [], []
    for i in range(n):
        c = i % num_classes
        bursts = 1 + (c // len(SYNTHETIC_PITCHES)) % 3
        freq = rate / 16 * SYNTHETIC_PITCHES[c % len(SYNTHETIC_PITCHES)] * rng.uniform(0.97, 1.03)
        phase = rng.uniform(0, 2 * math.pi)
        tone = np.sin(2 * math.pi * freq * t + phase) + 0.3 * np.sin(4 * math.pi * freq * t)
        onset = rng.uniform(0, 0.1) * seconds
        period = seconds * 0.9 / bursts
        since = t - onset
        gate = (since >= 0) & (since < bursts * period) & ((since % period) < period * 0.5)
        wave = rng.uniform(0.3, 0.9) * tone * gate + rng.normal(0, 0.05, length)
        clips.append((wave.astype(np.float32), rate))
        labels.append(c)
    names = tuple(f"tone{c}" for c in range(num_classes))
    return LabelledClips(clips, torch.tensor(labels, dtype=torch.int64), names)


def load_audio_classification(spec: str, split: str) -> LabelledClips:
    """The ``split`` of the clips on disk named by ``spec`` (see the module docs;
    ``synthetic:`` specs are read by :func:`hbird.fungi.data.load_classification`)."""
    name, kwargs = parse_spec(spec)
    if name not in ("folder", "esc50", "speechcommands"):
        raise InputError(f"unknown audio dataset {name!r} in {spec!r}; use {AUDIO_SPECS}")
    if "root" not in kwargs:
        raise InputError(f"{spec!r} needs root=<folder>, e.g. {name}:root=/data/{name}")
    root = Path(str(kwargs["root"]))
    if name == "esc50":
        return esc50_clips(root, split, int(kwargs.get("fold", 5)))
    if name == "speechcommands":
        return speechcommands_clips(root, split)
    return class_folder_clips(root, split)
