"""hbird.io.seeds: the one seed derivation, pinned to its documented definition."""

import torch

from hbird.io.seeds import derive_seed
from hbird.memory.augment import image_generator
from hbird.pretrain.data import EpochSampler, sample_generator

# SHA-256 of "seed/part/..." → first 8 bytes little-endian, top bit cleared; computed once
# with hashlib by hand, e.g. for "0/prompt/1/2".
PINNED = {
    (0, "prompt", 1, 2): 9150321289097694924,
    (3, "order", 0): 7529035043803447163,
    (7, "head", "kl"): 8829653734589082188,
}


def test_derive_seed_is_the_documented_hash():
    for (seed, *parts), value in PINNED.items():
        assert derive_seed(seed, *parts) == value


def test_every_room_draws_from_derive_seed():
    def draws(gen):
        return torch.rand(4, generator=gen)

    expected = draws(torch.Generator().manual_seed(PINNED[(0, "prompt", 1, 2)]))
    assert torch.equal(draws(image_generator(0, 1, 2)), expected)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(PINNED[(3, "order", 0)]))
    assert list(EpochSampler(20, 20, seed=3)) == order.tolist()
    views = torch.Generator().manual_seed(derive_seed(0, "views", 1, 2))
    assert torch.equal(draws(sample_generator(0, 1, 2)), draws(views))
    assert derive_seed(0, "views", 1, 2) != derive_seed(0, "prompt", 1, 2)  # own streams
