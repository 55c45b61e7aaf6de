"""Bank spec apart from search settings: load overrides, stored configs, flags, versions."""

import argparse
import json

import pytest

from hbird import InContextPredictor
from hbird.cli import build_parser, main
from hbird.errors import BankError, InputError, check_format_version
from hbird.eval import resolve_config
from hbird.specs import DEFAULT_ENCODER, BankSpec, SearchConfig, split_stored_config


@pytest.fixture(scope="module")
def bank(tmp_path_factory, scenes):
    """A bank built with aug_epochs 1, memory_size 120, image_size 64 (and k 10)."""
    prompt, _ = scenes
    settings = dict(encoder="test_vit", layers=0, image_size=64, k=10, temperature=0.05)
    p = InContextPredictor(**settings, memory_size=120, aug_epochs=1, index="exact", progress=False)
    p.fit([s.image for s in prompt], [s.mask for s in prompt], num_classes=4)
    return p.save(tmp_path_factory.mktemp("spec") / "bank")


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_load_refuses_bank_settings_and_save_never_records_an_override(bank, tmp_path):
    with pytest.raises(BankError, match=r"aug_epochs is a bank setting.*aug_epochs=1.*rebuild"):
        InContextPredictor.load(bank, aug_epochs=5, memory_size=7, image_size=32, progress=False)
    loaded = InContextPredictor.load(bank, k=3, temperature=0.5, progress=False)
    assert (loaded.k, loaded.temperature, loaded.image_size) == (3, 0.5, 64)
    copy = manifest(loaded.save(tmp_path / "copy"))
    config = copy["config"]
    assert (config["aug_epochs"], config["memory_size"], config["image_size"]) == (1, 120, 64)
    assert (copy["search"]["k"], copy["search"]["temperature"]) == (10, 0.05)  # as built
    with pytest.raises(TypeError, match="unknown search setting 'kk'"):
        InContextPredictor.load(bank, kk=3, progress=False)


def test_stored_configs_of_earlier_versions_load_and_unknown_keys_are_reported(bank, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for f in bank.iterdir():
        if f.is_file():
            (old / f.name).write_bytes(f.read_bytes())
    data = manifest(bank)
    search = data.pop("search")  # before the split: one flat config, plus a stray key
    data["config"] = {**data["config"], **search, "k": 7, "colour": "blue"}
    (old / "manifest.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="unknown setting.*colour"):
        loaded = InContextPredictor.load(old, progress=False)
    assert (loaded.k, loaded.memory_size, loaded.image_size) == (7, 120, 64)


def test_a_flat_fungi_config_of_before_splits_into_spec_and_search():
    old = {"features": "fungi", "fungi_support": 300, "image_size": 64, "k": 5, "index": "exact"}
    spec, search = split_stored_config(old, None, "old/manifest.json")
    assert (spec.features, spec.feature_options, spec.image_size) == (
        "fungi",
        {"support_size": 300},
        64,
    )
    assert search == {"k": 5, "index": "exact"}


def test_format_versions_are_checked_one_way():
    check_format_version(1, 2, "f.json", InputError)
    check_format_version(2, 2, "f.json", InputError)
    with pytest.raises(InputError, match="f.json has format version 3, newer.*upgrade hbird"):
        check_format_version(3, 2, "f.json", InputError)
    for bad in (None, 0, "1", True):
        with pytest.raises(BankError, match="no valid format version"):
            check_format_version(bad, 2, "f.json", BankError)


def test_evaluation_defaults_are_the_papers_and_predictor_defaults_are_the_specs():
    cfg = resolve_config()  # Balazevic et al. 2023, appendix A, Table 6 ("everywhere else")
    paper = (512, 10_240_000, 2, 30, 0.02)
    assert (cfg.image_size, cfg.memory_size, cfg.aug_epochs, cfg.k, cfg.temperature) == paper
    assert cfg.pretrained and cfg.encoder == DEFAULT_ENCODER
    p = InContextPredictor()
    assert (p.image_size, p.memory_size, p.aug_epochs, p.k) == (224, None, 1, 30)
    with pytest.raises(InputError, match="temperature must be > 0"):
        resolve_config(temperature=0.0)


def subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for inner, subsub in subparsers(sub):
                    yield f"{name} {inner}", subsub


def test_every_flag_of_the_predictor_commands_has_help_and_bank_flags_appear_only_where_they_exist():
    helps = {}
    for name, sub in subparsers(build_parser()):
        for action in (
            sub._actions if name in ("predict", "bank build", "bank info", "eval") else []
        ):
            if isinstance(action, argparse._SubParsersAction):
                continue  # its commands are checked one by one
            assert action.help, f"hbird {name} {action.option_strings or action.dest}: no help"
        helps[name] = sub.format_help()
    for name in ("bank build", "eval"):
        assert "--bank" not in helps[name], name
    assert "--bank" in helps["predict"]
    for name in ("predict", "bank build", "eval"):  # one default encoder, said the same way
        assert f"(default: {DEFAULT_ENCODER}" in " ".join(helps[name].split()), name


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--k", "0", "k must be >= 1"),
        ("--temperature", "0", "temperature must be > 0 and finite"),
        ("--temperature", "nan", "temperature must be > 0 and finite"),
        ("--temperature", "inf", "temperature must be > 0 and finite"),
        ("--image-size", "0", "image_size must be >= 1"),
        ("--memory-size", "-5", "memory_size must be >= 1"),
        ("--layers", "8,x", "layers must be ints like 8,9,10"),
        ("--k", "2.5", "k must be an integer"),
    ],
)
def test_numbers_are_range_checked_when_parsed(flag, value, message, capsys, tmp_path):
    commands = [
        ["predict", "--prompt", "p", "--query", "q", "--out", str(tmp_path)],
        ["bank", "build", "--prompt", "p", "--out", str(tmp_path)],
        ["eval", "--dataset", "d"],
    ]
    for command in commands:
        with pytest.raises(SystemExit) as exit:
            main([*command, f"{flag}={value}"])
        assert exit.value.code == 2
        assert message in capsys.readouterr().err


def test_spec_fields_are_split_between_bank_and_search():
    bank, search = set(BankSpec.field_names()), set(SearchConfig.field_names())
    assert not bank & search
    assert {
        "k",
        "temperature",
        "index",
        "index_params",
        "device",
        "batch_size",
        "feature_cache",
        "workers",
        "shard_bank",
    } == search
    built = {"encoder", "layers", "image_size", "memory_size", "aug_epochs", "key_dtype"}
    assert built | {"seed", "features", "autocast", "sampling"} <= bank


def test_extractor_settings_it_cannot_honour_are_reported(folder_dataset, tmp_path, capsys):
    root = folder_dataset.split("root=")[1].split(":")[0]
    build = ["bank", "build", "--prompt", f"{root}/train", "--task", "segmentation", "--quiet"]
    build += ["--encoder", "test_vit"]
    assert main([*build, "--out", str(tmp_path / "a"), "--feature-option", "support_size=3"]) == 2
    said = capsys.readouterr().err
    assert "features 'patch' has no option support_size; it takes compile" in said
    assert "--feature-option" in said
    fungi = [*build, "--features", "fungi", "--feature-option", "suport_size=3"]
    assert main([*fungi, "--out", str(tmp_path / "c")]) == 2
    assert "features 'fungi' has no option suport_size; it takes support_size" in (
        capsys.readouterr().err
    )
    assert main([*build, "--out", str(tmp_path / "b"), "--features", "fungi", "--layers", "0"]) == 2
    assert "leave layers unset" in capsys.readouterr().err
