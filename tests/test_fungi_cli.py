"""``hbird fungi knn`` end to end on a tiny synthetic set (offline, test_vit)."""

import argparse
import json

import pytest

from hbird.cli import fungi
from hbird.errors import InputError


def parse(argv):
    parser = argparse.ArgumentParser(prog="hbird fungi")
    fungi.add_arguments(parser)
    return parser.parse_args(argv)


def test_knn_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "knn.json"
    args = parse(
        [
            "knn",
            "--encoder",
            "test_vit",
            "--dataset",
            "synthetic:train=16:val=8:classes=4:size=32",
            "--image-size",
            "32",
            "--losses",
            "kl,simclr",
            "--preset",
            "fast",
            "--loss-option",
            "simclr.num_negative_inputs=4",
            "--loss-option",
            "dino.num_local=2",
            "--shots",
            "2",
            "--k",
            "5",
            "--retrieval",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert fungi.run(args) == 0
    printed = capsys.readouterr().out
    assert "embedding + kl + simclr" in printed and "2-shot" in printed
    report = json.loads(out.read_text())
    assert report["layer"] == "blocks.1.attn.proj"
    assert report["losses"]["simclr"]["num_negative_inputs"] == 4
    assert report["preset"] == "fast" and report["losses"]["simclr"]["view_size"] == 16
    assert len(report["rows"]) == 6
    for row in report["rows"]:
        assert 0.0 <= row["majority"]["top1"] <= 1.0 and "retrieval_map" in row


def test_loss_options_are_parsed_and_checked():
    assert fungi.parse_loss_options(
        ["dino.num_local=4", "dino.global_scale=x", "kl.temperature=1.5"]
    ) == {
        "dino": {"num_local": 4, "global_scale": "x"},
        "kl": {"temperature": 1.5},
    }
    with pytest.raises(InputError, match="LOSS.KEY=VALUE"):
        fungi.parse_loss_options(["num_local=4"])


def test_an_all_convolution_encoder_is_refused_with_a_clear_error(capsys):
    """ELASTIC has no nn.Linear to differentiate: exit 2 and a message, not a traceback."""
    from hbird.cli import main

    argv = ["fungi", "knn", "--encoder", "test_elastic", "--dataset"]
    argv += ["synthetic:train=4:val=2:classes=2:size=32", "--image-size", "32", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "test_elastic has no nn.Linear layer" in err and "Traceback" not in err
