"""Heap selection (``index.heaps.RowHeaps``, ``ExactIndex(selection="heap")``) against a
stable sort of the full score matrix: the ``k`` largest scores, lower id first on ties."""

from __future__ import annotations

import pytest
import torch

from hbird.errors import InputError
from hbird.index import ExactIndex, load_index
from hbird.index.heaps import RowHeaps
from oracles import assert_same_neighbours

pytest.importorskip("faiss")


def _clustered_with_duplicates(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, d, generator=g)
    x = centres[torch.randint(8, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    x[1::3] = x[0::3][: x[1::3].shape[0]]  # every third key repeats the one before
    return torch.nn.functional.normalize(x, dim=1).half()


def _stable_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: a stable descending sort of each row (equal scores keep id order)."""
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :k]
    return scores.gather(1, order), order


def _chunked_scores(
    queries: torch.Tensor, keys: torch.Tensor, chunk_size: int, query_chunk_size: int
) -> torch.Tensor:
    """The full ``(M, N)`` float32 score matrix by the same matmul shapes as the index
    (balanced query chunks × key chunks), so every score has the same rounding."""
    m = queries.shape[0]
    rows = -(-m // -(-m // query_chunk_size))
    keys = keys.float()
    return torch.cat(
        [
            torch.cat(
                [q @ keys[s : s + chunk_size].T for s in range(0, keys.shape[0], chunk_size)], 1
            )
            for q in queries.split(rows)
        ]
    )


def test_row_heaps_hand_case_ties_go_to_the_lower_id() -> None:
    """Row 0: scores 3, 5, 5, 1, 5, 4 at ids 10..15; k = 3 keeps the three 5s, k = 2 the
    two lowest ids of them (11, 12), and a 4 arriving later evicts nothing. Row 1: equal
    scores are returned lower id first. Fed as two chunks in id order."""
    scores = torch.tensor([[3.0, 5.0, 5.0, 1.0, 5.0, 4.0], [0.0, 0.0, 2.0, 2.0, -1.0, 2.0]])
    for width, want in ((2, [[11, 12], [12, 13]]), (3, [[11, 12, 14], [12, 13, 15]])):
        heaps = RowHeaps(2, width)
        heaps.add(scores[:, :3], first_id=10)
        heaps.add(scores[:, 3:], first_id=13)
        values, ids = heaps.result()
        assert ids.tolist() == want
        assert values.tolist() == [[5.0] * width, [2.0] * width]


def test_row_heaps_pad_with_minus_inf_and_minus_one() -> None:
    heaps = RowHeaps(1, 4)
    heaps.add(torch.tensor([[0.5, -2.0]]), first_id=0)
    values, ids = heaps.result()
    assert ids.tolist() == [[0, 1, -1, -1]]
    assert values[0, :2].tolist() == [0.5, -2.0] and bool(torch.isneginf(values[0, 2:]).all())


@pytest.mark.parametrize(
    ("chunk_size", "query_chunk_size", "k"),
    [(700, 128, 30), (16384, 1024, 30), (20, 50, 30), (1, 300, 5), (999, 7, 64)],
)
def test_heap_selection_equals_a_stable_sort_and_the_topk_path(
    chunk_size: int, query_chunk_size: int, k: int
) -> None:
    """Scores bit-identical to the ``topk`` path's (the same matmuls); scores and ids
    those of a stable sort of the full score matrix (exact duplicates: lower id first),
    and the ``topk`` path's up to the order of tied keys. Two blocks, float16 then
    float32 (key chunks restart at each block, and so do the oracle's)."""
    keys = _clustered_with_duplicates(3000, 24, 0)
    queries = torch.nn.functional.normalize(_clustered_with_duplicates(300, 24, 1).float(), dim=1)
    options = {"chunk_size": chunk_size, "query_chunk_size": query_chunk_size}
    heap = ExactIndex(24, selection="heap", **options)
    topk = ExactIndex(24, selection="topk", **options)
    for index in (heap, topk):
        index.add(keys[:1700])
        index.add(keys[1700:].float())
    sims, ids = heap.search(queries, k)
    want_sims, want_ids = topk.search(queries, k)
    assert torch.equal(sims, want_sims)
    assert_same_neighbours(sims, ids, want_sims, want_ids, atol=0, rtol=0)
    full = torch.cat(
        [_chunked_scores(queries, b, **options) for b in (keys[:1700], keys[1700:])], 1
    )
    stable_sims, stable_ids = _stable_top_k(full, k)
    assert torch.equal(sims, stable_sims) and torch.equal(ids, stable_ids)
    assert bool((ids[:, 1:] != ids[:, :-1]).all())  # duplicates are distinct ids


def test_heap_results_do_not_depend_on_chunking_or_batching() -> None:
    """Canonical ties make the result a function of the scores alone: other key chunks,
    other query chunks and one query at a time give the same ids."""
    keys = _clustered_with_duplicates(2000, 16, 2)
    queries = torch.nn.functional.normalize(_clustered_with_duplicates(64, 16, 3).float(), dim=1)
    results = [
        ExactIndex(16, chunk_size=c, query_chunk_size=m, selection="heap")
        .fill(keys)
        .search(queries, 20)
        for c, m in ((2000, 64), (333, 64), (64, 17))
    ]
    for sims, ids in results[1:]:
        torch.testing.assert_close(sims, results[0][0], atol=1e-6, rtol=0)
        assert torch.equal(ids, results[0][1])


def test_selection_option_default_round_trip_and_errors(tmp_path) -> None:
    keys = _clustered_with_duplicates(50, 8, 0)
    assert ExactIndex(8)._uses_heaps() and not ExactIndex(8, selection="topk")._uses_heaps()
    assert "selection" not in ExactIndex(8).params()  # auto: saved as before
    loaded = load_index(ExactIndex(8, selection="topk").fill(keys).save(tmp_path / "i"))
    assert loaded.selection == "topk"
    with pytest.raises(InputError, match="selection must be"):
        ExactIndex(8, selection="sort")
    with pytest.raises(InputError, match="needs backend='torch' on the CPU"):
        ExactIndex(8, selection="heap", backend="faiss")
