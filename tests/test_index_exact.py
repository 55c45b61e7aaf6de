"""ExactIndex against a plain full matmul + topk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hbird.errors import InputError
from hbird.index import EmptyIndexError, ExactIndex, load_index
from oracles import assert_same_neighbours


def _unit(n: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)


def _brute_force(keys: torch.Tensor, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (q.float() @ keys.float().T).topk(k, dim=1)


@pytest.mark.parametrize(
    ("n", "chunk_size", "query_chunk_size"),
    [
        (1000, 64, 7),  # neither divides
        (1024, 256, 50),  # database chunks divide exactly
        (257, 256, 1),  # one key spills into a second chunk; one query at a time
        (300, 1, 300),  # one key per chunk
        (40, 16384, 1024),  # everything in one chunk
    ],
)
def test_exact_matches_brute_force(n: int, chunk_size: int, query_chunk_size: int) -> None:
    keys, q = _unit(n, 16, 0), _unit(123, 16, 1)
    index = ExactIndex(16, chunk_size=chunk_size, query_chunk_size=query_chunk_size)
    index.add(keys)
    sims, ids = index.search(q, 10)
    want_sims, want_ids = _brute_force(keys, q, 10)
    assert sims.dtype == torch.float32 and ids.dtype == torch.int64
    assert sims.shape == ids.shape == (123, 10)
    assert_same_neighbours(sims, ids, want_sims, want_ids)
    assert bool((sims[:, :-1] >= sims[:, 1:]).all())


def test_tied_keys_may_come_in_any_order_but_no_other_key_may_replace_them() -> None:
    base = _unit(6, 8, 0)
    keys = base[[0, 1, 1, 1, 2, 3, 4, 5, 5]]  # ids 1-3 are one key, ids 7-8 another
    q = base[[1, 5]] + 0.01 * _unit(2, 8, 1)
    index = ExactIndex(8, chunk_size=2)
    index.add(keys)
    sims, ids = index.search(q, 4)
    want_sims, want_ids = _brute_force(keys, q, 4)
    assert set(ids[0, :3].tolist()) == {1, 2, 3} and set(ids[1, :2].tolist()) == {7, 8}
    assert_same_neighbours(sims, ids, want_sims, want_ids)
    reordered = ids.clone()
    reordered[0, :3], reordered[1, :2] = ids[0, [2, 0, 1]], ids[1, [1, 0]]
    assert_same_neighbours(sims, reordered, sims, ids)  # ties in another order: fine
    wrong = ids.clone()
    wrong[0, 0] = 0  # same similarity claimed, other key
    with pytest.raises(AssertionError, match="query 0"):
        assert_same_neighbours(sims, wrong, want_sims, want_ids)


def test_k_larger_than_ntotal_is_padded() -> None:
    keys, q = _unit(5, 8, 0), _unit(3, 8, 1)
    index = ExactIndex(8, chunk_size=2)
    index.add(keys)
    sims, ids = index.search(q, 9)
    want_sims, want_ids = _brute_force(keys, q, 5)
    assert sims.shape == ids.shape == (3, 9)
    assert_same_neighbours(sims[:, :5], ids[:, :5], want_sims, want_ids)
    assert bool((ids[:, 5:] == -1).all())
    assert bool(torch.isneginf(sims[:, 5:]).all())


def test_multiple_adds_continue_ids() -> None:
    keys, q = _unit(500, 12, 0), _unit(20, 12, 1)
    one = ExactIndex(12, chunk_size=64)
    one.add(keys)
    many = ExactIndex(12, chunk_size=64)
    for part in (keys[:1], keys[1:130], keys[130:130], keys[130:]):
        many.add(part)
    assert many.ntotal == 500
    for index in (one, many):
        sims, ids = index.search(q, 7)
        want_sims, want_ids = _brute_force(keys, q, 7)
        assert_same_neighbours(sims, ids, want_sims, want_ids)
    # a key queried against the index finds itself at its insertion id
    assert torch.equal(
        many.search(keys[[0, 1, 129, 130, 499]], 1)[1][:, 0], torch.tensor([0, 1, 129, 130, 499])
    )


def test_float16_keys_are_kept_and_scored_in_float32() -> None:
    keys, q = _unit(700, 32, 0, torch.float16), _unit(30, 32, 1, torch.float16)
    index = ExactIndex(32, chunk_size=100)
    index.add(keys)
    assert index.keys.dtype == torch.float16
    sims, ids = index.search(q, 12)
    want_sims, want_ids = _brute_force(keys, q, 12)  # float16 values, float32 arithmetic
    assert sims.dtype == torch.float32
    assert_same_neighbours(sims, ids, want_sims, want_ids)


def test_numpy_inputs_and_empty_query_batch() -> None:
    keys, q = _unit(50, 4, 0), _unit(6, 4, 1)
    index = ExactIndex(4)
    index.add(keys.numpy().astype(np.float64))  # float64 is accepted as float32
    sims, ids = index.search(q.numpy(), 3)
    assert_same_neighbours(sims, ids, *_brute_force(keys, q, 3))
    sims, ids = index.search(np.zeros((0, 4), np.float32), 3)
    assert sims.shape == ids.shape == (0, 3)


def test_added_keys_are_copied() -> None:
    keys = _unit(10, 4, 0)
    index = ExactIndex(4)
    index.add(keys)
    keys.zero_()
    assert index.keys.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_load_round_trip(tmp_path, dtype: torch.dtype) -> None:
    keys, q = _unit(300, 8, 0, dtype), _unit(10, 8, 1)
    index = ExactIndex(8, chunk_size=33)
    index.add(keys[:100])
    index.add(keys[100:])
    index.save(tmp_path / "idx")
    loaded = load_index(tmp_path / "idx")
    assert isinstance(loaded, ExactIndex)
    assert loaded.chunk_size == 33 and loaded.ntotal == 300 and loaded.keys.dtype == dtype
    for got, want in zip(loaded.search(q, 5), index.search(q, 5)):
        assert torch.equal(got, want)
    # saving again over the same folder replaces it
    index.add(keys[:1])
    index.save(tmp_path / "idx")
    assert ExactIndex.load(tmp_path / "idx").ntotal == 301


def test_errors_are_clear() -> None:
    index = ExactIndex(8)
    with pytest.raises(EmptyIndexError, match="add"):
        index.search(_unit(2, 8, 0), 1)
    with pytest.raises(InputError, match="dimension 7 .*dim=8"):
        index.add(_unit(3, 7, 0))
    index.add(_unit(3, 8, 0))
    with pytest.raises(InputError, match="dimension 9 .*dim=8"):
        index.search(_unit(2, 9, 0), 1)
    with pytest.raises(InputError, match=r"x\[None\]"):
        index.search(_unit(1, 8, 0)[0], 1)
    with pytest.raises(InputError, match="k must be"):
        index.search(_unit(1, 8, 0), 0)
    with pytest.raises(InputError, match="float16/float32"):
        index.add(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(InputError, match="NaN"):
        index.add(torch.full((1, 8), float("nan")))
    with pytest.raises(InputError, match="dim must be"):
        ExactIndex(0)
    with pytest.raises(InputError, match="chunk_size"):
        ExactIndex(8, chunk_size=0)
    assert index.ntotal == 3  # failed adds added nothing


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_device_placement_gives_cpu_results_equal_to_brute_force(tmp_path, device: str) -> None:
    keys, q = _unit(500, 16, 0, torch.float16), _unit(40, 16, 1)
    index = ExactIndex(16, chunk_size=128, device=device)
    index.add(keys[:300])
    index.add(keys[300:])
    assert all(block.device.type == device for block in index._blocks)
    sims, ids = index.search(q, 7)
    assert sims.device.type == ids.device.type == "cpu"
    want_sims, want_ids = _brute_force(keys, q, 7)
    assert_same_neighbours(sims, ids, want_sims, want_ids)
    assert index.keys.device.type == "cpu"
    # the device is a placement, not saved: a reload lands on the CPU by default
    reloaded = load_index(index.save(tmp_path / "idx"))
    assert reloaded.device.type == "cpu" and "device" not in reloaded.params()
    assert_same_neighbours(*reloaded.search(q, 7), want_sims, want_ids)


def test_a_batch_of_queries_gets_what_each_part_gets_alone_ties_included() -> None:
    """The predictor searches several images' queries in one call: per query, the scores
    and the order of the neighbours (ties among duplicated keys included) must be those
    of searching its image alone."""
    keys = _unit(3000, 32, 0, torch.float16)
    keys[1::3] = keys[0::3]  # duplicated keys: exact ties
    q = _unit(2100, 32, 1)
    index = ExactIndex(32, chunk_size=512, query_chunk_size=1024)
    index.add(keys)
    sims, ids = index.search(q, 30)
    parts = [index.search(part, 30) for part in q.split([784, 784, 532])]
    assert torch.equal(sims, torch.cat([s for s, _ in parts]))
    assert torch.equal(ids, torch.cat([i for _, i in parts]))
    assert_same_neighbours(sims, ids, *_brute_force(keys, q, 30))


def test_fill_checks_keys_for_nan_once_a_few_rows_at_a_time(monkeypatch) -> None:
    """Issue 15: the NaN/inf check ran twice when fill trained first, each time with an
    N × D mask; it runs once, in row chunks."""
    from hbird.index import base

    seen, check = [], base.all_finite
    monkeypatch.setattr(base, "all_finite", lambda x: seen.append(x.shape[0]) or check(x))

    class NeedsTraining(ExactIndex):
        trained = False

        @property
        def is_trained(self) -> bool:
            return self.trained

        def _train(self, x: torch.Tensor) -> None:
            self.trained = True

    index = NeedsTraining(8)
    index.fill(_unit(100, 8, 0))
    assert index.trained and index.ntotal == 100 and seen == [100]  # was [100, 100]
    x = _unit(10, 8, 0)
    x[7, 3] = float("nan")  # in the third chunk of 3 rows
    assert check(x[:7], rows=3) and not check(x, rows=3) and not check(x[7:], rows=3)
    with pytest.raises(InputError, match="NaN or inf"):
        ExactIndex(8).add(x)


def test_fill_keeps_the_callers_keys_add_copies_them() -> None:
    """Issue 15 (build-time copies): ``fill`` of a bank's keys must not hold a second
    copy of them; ``add`` still copies, so later changes to its input never leak in."""
    keys = _unit(300, 8, 0, torch.float16)
    filled = ExactIndex(8, chunk_size=64).fill(keys, chunk_size=100)
    assert all(
        b.untyped_storage().data_ptr() == keys.untyped_storage().data_ptr() for b in filled._blocks
    )
    added = ExactIndex(8)
    added.add(keys)
    assert added._blocks[0].untyped_storage().data_ptr() != keys.untyped_storage().data_ptr()
    q = _unit(20, 8, 1)
    assert_same_neighbours(*filled.search(q, 5), *_brute_force(keys, q, 5))
    assert_same_neighbours(*added.search(q, 5), *_brute_force(keys, q, 5))


def _near_tie_scene(
    gap: float, per_query: int = 40
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries ``(4, 384)`` and keys ``(600, 384)`` whose inner products with each query
    are known by construction: ``0.9 + j * gap`` for key ``j`` of the query's 40 (spread
    over the key order), far below for the others; returns ``(keys, q, scores)``."""
    g = torch.Generator().manual_seed(3)
    d, per_query = 384, per_query
    q = torch.nn.functional.normalize(torch.randn(4, d, generator=g, dtype=torch.float64), dim=1)
    keys = torch.nn.functional.normalize(
        torch.randn(600, d, generator=g, dtype=torch.float64), dim=1
    )
    scores = torch.zeros(600, dtype=torch.float64)
    slots = torch.randperm(600, generator=g)[: 4 * per_query].view(4, per_query)
    for i in range(4):
        target = 0.9 + gap * torch.arange(per_query, dtype=torch.float64)
        u = keys[slots[i]] - (keys[slots[i]] @ q[i])[:, None] * q[i]  # ⟂ q_i
        u = torch.nn.functional.normalize(u, dim=1)
        keys[slots[i]] = target[:, None] * q[i] + (1 - target**2).sqrt()[:, None] * u
        scores[slots[i]] = target
    return keys.float(), q.float(), scores


def test_bf16_scoring_orders_near_ties_that_plain_bf16_cannot() -> None:
    """``scoring='bf16'`` subtracts each query's running threshold inside the bf16 matmul
    (``_search_bf16``). Here each query has 150 keys at scores 5e-5 apart in 0.9-0.9075,
    so about 78 of them share one bf16 output value (spacing 2^-8 ≈ 3.9e-3): a plain bf16
    shortlist of the same width (40), re-ranked in float32 the same way, misses true
    neighbours; the shifted one finds all ten, with the best keys outside the first,
    exact chunk."""
    keys, q, _ = _near_tie_scene(gap=5e-5, per_query=150)
    want_sims, want_ids = _brute_force(keys, q, 10)
    plain = (q.bfloat16() @ keys.bfloat16().T).float().topk(40, dim=1).indices  # (4, 40)
    rescored = torch.einsum("md,mkd->mk", q, keys[plain])
    plain_ids = plain.gather(1, rescored.topk(10, dim=1).indices)
    found = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(plain_ids, want_ids)]
    assert sum(found) < 36  # the hard case: plain bf16 loses several
    index = ExactIndex(384, chunk_size=64, scoring="bf16", shortlist=4).fill(keys)
    sims, ids = index.search(q, 10)
    assert_same_neighbours(sims, ids, want_sims, want_ids)
    exact = torch.einsum("md,mkd->mk", q.double(), keys.double()[ids])  # returned scores are exact
    torch.testing.assert_close(sims.double(), exact, rtol=0, atol=1e-6)


def test_bf16_scoring_recall_on_clustered_keys_and_exact_scores() -> None:
    from hbird.index import recall_at_k
    from hbird.index.synthetic import clustered_unit_vectors

    keys = clustered_unit_vectors(20_000, 96, n_clusters=20, spread=0.3).half()
    q = clustered_unit_vectors(300, 96, n_clusters=20, spread=0.3, seed=9)
    want_sims, want_ids = _brute_force(keys, q, 30)
    index = ExactIndex(96, chunk_size=4096, query_chunk_size=128, scoring="bf16").fill(keys)
    sims, ids = index.search(q, 30)
    assert recall_at_k(ids, want_ids) >= 0.99
    exact = torch.einsum("md,mkd->mk", q.double(), keys.double()[ids])
    torch.testing.assert_close(sims.double(), exact, rtol=0, atol=1e-5)
    assert bool((sims[:, :-1] >= sims[:, 1:]).all())


def test_bf16_scoring_over_several_adds_and_small_banks() -> None:
    keys = _unit(700, 32, 0)
    index = ExactIndex(32, chunk_size=100, scoring="bf16", shortlist=8)
    index.add(keys[:300].half())
    index.add(keys[300:])  # float32 after float16: re-ranked at float32
    q = _unit(50, 32, 1)
    want_sims, want_ids = _brute_force(torch.cat([keys[:300].half().float(), keys[300:]]), q, 5)
    sims, ids = index.search(q, 5)
    assert_same_neighbours(sims, ids, want_sims, want_ids)
    small = ExactIndex(32, scoring="bf16").fill(keys[:20])  # one chunk: all exact
    sims, ids = small.search(q, 50)
    want_sims, want_ids = _brute_force(keys[:20], q, 20)
    assert_same_neighbours(sims[:, :20], ids[:, :20], want_sims, want_ids)
    assert bool((ids[:, 20:] == -1).all())


def test_bf16_scoring_params_round_trip_and_errors(tmp_path) -> None:
    from hbird.index import create_index

    index = create_index("exact", 8, scoring="bf16", shortlist=3).fill(_unit(50, 8, 0))
    assert index.params()["scoring"] == "bf16" and index.params()["shortlist"] == 3
    loaded = load_index(index.save(tmp_path / "idx"))
    assert (loaded.scoring, loaded.shortlist) == ("bf16", 3)
    assert "scoring" not in ExactIndex(8).params()  # float32 indexes save what they always did
    with pytest.raises(InputError, match="scoring must be 'float32' or 'bf16'"):
        ExactIndex(8, scoring="fp8")
    with pytest.raises(InputError, match="shortlist must be an int >= 1"):
        ExactIndex(8, scoring="bf16", shortlist=0)
    with pytest.raises(InputError, match="needs backend='torch'"):
        ExactIndex(8, scoring="bf16", backend="faiss")
