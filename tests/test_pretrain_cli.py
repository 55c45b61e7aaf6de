"""``hbird pretrain``: flags over a YAML config, a tiny offline run, torchrun on CPU."""

import argparse
import json
import os
import socket
import subprocess
import sys

import pytest

from hbird.cli import pretrain as cli
from hbird.errors import InputError
from hbird.pretrain.presets import TINY_ARCH, TINY_VIT_KWARGS

DATA = ["--data", "synthetic:n=32:seed=0:size=48", "--num-workers", "0"]
TWO_TINY_STEPS = "--tiny --steps 2 --batch-size 8 --crop-size 32 --log-every 1".split()
"""A two-step run of the tiny ViT, logging every step (``DATA`` and ``--out`` are added)."""


def parse(*argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_tiny_run_writes_an_encoder_and_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    args = parse(
        *TWO_TINY_STEPS,
        *DATA,
        "--out",
        str(out),
        "-O",
        "contextualize=false",
        "-O",
        "pooling=mean",
        "--eval-prompt",
        "synthetic:n=3:seed=1:size=48",
        "--eval-query",
        "synthetic:n=2:seed=2:size=48",
        "--eval-image-size",
        "48",
    )
    assert cli.run(args) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["arch"] == TINY_ARCH and saved["model_kwargs"] == TINY_VIT_KWARGS
    assert saved["objective_options"]["contextualize"] is False
    assert saved["objective_options"]["pooling"] == "mean"
    assert saved["objective_options"]["memory_size"] == 512  # the tiny preset's
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "eval/miou" in records[0]
    assert records[-1]["step"] == 2 and "eval/miou" in records[-1]
    printed = capsys.readouterr().out
    assert "hbird predict --encoder vit_tiny_patch16_224 --weights" in printed
    assert (out / "checkpoint.safetensors").is_file()


def test_flags_override_the_yaml_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "objective: co2\nsteps: 50\nlr: 0.01\nobjective_options: {queue_size: 64, proj_dim: 16}\n"
    )
    args = parse("--config", str(config), "--lr", "0.002", "-O", "proj_dim=8", "--out", "x")
    merged = cli.config_from_args(args)
    assert merged.objective == "co2" and merged.steps == 50 and merged.lr == 0.002
    assert merged.objective_options == {"queue_size": 64, "proj_dim": 8}
    assert merged.arch == "vit_small_patch16_224"  # untouched default


def test_bad_settings_are_reported(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("stepz: 3\n")
    with pytest.raises(InputError, match="unknown pretraining setting"):
        cli.config_from_args(parse("--config", str(config)))
    with pytest.raises(InputError, match="key=value"):
        cli.config_from_args(parse("-O", "pooling"))
    with pytest.raises(InputError, match="valid options"):
        cli.run(parse("--tiny", *DATA, "--out", str(tmp_path / "o"), "-O", "poolin=mean"))
    with pytest.raises(InputError, match="--data"):
        cli.run(parse("--tiny", "--out", str(tmp_path / "o")))
    assert cli.main(["--tiny", "--out", str(tmp_path / "o")]) == 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("module", ["hbird.cli.pretrain", "hbird.cli"])
def test_torchrun_two_cpu_processes(tmp_path, module):
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        module,
    ]
    if module == "hbird.cli":
        command.append("pretrain")
    command += [*TWO_TINY_STEPS, *DATA, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert (out / "checkpoint.safetensors").is_file()
