"""Reading ahead in DataLoader workers (hbird.data.prefetch) changes timing, never results."""

import os

import pytest
import torch

from eval_settings import FAST_PROTOCOL
from hbird import InContextPredictor
from hbird.data.prefetch import prefetched, worker_count
from hbird.errors import InputError
from hbird.eval import evaluate


def square(i: int) -> int:
    return i * i


def refuse_three(i: int) -> int:
    if i == 3:
        raise InputError("image 3 is unreadable: re-export it as PNG")
    return i


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_come_back_in_the_order_asked_for(workers):
    batches = [[0, 1, 2], [], [5], [4, 3]]
    assert list(prefetched(square, batches, workers)) == [[0, 1, 4], [], [25], [16, 9]]


def test_a_workers_error_is_raised_as_it_was():
    with pytest.raises(InputError, match=r"^image 3 is unreadable: re-export it as PNG$"):
        list(prefetched(refuse_three, [[0, 1], [2, 3]], workers=2))


def test_never_more_workers_than_cores():
    assert worker_count(0) == 0
    assert worker_count(10_000) == os.cpu_count()
    with pytest.raises(ValueError, match="workers"):
        worker_count(-1)


def test_an_augmented_bank_built_with_workers_is_the_same(scenes):
    """Augmented passes are seeded per (epoch, image), so workers draw the same crops."""
    prompt, _ = scenes
    images, masks = [s.image for s in prompt[:6]], [s.mask for s in prompt[:6]]
    banks = [
        InContextPredictor(encoder="test_vit", layers=0, image_size=64, aug_epochs=2,
                           batch_size=4, workers=workers, progress=False)
        .fit(images, masks, num_classes=4).bank_
        for workers in (0, 2)
    ]  # fmt: skip
    assert banks[0].keys.shape[0] > 0
    assert torch.equal(banks[0].keys, banks[1].keys)
    assert torch.equal(banks[0].values, banks[1].values)


def test_an_evaluation_with_workers_scores_the_same(folder_dataset):
    runs = [
        evaluate("test_vit", folder_dataset, progress=False, **FAST_PROTOCOL, workers=workers)
        for workers in (0, 2)
    ]
    assert runs[0].counts == runs[1].counts
    assert runs[0].metrics == runs[1].metrics
    assert runs[0].per_class == runs[1].per_class
