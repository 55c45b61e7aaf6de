"""test_elastic end to end through the ``hbird`` CLI, on synthetic folders: a bank, an
evaluation, and a pretraining run whose checkpoint ``--encoder test_elastic --weights``
loads (issue 12, acceptance "End to end")."""

from __future__ import annotations

import json

import pytest

from hbird.cli import main
from hbird.data.synthetic import write_scene_folder
from hbird.memory.bank import MemoryBank

SETTINGS = "--task segmentation --image-size 64 --k 10 --temperature 0.05 --quiet".split()


@pytest.fixture(scope="module")
def prompt_folder(tmp_path_factory, scenes):
    prompt, _ = scenes
    root = tmp_path_factory.mktemp("elastic_cli") / "prompt"
    write_scene_folder(root, prompt)
    return root


def test_bank_of_test_elastic_features(prompt_folder, tmp_path, scenes):
    bank = tmp_path / "bank"
    argv = ["bank", "build", "--prompt", str(prompt_folder), "--out", str(bank)]
    assert main([*argv, "--encoder", "test_elastic", *SETTINGS]) == 0
    loaded = MemoryBank.load(bank)
    # 20 scenes of 64 × 80 at output stride 16: a 4 × 5 grid each, every patch labelled
    assert loaded.keys.shape == (20 * 4 * 5, 128)
    assert loaded.encoder["name"] == "test_elastic"


def test_eval_and_pretrained_weights(folder_dataset, tmp_path, capsys):
    run = tmp_path / "pretrain"
    pretrain = "pretrain --tiny --arch test_elastic --steps 2 --batch-size 8 --crop-size 32"
    pretrain += f" --data synthetic:n=16:size=48 --num-workers 0 --out {run}"
    assert main(pretrain.split()) == 0
    said = capsys.readouterr().out
    assert f"--encoder test_elastic --weights {run / 'checkpoint.safetensors'}" in said

    scores = {}
    for name, weights in [
        ("random", []),
        ("pretrained", ["--weights", str(run / "checkpoint.safetensors")]),
    ]:
        out = tmp_path / name
        argv = ["eval", "--encoder", "test_elastic", *weights, "--dataset", folder_dataset]
        argv += ["--preset", "quick", "--out", str(out), "--quiet", "image_size=64"]
        assert main(argv) == 0, capsys.readouterr().err
        metrics = json.loads((out / "metrics.json").read_text())
        scores[name] = metrics
        assert 0.0 <= metrics["metrics"]["miou"] <= 1.0
    assert scores["random"]["metrics"] != scores["pretrained"]["metrics"]  # other weights
