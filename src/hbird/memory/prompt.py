"""Prompt → patch features and patch labels, image by image (the memory's and the probe's input).

For each ``(epoch, image)`` item the prompt pair is loaded, turned into the view the
encoder sees (a plain resize, or an augmented crop in later epochs, Table 7), encoded by a
feature extractor, and its label is pooled to the patch grid (``memory.labels``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hbird.data.pairs import Pairs
from hbird.data.prefetch import prefetched
from hbird.data.transforms import resize_for_encoder, resize_label
from hbird.errors import InputError
from hbird.labelspec import LabelSpec
from hbird.memory.augment import PromptAugmentation, image_generator
from hbird.memory.labels import pool_labels

Transform = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]
"""``B`` views ``(3, H, W)`` → ``B`` feature maps ``(h, w, D)`` (``FeatureExtractor.transform``)."""


@dataclass(frozen=True)
class PromptPatches:
    """One prompt image as encoded in one pass, patches in row-major order.

    Attributes:
        epoch: the pass over the prompt (0 = plain resize unless the first is augmented).
        image: the image's index in the prompt (offset by ``start`` when growing a prompt).
        features: ``(h·w, D)`` patch features.
        values: ``(h·w, C)`` pooled labels (class histograms, or target means).
        valid: ``(h·w,)`` bool, False where a patch has no labelled pixel.
    """

    epoch: int
    image: int
    features: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor

    @property
    def item(self) -> str:
        """``"epoch:image"``, the unit a resumable bank build records."""
        return f"{self.epoch}:{self.image}"


def encode_prompt(
    pairs: Pairs,
    transform: Transform,
    label_spec: LabelSpec,
    image_size: int,
    patch_size: int,
    items: Iterable[tuple[int, int]] | None = None,
    augment_first_epoch: bool = False,
    resize: str = "short-side",
    ignore_as_class0: bool = False,
    seed: int = 0,
    start: int = 0,
    batch_size: int = 16,
    workers: int = 0,
    progress: bool | str = False,
) -> Iterator[list[PromptPatches]]:
    """Encode prompt items in batches; yield each batch's results, in item order.

    Args:
        pairs: the prompt source (``pairs.load(i) -> (image, label, label name)``).
        transform: the feature extractor's ``transform``.
        label_spec: how labels pool to patches.
        image_size, patch_size: the short side the encoder sees, and its patch.
        items: ``(epoch, i)`` pairs to encode (default: epoch 0 of every image).
        augment_first_epoch: augment epoch 0 too (later epochs always are).
        resize: ``"short-side"`` or ``"square"`` (:func:`hbird.data.transforms.encoder_size`).
        ignore_as_class0: pool ignore pixels as class 0 (:func:`hbird.memory.labels.pool_segmentation`).
        seed: seeds the augmentation (per epoch and image, ``image_generator``).
        start: offset of ``pairs`` in the whole prompt (seeds and ``PromptPatches.image``).
        batch_size: views per ``transform`` call.
        workers: worker processes preparing the next views while ``transform`` runs
            (:func:`hbird.data.prefetch.prefetched`; the views are the same).
        progress: a progress bar; a string is its description.
    """
    todo = list(items) if items is not None else [(0, i) for i in range(len(pairs))]
    augment = PromptAugmentation(image_size, patch_size, resize=resize)
    desc = progress if isinstance(progress, str) else "prompt features"
    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress)

    def prepare(j: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Item ``j`` of ``todo`` as the encoder sees it: ``(view, label at its size, name)``."""
        epoch, i = todo[j]
        image, label, name = pairs.load(i)
        if epoch == 0 and not augment_first_epoch:
            view = resize_for_encoder(image, image_size, patch_size, resize)
            return view, resize_label(label, tuple(view.shape[-2:])), name
        view, label = augment(image, label, label_spec, image_generator(seed, epoch, start + i))
        return view, label, name

    chunks = [range(s, min(s + batch_size, len(todo))) for s in range(0, len(todo), batch_size)]
    for rows, prepared in zip(chunks, prefetched(prepare, chunks, workers)):
        chunk = [todo[j] for j in rows]
        views, labels, names = (list(column) for column in zip(*prepared))
        batch = []
        for (epoch, i), feat, label, name in zip(chunk, transform(views), labels, names):
            try:
                values, valid = pool_labels(label, patch_size, label_spec, ignore_as_class0)
            except InputError as err:
                raise InputError(f"label {name}: {err}") from None
            features = feat.reshape(-1, feat.shape[-1])
            batch.append(PromptPatches(epoch, start + i, features, values, valid))
        bar.update(len(chunk))
        yield batch
    bar.close()
