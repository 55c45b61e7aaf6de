"""ScaNN backend against the torch ExactIndex oracle (skipped without scann)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("scann")

from hbird.index import ExactIndex, ScannIndex, load_index, recall_at_k  # noqa: E402
from hbird.index.synthetic import clustered_unit_vectors  # noqa: E402
from oracles import assert_same_neighbours  # noqa: E402

DIM, N, K = 64, 20_000, 30


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    keys = clustered_unit_vectors(N, DIM, seed=0)
    queries = clustered_unit_vectors(300, DIM, seed=1)
    oracle = ExactIndex(DIM)
    oracle.add(keys)
    sims, ids = oracle.search(queries, K)
    return {"keys": keys, "queries": queries, "sims": sims, "ids": ids}


@pytest.fixture(scope="module")
def scann_index(data) -> ScannIndex:
    index = ScannIndex(DIM)
    index.add(data["keys"])
    return index


def test_recall_and_exact_sims(data, scann_index) -> None:
    sims, ids = scann_index.search(data["queries"], K)
    assert not scann_index.brute_force and scann_index.num_leaves == round(N**0.5)
    assert recall_at_k(ids, data["ids"]) >= 0.9
    assert bool((sims[:, :-1] >= sims[:, 1:]).all())
    true = torch.einsum("md,mkd->mk", data["queries"], data["keys"][ids])
    torch.testing.assert_close(sims, true, atol=1e-5, rtol=0)  # exact re-ranking


def test_small_sets_are_brute_force_and_padded() -> None:
    keys = clustered_unit_vectors(300, 16, n_clusters=4)
    queries = clustered_unit_vectors(20, 16, n_clusters=4, seed=1)
    index, oracle = ScannIndex(16), ExactIndex(16)
    index.add(keys[:100])
    index.add(keys[100:])
    oracle.add(keys)
    assert index.brute_force
    (s, i), (es, ei) = index.search(queries, 305), oracle.search(queries, 305)
    assert_same_neighbours(s, i, es, ei, atol=1e-5, rtol=0)
    assert bool((i[:, 300:] == -1).all()) and bool(torch.isneginf(s[:, 300:]).all())


def test_add_after_search_rebuilds() -> None:
    keys = clustered_unit_vectors(3000, 16, n_clusters=8)
    index = ScannIndex(16, brute_force_below=1000)
    index.add(keys[:2500])
    assert int(index.search(keys[2500:], 5)[1].max()) < 2500  # the new keys are not in yet
    index.add(keys[2500:])
    # after the rebuild the new keys are found: each finds itself first, up to the few
    # misses approximate search may make (ScaNN's tree training is not deterministic)
    found_self = index.search(keys[2500:], 1)[1][:, 0] == torch.arange(2500, 3000)
    assert found_self.float().mean() >= 0.9


@pytest.mark.parametrize("searched", [True, False])
def test_save_load_identical_results(tmp_path, data, scann_index, searched: bool) -> None:
    queries = data["queries"][:40]
    if searched:
        index = scann_index
        want = index.search(queries, K)  # built: the searcher itself is saved
    else:
        index = ScannIndex(DIM, num_leaves=50)
        index.add(data["keys"][:5000])  # not built yet: only keys and params are saved
    loaded = load_index(index.save(tmp_path / "scann"))
    assert isinstance(loaded, ScannIndex) and loaded.params() == index.params()
    if searched:  # the saved searcher itself: bit-identical answers
        for got, expected in zip(loaded.search(queries, K), want):
            assert torch.equal(got, expected)
        return
    # only keys and params were saved: the reloaded index trains its own searcher, and
    # ScaNN's tree training is not deterministic, so the answers agree without being equal
    (_, ids), (_, want_ids) = loaded.search(queries, K), index.search(queries, K)
    assert recall_at_k(ids, want_ids) >= 0.95
