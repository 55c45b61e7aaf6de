"""hbird.io.files: atomic writes, one file mode, and folders hbird may replace (issue 10,
data safety: ``--overwrite`` replaces only a bank, atomically)."""

import os
import stat

import pytest
import torch

from hbird.cli import main
from hbird.data.synthetic import write_scene_folder
from hbird.errors import BankError, InputError
from hbird.index import create_index
from hbird.io.files import atomic_file, atomic_folder, has_file, write_json
from hbird.labelspec import LabelSpec
from hbird.memory.bank import BankWriter, MemoryBank

SPEC = LabelSpec(task="segmentation", num_classes=3, ignore_index=255)
ENC = {"name": "test_vit", "config_hash": "abc", "weights_hash": "123"}


def small_bank(n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bank = MemoryBank(4, SPEC, ENC)
    bank.append(torch.randn(n, 4, generator=gen), torch.rand(n, 3, generator=gen), num_images=1)
    return bank


def modes(folder):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def plain_modes(tmp_path):
    """The modes ``open(..., "w")`` and ``mkdir`` give in this process: the oracle."""
    (tmp_path / "plain_dir").mkdir()
    (tmp_path / "plain_file").write_text("x")
    return (
        stat.S_IMODE((tmp_path / "plain_file").stat().st_mode),
        stat.S_IMODE((tmp_path / "plain_dir").stat().st_mode),
    )


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_json(tmp_path / "a.json", {"v": 1})
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text('{"v": 2, "half')
        raise RuntimeError("killed mid-write")
    assert path.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_every_file_and_folder_of_a_bank_index_and_run_gets_one_mode(tmp_path):
    file_mode, dir_mode = plain_modes(tmp_path)
    bank = small_bank()
    bank.attachments["support"] = torch.ones(2, 4)
    bank_modes = modes(bank.save(tmp_path / "bank", shard_size=5))
    index = create_index("exact", dim=4)
    index.add(torch.nn.functional.normalize(torch.randn(6, 4), dim=1))
    index_modes = modes(index.save(tmp_path / "index"))  # mkdtemp alone gives 0o700
    for found in (bank_modes, index_modes):
        assert found.pop("bank", found.pop("index", None)) == dir_mode
        assert set(found.values()) == {file_mode}, found
    with atomic_file(tmp_path / "one.npy") as tmp:  # mkstemp alone gives 0o600
        tmp.write_bytes(b"x")
    assert stat.S_IMODE((tmp_path / "one.npy").stat().st_mode) == file_mode


def test_atomic_folder_refuses_a_user_folder_and_deletes_nothing(tmp_path):
    user = tmp_path / "notes"
    user.mkdir()
    (user / "thesis.tex").write_text("chapter 1")
    with pytest.raises(InputError, match=r"refusing to overwrite .*notes.*thesis\.tex"):
        with atomic_folder(user, "a saved index", has_file("index.json")):
            raise AssertionError("must not be reached")
    assert (user / "thesis.tex").read_text() == "chapter 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_overwrite_refuses_what_is_not_a_bank(tmp_path, kind):
    target = tmp_path / "out"
    if kind == "folder":
        target.mkdir()
        (target / "thesis.tex").write_text("chapter 1")
        (target / "manifest.json").write_text('{"title": "my thesis"}')  # not a bank's
    else:
        target.write_text("chapter 1")
    with pytest.raises(BankError, match=r"refusing to overwrite .*out.*nothing was deleted"):
        small_bank().save(target, overwrite=True)
    with pytest.raises(BankError, match="refusing to overwrite"):
        BankWriter(target, feature_dim=4, label_spec=SPEC, encoder=ENC, overwrite=True)
    if kind == "folder":
        assert (target / "thesis.tex").read_text() == "chapter 1"
    else:
        assert target.read_text() == "chapter 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_unknown_partial_folder_is_not_deleted(tmp_path):
    partial = tmp_path / "bank.partial"
    partial.mkdir()
    (partial / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match="bank.partial"):
        BankWriter(tmp_path / "bank", feature_dim=4, label_spec=SPEC, encoder=ENC)
    assert (partial / "mine.txt").read_text() == "keep"


def test_the_old_bank_survives_a_failed_rebuild_and_is_replaced_by_a_good_one(tmp_path):
    path = small_bank(n=12).save(tmp_path / "bank")
    writer = BankWriter(path, feature_dim=4, label_spec=SPEC, encoder=ENC, overwrite=True)
    writer.add(torch.randn(3, 4), torch.rand(3, 3))
    with pytest.raises(BankError):
        writer.add(torch.randn(3, 5), torch.rand(3, 3))  # the build fails half-way
    assert len(MemoryBank.load(path)) == 12  # the old bank is still there, intact
    rebuilt = small_bank(n=7, seed=1).save(path, overwrite=True)
    assert len(MemoryBank.load(rebuilt)) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]  # nothing left beside it


CLI = ["--task", "segmentation", "--encoder", "test_vit", "--no-pretrained", "--layers", "0"]
CLI += ["--image-size", "64", "--memory-size", "200", "--quiet"]


def test_cli_bank_build_overwrite_keeps_a_users_folder(tmp_path, scenes, capsys):
    write_scene_folder(tmp_path / "prompt", scenes[0][:3])
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "thesis.tex").write_text("chapter 1")
    argv = ["bank", "build", "--prompt", str(tmp_path / "prompt"), "--out", str(user), *CLI]
    assert main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "thesis" in err and "nothing was deleted" in err and "Traceback" not in err
    assert [p.name for p in user.iterdir()] == ["thesis.tex"]
    assert (user / "thesis.tex").read_text() == "chapter 1"
    assert not (tmp_path / "thesis.partial").exists()

    bank = tmp_path / "bank"
    argv[argv.index(str(user))] = str(bank)
    assert main(argv) == 0
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    os.utime(bank / "manifest.json", (0, 0))  # mark the first build's manifest
    assert main([*argv, "--overwrite"]) == 0  # a bank may be replaced
    assert (bank / "manifest.json").stat().st_mtime > 0
    assert len(MemoryBank.load(bank)) == MemoryBank.read_manifest(bank)["counts"]["entries"] > 0
