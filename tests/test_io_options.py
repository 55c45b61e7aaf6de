"""hbird.io.options: the one ``key=value`` reader behind every flag, override and spec."""

import pytest

from hbird.cli import build_parser, main
from hbird.cli.common import given_settings
from hbird.errors import InputError
from hbird.eval.config import parse_overrides
from hbird.io.options import parse_pairs, parse_spec, parse_value
from hbird.specs import SearchConfig


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("null", None),
        ("None", None),
        (" 16 ", 16),
        ("[8, 9, 10]", [8, 9, 10]),
        ("[]", []),
        ("[0.5, x]", [0.5, "x"]),
        ("1/128", "1/128"),
        ("TRUE", True),
    ],
)
def test_values(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_pairs_read_dashes_as_underscores_and_refuse_a_key_twice():
    assert parse_pairs(["k-factor=16", "metric = ip"], "--index-param", "k_factor=16") == {
        "k_factor": 16,
        "metric": "ip",
    }
    with pytest.raises(InputError, match=r"--index-param: nprobe= is given twice"):
        parse_pairs(["nprobe=8", "nprobe=16"], "--index-param", "nprobe=16")


def index_param_flag(text):
    """``hbird eval --index-param TEXT`` as the CLI reads it."""
    args = build_parser().parse_args(["eval", "--dataset", "x", "--index-param", text])
    return given_settings(args, SearchConfig)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: index_param_flag("k_factor"),
            r"--index-param: 'k_factor' is not key=value \(e\.g\. k_factor=16\)",
        ),
        (lambda: parse_overrides(["=3"]), r"eval override: '=3' is not key=value \(e\.g\. k=50\)"),
        (lambda: parse_spec("voc:split"), r"dataset spec 'voc:split'.*e\.g\. 'voc:root="),
    ],
)
def test_errors_name_what_was_read_and_show_an_example(call, match):
    with pytest.raises(InputError, match=match):
        call()


def test_eval_overrides_read_scientific_numbers_and_lists():
    # YAML 1.1 (the old reader) left "1e-3" a string and read "on" as True
    assert parse_overrides(["temperature=1e-3", "layers=[8, 9]", "index=on"]) == {
        "temperature": 0.001,
        "layers": (8, 9),
        "index": "on",
    }
    assert parse_overrides(["layers=8,9"]) == {"layers": (8, 9)}


def test_pretrain_option_errors_name_the_flag_typed(capsys, tmp_path):
    code = main(["pretrain", "--tiny", "--out", str(tmp_path / "o"), "--model-option", "depth"])
    err = capsys.readouterr().err
    assert code == 2 and "--model-option: 'depth' is not key=value" in err
