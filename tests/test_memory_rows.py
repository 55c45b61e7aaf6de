"""Rows (memory/rows.py): the bank's columns written in place into preallocated blocks.

The oracle everywhere is the naive concatenation the bank used before: ``torch.cat`` of
the appended pieces (and, for files, the safetensors bytes of those concatenations).
"""

import torch
from safetensors.torch import save_file

from hbird.labelspec import LabelSpec
from hbird.memory.bank import BankWriter, MemoryBank, normalize_keys
from hbird.memory.rows import Rows

SPEC = LabelSpec(task="segmentation", num_classes=3)
ENC = {"name": "test_vit", "config_hash": "abc", "weights_hash": "123"}


def pieces(count=7, dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(int(torch.randint(1, 9, (1,), generator=gen)), dim, generator=gen)
            for _ in range(count)]  # fmt: skip


def test_rows_equal_the_concatenation_across_blocks_and_reserves():
    parts = pieces()
    for reserve in (0, 3, 10, 1000):
        rows = Rows((4,), torch.float16)
        rows.reserve(reserve)
        for p in parts:
            rows.append(p)
        expected = torch.cat(parts).to(torch.float16)
        assert len(rows) == expected.shape[0]
        assert torch.equal(rows.tensor(), expected) and rows.tensor().is_contiguous()


def test_rows_reuse_their_block_after_clear_but_never_a_replaced_tensor():
    rows = Rows((2,), torch.float32)
    rows.reserve(100)
    rows.append(torch.ones(5, 2))
    block = rows.tensor().data_ptr()
    rows.clear()
    rows.append(torch.full((3, 2), 2.0))
    assert rows.tensor().data_ptr() == block and torch.equal(rows.tensor(), torch.full((3, 2), 2.0))
    mine = torch.zeros(4, 2)
    rows.replace(mine)
    rows.clear()
    rows.append(torch.ones(4, 2))
    assert torch.equal(mine, torch.zeros(4, 2))  # the caller's tensor was not written over
    assert len(Rows((3,), torch.int64)) == 0 and Rows((3,), torch.int64).tensor().shape == (0, 3)


def test_streamed_shards_are_the_bytes_of_a_naive_concatenation(tmp_path):
    """Each shard file equals save_file of torch.cat over that shard's appended pieces
    (keys normalised piece by piece, values as float32, ids expanded), so the change to
    in-place blocks leaves every bank file, checksum and content id as before."""
    parts = pieces(count=9, dim=4, seed=1)
    gen = torch.Generator().manual_seed(2)
    values = [torch.rand(p.shape[0], 3, generator=gen) for p in parts]
    writer = BankWriter(tmp_path / "bank", feature_dim=4, label_spec=SPEC, encoder=ENC,
                        shard_size=12)  # fmt: skip
    shards, current = [], []
    for i, (k, v) in enumerate(zip(parts, values)):
        writer.add(k, v, item=str(i), image_ids=i)
        current.append((k, v, i))
        if sum(c[0].shape[0] for c in current) >= 12:
            shards.append(current)
            current = []
    shards.append(current)
    path = writer.finalize()
    manifest = MemoryBank.read_manifest(path)
    assert len(manifest["shards"]) == len(shards) > 2
    for entry, shard in zip(manifest["shards"], shards):
        naive = {
            "keys": torch.cat([normalize_keys(k, torch.float16) for k, _, _ in shard]),
            "values": torch.cat([v for _, v, _ in shard]),
            "image_ids": torch.cat([torch.full((k.shape[0],), i) for k, _, i in shard]),
        }
        save_file(naive, str(tmp_path / "naive.safetensors"))
        written = (path / entry["file"]).read_bytes()
        assert written == (tmp_path / "naive.safetensors").read_bytes()


def test_a_loaded_multi_shard_bank_equals_the_concatenation(tmp_path):
    bank = MemoryBank(4, SPEC, ENC)
    parts = pieces(count=6, dim=4, seed=3)
    for i, p in enumerate(parts):
        bank.append(p, torch.rand(p.shape[0], 3), image_ids=i)
    path = bank.save(tmp_path / "bank", shard_size=5)
    loaded = MemoryBank.load(path)
    on_disk = MemoryBank.load(path, keys=False)
    assert torch.equal(loaded.keys, bank.keys) and torch.equal(on_disk.read_keys(), bank.keys)
    assert torch.equal(loaded.values, bank.values)
    assert torch.equal(loaded.image_ids, bank.image_ids)
