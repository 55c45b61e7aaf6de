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


def test_bf16_bound_hand_case_is_near_tight() -> None:
    """Bound (2) of ``index.certified`` where Cauchy-Schwarz is an equality, ``D = 4``:
    keys ``μ ± c`` with ``μ = 0.5``, ``c = 0.25146484375`` (bf16 ``0.251953125``,
    residual ``r_c = -0.000488``); the query ``μ + a`` with ``a = 1 + 2^-8 + 2^-12`` (bf16
    ``A = 1 + 2^-7``, residual ``r_a = -0.00366``) in every component. The residuals are
    parallel to the vectors, so the first pass is off ``r(x) = (q − μ)·(x − μ) + μ·x`` by
    ``D (|r_a| c + A |r_c|) = 0.005650`` for both keys (``μ·x`` is exact in two bf16
    parts), and the bound exceeds that only by its ``γ_n`` term (0.09%)."""
    from hbird.index.certified import band_bounds

    a, c, d = 1 + 2**-8 + 2**-12, 0.25146484375, 4
    r_a, big_a, r_c = a - (1 + 2**-7), 1 + 2**-7, c - 0.251953125  # by hand
    q = torch.full((1, d), 0.5 + a)
    keys = torch.tensor([[0.5 + c] * d, [0.5 - c] * d])
    index = ExactIndex(d, scoring="bf16").fill(keys)
    upper, ids, beta = index._bf16_first_pass(q, 2)
    x = keys.double()[ids[0]]
    truth = (x - 0.5) @ (q.double()[0] - 0.5) + x.sum(1) * 0.5  # r(x), exact here
    error = (truth - (upper[0].double() - beta[0, 0].double())).abs()
    want = d * (abs(r_a) * c + big_a * abs(r_c))
    torch.testing.assert_close(
        error, torch.full((2,), want, dtype=torch.float64), rtol=1e-4, atol=0
    )
    bound, _ = band_bounds(q, index._bound_tables())
    assert bound.shape == (1, 1)  # both keys are |x − μ| = 2c away: one band
    assert want <= float(bound[0, 0]) <= want * 1.001
    assert float(beta[0, 0]) >= float(bound[0, 0])  # the offset added in the matmul covers it


def test_bf16_bound_holds_on_clustered_unnormalised_keys() -> None:
    """Every candidate's ``u − β`` is within (2) of float64 ``r(x)``, band by band."""
    from hbird.index.certified import band_bounds

    keys, q = _patch_like(3000, 64, 0).half(), _patch_like(200, 64, 1)
    index = ExactIndex(64, chunk_size=700, query_chunk_size=90, scoring="bf16").fill(keys)
    upper, ids, beta = index._bf16_first_pass(q, 50)
    tables = index._bound_tables()
    assert len(tables.starts) > 2  # several bands
    centre = tables.centre.double()
    x = keys.double()[ids]  # (M, 50, D)
    truth = torch.einsum("mkd,md->mk", x - centre, q.double() - centre) + x @ centre
    bands = tables.bands[ids]
    bound, _ = band_bounds(q, tables)
    error = (truth - (upper.double() - beta.double().gather(1, bands))).abs()
    assert bool((error <= bound.gather(1, bands)).all())
    assert float((error / bound.gather(1, bands)).max()) > 0.01  # a bound, not far away


def _patch_like(n: int, d: int, seed: int) -> torch.Tensor:
    """Unnormalised vectors like ViT patch features: a large shared component, clusters,
    exact duplicates (every 7th row) and near-copies (every 5th, 1e-4 apart)."""
    g = torch.Generator().manual_seed(seed)
    shared = 3.0 * torch.randn(d, generator=torch.Generator().manual_seed(99))
    centres = torch.randn(12, d, generator=g)
    x = (
        shared
        + centres[torch.randint(12, (n,), generator=g)]
        + 0.3 * torch.randn(n, d, generator=g)
    )
    x[1::7] = x[0::7][: x[1::7].shape[0]]
    x[4::5] = x[3::5][: x[4::5].shape[0]] + 1e-4 * torch.randn(x[4::5].shape, generator=g)
    return x


def test_bf16_certificate_fails_on_near_equal_keys_and_the_fallback_is_exact() -> None:
    """Four queries have 150 keys each at scores 5e-5 apart (0.9-0.9075), far closer
    than the bound's ``2B`` (about 6e-3 here), and only ``kc = 40`` candidates: none of
    them can be certified, so they are searched again in float32, while 60 queries far
    from every key (scores below 0.3: well separated) pass. The result is the float32
    search's, bit for bit, for both kinds."""
    keys, near, _ = _near_tie_scene(gap=5e-5, per_query=150)
    q = torch.cat([near, _unit(60, 384, 7)])
    index = ExactIndex(384, chunk_size=64, scoring="bf16", shortlist=4).fill(keys)
    sims, ids = index.search(q, 10)
    assert index.last_search["candidates"] == 40 and index.last_search["queries"] == 64
    assert index.last_search["certified"] == 60  # all but the four near-tie queries
    want_sims, want_ids = ExactIndex(384, chunk_size=64).fill(keys).search(q, 10)
    assert torch.equal(sims, want_sims) and torch.equal(ids, want_ids)
    assert_same_neighbours(sims, ids, *_brute_force(keys, q, 10))
    wide = ExactIndex(384, chunk_size=64, scoring="bf16", shortlist=60).fill(keys)
    assert torch.equal(wide.search(q, 10)[1], want_ids)  # 600 candidates: all keys, certified
    assert wide.last_search["certified"] == 64


@pytest.mark.parametrize(("shortlist", "chunk_size"), [(2, 1000), (4, 700), (8, 16384)])
def test_bf16_scoring_equals_the_float32_oracle_on_clustered_keys(
    shortlist: int, chunk_size: int
) -> None:
    """Patch-like keys with duplicates and near-ties, float16 then float32 blocks: the
    certified search returns the float32 search's scores and ids bit for bit (both break
    ties by lower id), and the ``topk`` oracle's up to the order of tied keys."""
    keys, q = _patch_like(6000, 96, 2), _patch_like(500, 96, 3)
    options = {"chunk_size": chunk_size, "query_chunk_size": 200}
    certified = ExactIndex(96, scoring="bf16", shortlist=shortlist, **options)
    plain = ExactIndex(96, **options)
    oracle = ExactIndex(96, selection="topk", **options)
    for index in (certified, plain, oracle):
        index.add(keys[:3500].half())
        index.add(keys[3500:])
    sims, ids = certified.search(q, 30)
    assert 0 < certified.last_search["certified"] <= 500
    want_sims, want_ids = plain.search(q, 30)
    assert torch.equal(sims, want_sims) and torch.equal(ids, want_ids)
    assert_same_neighbours(sims, ids, *oracle.search(q, 30), atol=0, rtol=0)


def test_bf16_scoring_over_several_adds_and_small_banks() -> None:
    keys = _unit(700, 32, 0)
    index = ExactIndex(32, chunk_size=100, scoring="bf16", shortlist=8)
    index.add(keys[:300].half())
    index.add(keys[300:])  # float32 after float16: re-ranked at float32
    q = _unit(50, 32, 1)
    want_sims, want_ids = _brute_force(torch.cat([keys[:300].half().float(), keys[300:]]), q, 5)
    sims, ids = index.search(q, 5)
    assert_same_neighbours(sims, ids, want_sims, want_ids)
    small = ExactIndex(32, scoring="bf16").fill(keys[:20])  # every key a candidate
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
    with pytest.raises(InputError, match="runs on the CPU"):
        ExactIndex(8, scoring="bf16", device="cuda")
    with pytest.raises(InputError, match="selects by heaps"):
        ExactIndex(8, scoring="bf16", selection="topk")
