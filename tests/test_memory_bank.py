"""MemoryBank: normalisation, atomic sharded save/load, checksums, encoder checks, resume."""

import json

import pytest
import torch

from hbird.errors import BankError
from hbird.labelspec import LabelSpec
from hbird.memory.bank import BankWriter, MemoryBank, normalize_keys

SPEC = LabelSpec(task="segmentation", num_classes=3, ignore_index=255)
ENC = {"name": "test_vit", "config_hash": "abc", "weights_hash": "123"}


def make_bank(n=50, dim=8, key_dtype="float16"):
    gen = torch.Generator().manual_seed(0)
    bank = MemoryBank(dim, SPEC, ENC, key_dtype=key_dtype, config={"k": 30})
    bank.append(torch.randn(n, dim, generator=gen), torch.rand(n, 3, generator=gen), num_images=2)
    return bank


def test_keys_are_l2_normalised_in_dtype():
    bank = make_bank(key_dtype="float16")
    assert bank.keys.dtype == torch.float16
    assert torch.allclose(bank.keys.float().norm(dim=1), torch.ones(50), atol=2e-3)
    assert make_bank(key_dtype="float32").keys.dtype == torch.float32


def test_append_checks_shapes():
    bank = make_bank()
    with pytest.raises(BankError, match="feature dim 8"):
        bank.append(torch.randn(2, 9), torch.rand(2, 3))
    with pytest.raises(BankError, match="label channels"):
        bank.append(torch.randn(2, 8), torch.rand(2, 4))


def test_save_load_round_trip_in_shards(tmp_path):
    bank = make_bank()
    path = bank.save(tmp_path / "bank", shard_size=16)
    manifest = json.loads((path / "manifest.json").read_text())
    assert len(manifest["shards"]) == 4 and manifest["counts"] == {"entries": 50, "images": 2}
    assert manifest["encoder"] == ENC and manifest["label_spec"]["num_classes"] == 3
    loaded = MemoryBank.load(path, encoder=ENC)
    assert torch.equal(loaded.keys, bank.keys) and torch.equal(loaded.values, bank.values)
    assert loaded.label_spec == SPEC and loaded.config["k"] == 30
    assert not (tmp_path / "bank.partial").exists()


def test_save_keeps_float16_keys_bit_for_bit(tmp_path):
    """Saving stores the bank's own keys: normalising float16 rows a second time is not
    idempotent (some move by a rounding step), so a loaded bank would differ from the saved."""
    bank = make_bank(n=300, dim=8)  # 2 of these rows move when normalised again
    renormalised = normalize_keys(bank.keys, torch.float16)
    assert not torch.equal(renormalised, bank.keys)  # the case this test guards exists here
    loaded = MemoryBank.load(bank.save(tmp_path / "bank", shard_size=128), encoder=ENC)
    assert torch.equal(loaded.keys, bank.keys)


def test_refuses_other_encoder_and_dimension(tmp_path):
    path = make_bank().save(tmp_path / "bank")
    other = dict(ENC, weights_hash="999")
    with pytest.raises(BankError, match="weights_hash"):
        MemoryBank.load(path, encoder=other)
    with pytest.raises(BankError, match="16-d"):
        MemoryBank.load(path, encoder=ENC, feature_dim=16)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_detects_truncated_or_tampered_shards(tmp_path, damage):
    path = make_bank().save(tmp_path / "bank", shard_size=20)
    shard = path / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(BankError, match="shard_00001.*checksum"):
        MemoryBank.load(path)


def test_missing_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BankError, match="manifest.json is missing"):
        MemoryBank.load(tmp_path / "empty")


def test_save_does_not_overwrite_without_permission(tmp_path):
    path = make_bank().save(tmp_path / "bank")
    with pytest.raises(BankError, match="already exists"):
        make_bank().save(path)
    make_bank(n=10).save(path, overwrite=True)
    assert len(MemoryBank.load(path)) == 10


def writer(path, **kw):
    return BankWriter(path, feature_dim=4, label_spec=SPEC, encoder=ENC, shard_size=10, **kw)


def test_killed_build_resumes_from_finished_shards(tmp_path):
    path = tmp_path / "bank"
    items = [(f"0:{i}", torch.randn(6, 4), torch.rand(6, 3)) for i in range(5)]
    w = writer(path)
    for item, k, v in items[:3]:  # 18 entries: one shard flushed after item 1 (12 ≥ 10)
        w.add(k, v, item=item, images=1)
    del w  # killed: items 0 and 1 are on disk, item 2 only in memory
    assert not path.exists()
    resumed = writer(path)
    assert resumed.done == {"0:0", "0:1"}
    for item, k, v in items:
        if item not in resumed.done:
            resumed.add(k, v, item=item, images=1)
    bank = MemoryBank.load(resumed.finalize())
    assert len(bank) == 30 and bank.num_images == 5
    expected = torch.cat([torch.nn.functional.normalize(k, dim=1) for _, k, _ in items]).half()
    assert torch.equal(bank.keys, expected)


def test_resume_with_other_settings_starts_over(tmp_path):
    path = tmp_path / "bank"
    w = writer(path)
    w.add(torch.randn(12, 4), torch.rand(12, 3), item="0:0")
    other = BankWriter(
        path, feature_dim=4, label_spec=SPEC, encoder=dict(ENC, name="x"), shard_size=10
    )
    assert other.done == set()


def test_attachments_round_trip_and_are_verified(tmp_path):
    bank = make_bank()
    bank.attachments["support"] = torch.arange(12.0).reshape(3, 4)
    path = bank.save(tmp_path / "bank")
    assert torch.equal(MemoryBank.load(path).attachments["support"], bank.attachments["support"])
    file = path / "attachments.safetensors"
    file.write_bytes(file.read_bytes()[:-3])
    with pytest.raises(BankError, match="attachments.safetensors.*checksum"):
        MemoryBank.load(path)


def test_keys_left_on_disk_are_read_on_demand(tmp_path):
    bank = make_bank()
    path = bank.save(tmp_path / "bank", shard_size=16)
    lazy = MemoryBank.load(path, encoder=ENC, keys=False)
    assert not lazy.keys_in_memory
    assert len(lazy) == 50 and torch.equal(lazy.values, bank.values)  # values are loaded
    assert torch.equal(lazy.key_norms(), bank.key_norms()) and not lazy.keys_in_memory  # streamed
    assert torch.equal(torch.cat(list(lazy.iter_keys())), bank.keys) and not lazy.keys_in_memory
    with pytest.raises(BankError, match="read_keys"):  # a property does no disk I/O
        _ = lazy.keys
    assert torch.equal(lazy.read_keys(), bank.keys) and lazy.keys_in_memory  # all four shards
    grown = MemoryBank.load(path, encoder=ENC, keys=False)
    grown.append(torch.randn(3, 8), torch.rand(3, 3))  # appending reads the keys first
    assert len(grown) == 53 and torch.equal(grown.keys[:50], bank.keys)
    # a folder that changed under a bank whose keys are on disk is refused, not mixed in
    again = MemoryBank.load(path, encoder=ENC, keys=False)
    shard = sorted(path.glob("shard_*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(BankError, match="read from .* on demand"):
        again.read_keys()


def three_image_bank():
    """Images 10, 11, 12 with 3, 0 and 4 entries (hand-made keys: row i is i·e_0 + e_1)."""
    bank = MemoryBank(2, SPEC, ENC, key_dtype="float32")
    rows = torch.stack([torch.arange(7.0) + 1, torch.ones(7)], dim=1)  # (7, 2)
    values = torch.eye(3)[torch.arange(7) % 3]  # (7, 3)
    bank.append(rows[:3], values[:3], num_images=1, image_ids=10)
    bank.append(rows[:0], values[:0], num_images=1, image_ids=11)
    bank.append(rows[3:], values[3:], num_images=1, image_ids=torch.full((4,), 12))
    return bank, rows, values


def test_remove_drops_one_images_entries_and_keeps_the_order():
    bank, rows, values = three_image_bank()
    assert bank.image_ids.tolist() == [10] * 3 + [12] * 4
    assert bank.remove(10) == 3
    kept = rows[3:] / rows[3:].norm(dim=1, keepdim=True)
    assert torch.equal(bank.keys, kept) and torch.equal(bank.values, values[3:])
    assert bank.image_ids.tolist() == [12] * 4 and bank.num_images == 2
    with pytest.raises(
        BankError, match=r"image id\(s\) \[10, 11\]; its entries come from images \[12\]"
    ):
        bank.remove([10, 11])
    assert len(bank) == 4  # a refused removal changes nothing


def test_image_ids_are_saved_and_loaded_with_the_bank(tmp_path):
    bank, _, _ = three_image_bank()
    path = bank.save(tmp_path / "bank", shard_size=2)
    loaded = MemoryBank.load(path, encoder=ENC, keys=False)
    assert loaded.image_ids.tolist() == [10] * 3 + [12] * 4
    assert loaded.remove(12) == 4 and torch.allclose(loaded.keys, bank.keys[:3])
    part = MemoryBank.load(path, encoder=ENC, rows=(2, 5))
    assert part.image_ids.tolist() == [10, 12, 12]


def test_entries_appended_without_an_image_id_cannot_be_removed():
    bank = make_bank()
    assert bool((bank.image_ids == -1).all())
    with pytest.raises(BankError, match="does not record which prompt image"):
        bank.remove(0)
