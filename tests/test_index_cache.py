"""Saved-index cache: built once per (keys, kind, parameters), never stale."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("faiss")

from hbird.index import ExactIndex, FaissHNSWIndex, create_index  # noqa: E402
from hbird.index.cache import cache_path, load_or_build  # noqa: E402
from hbird.index.synthetic import clustered_unit_vectors  # noqa: E402

DIM = 16


@pytest.fixture(scope="module")
def keys() -> torch.Tensor:
    return clustered_unit_vectors(2000, DIM, n_clusters=10, seed=0)


class CountingKeys:
    """A keys() callable that counts how often the index needed them added."""

    def __init__(self, keys: torch.Tensor) -> None:
        self.keys, self.calls = keys, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.keys


def open_index(index, keys, cache_dir, source_id):
    """``load_or_build`` over ``keys`` (a ``CountingKeys``)."""
    return load_or_build(
        index, lambda empty: empty.fill(keys()), len(keys.keys), cache_dir, source_id
    )


def test_second_open_loads_the_saved_index(tmp_path, keys, monkeypatch) -> None:
    first = open_index(FaissHNSWIndex(DIM, m=8), CountingKeys(keys), tmp_path, "bank-a")
    folder = cache_path(tmp_path, "bank-a", first)
    assert (folder / "index.json").is_file()

    def no_add(self, x):  # a cache hit must not rebuild
        raise AssertionError("the cached index was rebuilt")

    monkeypatch.setattr(FaissHNSWIndex, "_add", no_add)
    counting = CountingKeys(keys)
    second = open_index(FaissHNSWIndex(DIM, m=8), counting, tmp_path, "bank-a")
    assert second.ntotal == keys.shape[0] and counting.calls == 0  # keys never read
    q = keys[:50]
    assert torch.equal(first.search(q, 5)[1], second.search(q, 5)[1])


def test_other_keys_or_parameters_never_reuse_an_index(tmp_path, keys) -> None:
    built = open_index(FaissHNSWIndex(DIM, m=8), CountingKeys(keys), tmp_path, "bank-a")
    other_bank = cache_path(tmp_path, "bank-b", FaissHNSWIndex(DIM, m=8))
    other_params = cache_path(tmp_path, "bank-a", FaissHNSWIndex(DIM, m=16))
    assert len({cache_path(tmp_path, "bank-a", built), other_bank, other_params}) == 3
    open_index(FaissHNSWIndex(DIM, m=16), CountingKeys(keys), tmp_path, "bank-a")
    assert len(list(tmp_path.iterdir())) == 2


def test_damaged_or_mismatched_cache_is_rebuilt(tmp_path, keys) -> None:
    built = open_index(FaissHNSWIndex(DIM, m=8), CountingKeys(keys), tmp_path, "bank-a")
    folder = cache_path(tmp_path, "bank-a", built)
    (folder / "index.json").write_text("{not json")
    with pytest.warns(UserWarning, match="rebuilding"):
        again = open_index(FaissHNSWIndex(DIM, m=8), CountingKeys(keys), tmp_path, "bank-a")
    assert again.ntotal == keys.shape[0]
    # the cache was rewritten by the rebuild; a cache of a different size is not trusted
    fewer = CountingKeys(keys[:1500])
    rebuilt = open_index(FaissHNSWIndex(DIM, m=8), fewer, tmp_path, "bank-a")
    assert rebuilt.ntotal == 1500


def test_exact_index_and_no_cache_dir_just_add(tmp_path, keys) -> None:
    exact = open_index(ExactIndex(DIM), CountingKeys(keys), tmp_path, "bank-a")
    assert exact.ntotal == keys.shape[0] and not any(tmp_path.iterdir())
    flat = open_index(create_index("flat", DIM), CountingKeys(keys), None, None)
    assert flat.ntotal == keys.shape[0]


def test_search_time_parameters_reuse_the_built_index(tmp_path, keys, monkeypatch) -> None:
    open_index(FaissHNSWIndex(DIM, m=8, ef_search=16), CountingKeys(keys), tmp_path, "bank-a")

    def no_add(self, x):
        raise AssertionError("the cached index was rebuilt")

    monkeypatch.setattr(FaissHNSWIndex, "_add", no_add)
    tuned = open_index(
        FaissHNSWIndex(DIM, m=8, ef_search=200), CountingKeys(keys), tmp_path, "bank-a"
    )
    assert tuned.ef_search == 200 and len(list(tmp_path.iterdir())) == 1
