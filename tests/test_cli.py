"""The ``hbird`` console script, run in-process on synthetic folders."""

import json

import numpy as np
import pytest
from PIL import Image

from hbird import _optional
from hbird.cli import main
from hbird.data.synthetic import write_scene_folder

FAST = (
    "--task segmentation --encoder test_vit --layers 0 --image-size 64 --k 10 --temperature 0.05 --quiet"
).split()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, scenes):
    prompt, queries = scenes
    root = tmp_path_factory.mktemp("cli")
    write_scene_folder(root / "prompt", prompt)
    write_scene_folder(root / "query", queries, prefix="query")
    return root


def test_predict_from_prompt_folder_writes_labels_overlays_settings(folders, tmp_path, scenes):
    _, queries = scenes
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            "--prompt",
            str(folders / "prompt"),
            "--query",
            str(folders / "query" / "images"),
            "--out",
            str(out),
            *FAST,
        ]
    )
    assert code == 0
    assert sorted(p.name for p in out.glob("query_*.png") if "overlay" not in p.name) == [
        f"query_{i:04d}.png" for i in range(8)
    ]
    assert len(list(out.glob("*_overlay.png"))) == 8
    pred = np.asarray(Image.open(out / "query_0000.png"))
    assert Image.open(out / "query_0000.png").mode == "P" and pred.shape == (64, 80)
    agree = (pred == queries[0].mask.numpy()).mean()
    assert agree > 0.7  # the written ids are the predicted classes
    settings = json.loads((out / "settings.json").read_text())
    assert settings["predictor"]["k"] == 10 and settings["label_spec"]["num_classes"] == 4


def test_depth_prediction_writes_png_in_mm_and_npy(folders, tmp_path):
    out = tmp_path / "depth"
    code = main(
        [
            "predict",
            "--prompt",
            str(folders / "prompt"),
            "--query",
            str(folders / "query" / "images" / "query_0001.png"),
            "--out",
            str(out),
            *FAST,
            "--task",
            "depth",
        ]
    )
    assert code == 0
    metres = np.load(out / "query_0001.npy")
    mm = np.asarray(Image.open(out / "query_0001.png"))
    assert metres.shape == (64, 80) and np.allclose(mm / 1000.0, metres, atol=1e-3)


def test_bank_build_info_then_predict_from_bank(folders, tmp_path, capsys):
    bank = tmp_path / "bank"
    assert (
        main(
            [
                "bank",
                "build",
                "--prompt",
                str(folders / "prompt"),
                "--out",
                str(bank),
                "--memory-size",
                "400",
                "--aug-epochs",
                "2",
                *FAST,
            ]
        )
        == 0
    )
    assert main(["bank", "info", str(bank)]) == 0
    info = capsys.readouterr().out
    assert "400 from 20 prompt images" in info and "test_vit" in info and "aug epochs 2" in info
    out = tmp_path / "from_bank"
    assert (
        main(
            [
                "predict",
                "--bank",
                str(bank),
                "--query",
                str(folders / "query" / "images"),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert len(list(out.glob("*_overlay.png"))) == 8
    # search settings not given on the command line are the bank's, not the CLI defaults
    settings = json.loads((out / "settings.json").read_text())["predictor"]
    assert (settings["k"], settings["temperature"]) == (10, 0.05)
    out = tmp_path / "retuned"
    argv = ["predict", "--bank", str(bank), "--query", str(folders / "query" / "images")]
    assert main([*argv, "--out", str(out), "--k", "5", "--quiet"]) == 0
    settings = json.loads((out / "settings.json").read_text())["predictor"]
    assert (settings["k"], settings["temperature"], settings["image_size"]) == (5, 0.05, 64)
    capsys.readouterr()  # a bank setting cannot change on load: the bank must be rebuilt
    assert main([*argv, "--out", str(out), "--autocast", "bf16", "--quiet"]) == 2
    assert "--autocast is a bank setting" in capsys.readouterr().err
    if _optional.is_available("faiss"):  # backend options reach the index, and are recorded
        out = tmp_path / "ivfpq"
        extra = ["--index", "ivfpq", "--index-param", "k_factor=8", "--index-param", "nprobe=4"]
        assert main([*argv, "--out", str(out), *extra, "--quiet"]) == 0
        index = json.loads((out / "settings.json").read_text())["index"]
        assert (index["kind"], index["k_factor"], index["nprobe"]) == ("ivfpq", 8, 4)
    assert main([*argv, "--out", str(tmp_path / "bad"), "--index-param", "k_factor"]) != 0


def test_bank_build_keeps_its_approximate_index(folders, tmp_path, capsys):
    pytest.importorskip("faiss")
    bank = tmp_path / "bank"
    argv = ["bank", "build", "--prompt", str(folders / "prompt"), "--out", str(bank), *FAST]
    assert main([*argv, "--index", "hnsw"]) == 0
    assert [p.name.split("-")[0] for p in (bank / "indexes").iterdir()] == ["hnsw"]
    assert "indexes     hnsw-" in capsys.readouterr().out


def test_errors_are_reported_not_raised(folders, tmp_path, capsys):
    code = main(
        [
            "predict",
            "--prompt",
            str(tmp_path / "nope"),
            "--query",
            str(folders / "query" / "images"),
            "--out",
            str(tmp_path / "o"),
            *FAST,
        ]
    )
    assert code == 2
    assert "nope" in capsys.readouterr().err
    code = main(
        [
            "predict",
            "--bank",
            str(folders / "prompt"),
            "--query",
            str(folders / "query" / "images"),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert code == 2 and "manifest.json is missing" in capsys.readouterr().err


def test_encoders_lists_test_encoders(capsys):
    assert main(["encoders", "test_*"]) == 0
    assert "test_vit" in capsys.readouterr().out


def test_demo_runs_offline_and_says_what_it_is(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "UNTRAINED" in said and "vit_small_patch14_dinov2" in said
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "synthetic demo with an untrained encoder" in report
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["segmentation"]["miou"] > metrics["segmentation_shuffled_labels"]["miou"] + 0.3
    assert metrics["depth"]["rmse"] < metrics["depth_prompt_mean_baseline"]["rmse"]
    assert len(list((tmp_path / "demo" / "pictures").glob("*.png"))) == 16


def test_demo_follow_up_commands_accept_the_demo_data(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    said = capsys.readouterr().out
    commands = [line.split()[1:] for line in said.splitlines() if line.startswith("  hbird ")]
    assert {c[0] for c in commands} == {"predict", "eval"}
    report = (out / "report.md").read_text()
    assert all(" ".join(["hbird", *c]) in report for c in commands)
    quick = ["--encoder", "test_vit", "--no-pretrained", "--quiet", "--layers", "0"]
    quick += ["--image-size", "64"]  # later flags win: a tiny random encoder, same data
    for command in commands:
        assert main([*command, *quick]) == 0, command
    assert len(list((out / "predictions").glob("query_*_overlay.png"))) == 8
    assert "| rmse |" in capsys.readouterr().out  # the eval command scored depth


def run_eval(dataset, out, *extra):
    """``hbird eval`` with the quick preset and test_vit; returns the exit code."""
    args = [
        "eval",
        "--encoder",
        "test_vit",
        "--dataset",
        dataset,
        "--preset",
        "quick",
        "--out",
        str(out),
        "--quiet",
        "layers=0",
        "image_size=64",
        *extra,
    ]
    return main(args)


def test_eval_retrieval_from_the_command_line(tmp_path, folder_dataset, capsys):
    out = tmp_path / "run"
    code = run_eval(folder_dataset, out)
    assert code == 0
    said = capsys.readouterr().out
    assert "| miou |" in said and "test_vit on folder" in said
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["config"]["k"] == 10
        and metrics["config"]["layers"] == 0
        and metrics["metrics"]["miou"] > 0.7
    )


def test_eval_overrides_may_stand_between_flags(tmp_path, folder_dataset):
    out = tmp_path / "run"
    argv = ["eval", "k=3", "--encoder", "test_vit", "--dataset", folder_dataset, "layers=0"]
    argv += ["--preset", "quick", "--out", str(out), "temperature=0.5", "--quiet", "image_size=64"]
    assert main(argv) == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert (config["k"], config["temperature"], config["layers"], config["image_size"]) == (
        3,
        0.5,
        0,
        64,
    )


def test_eval_refuses_a_stray_word_that_is_not_key_value(tmp_path, folder_dataset, capsys):
    argv = ["eval", "--dataset", folder_dataset, "k=3", "--quiet", "bogus", "--out", "x"]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert "unrecognized arguments: bogus" in capsys.readouterr().err


def test_eval_index_params_reach_the_index(tmp_path, folder_dataset):
    pytest.importorskip("faiss")
    out = tmp_path / "run"
    extra = ("--index", "ivfpq", "--index-param", "k_factor=8")
    assert run_eval(folder_dataset, out, *extra) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["index_params"] == {"k_factor": 8}
    assert (metrics["search"]["kind"], metrics["search"]["k_factor"]) == ("ivfpq", 8)


def test_eval_under_autocast_is_recorded_and_guards_its_run_folder(
    tmp_path, folder_dataset, capsys
):
    out = tmp_path / "run"
    assert run_eval(folder_dataset, out, "--autocast", "bf16") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["autocast"] == "bf16" and metrics["metrics"]["miou"] > 0.7
    capsys.readouterr()
    assert run_eval(folder_dataset, out) != 0  # float32 numbers must not mix into this run
    assert "autocast" in capsys.readouterr().err


def _rows(path):
    import csv

    return list(csv.DictReader(path.open()))


def _swept_fractions_and_seeds(out):
    rows = _rows(out / "data_efficiency.csv")
    assert sorted({r["fraction"] for r in rows}) == ["1/2", "1/4"]
    assert {"seed_1", "seed_2"} <= set(rows[0])


def _probe_trained_two_epochs(out):
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["linear_probe"]["epochs"] == 2


def _linear_points_train_one_epoch(out):
    # --epochs 1: the probe is trained for 1 epoch on the subset and on the whole prompt,
    # not along the default curve of 1, 2, 5 and 10 epochs
    points = [(r["method"], r["fraction"], r["epochs"]) for r in _rows(out / "fast_adaptation.csv")]
    assert points == [
        ("retrieval", "1/4", ""),
        ("retrieval", "1/1", ""),
        ("linear", "1/4", "1"),
        ("linear", "1/1", "1"),
    ]


@pytest.mark.parametrize(
    "extra, check",
    [
        (["--fractions", "1/4,1/2", "--seeds", "1,2"], _swept_fractions_and_seeds),
        (["--protocol", "linear", "--epochs", "2"], _probe_trained_two_epochs),
        (
            ["--protocol", "fast-adaptation", "--fractions", "1/4,1/1", "--epochs", "1"],
            _linear_points_train_one_epoch,
        ),
    ],
)
def test_eval_protocols_follow_their_flags(tmp_path, scenes, extra, check):
    prompt, queries = scenes
    root = tmp_path / "ds"
    write_scene_folder(root / "train", prompt[:12])
    write_scene_folder(root / "val", queries[:3], prefix="val")
    out = tmp_path / "run"
    assert run_eval(f"folder:root={root}:task=segmentation", out, *extra) == 0
    check(out)
    assert (out / "summary.md").is_file()


def test_every_command_module_is_a_subcommand_with_help(capsys):
    import pkgutil

    import hbird.cli
    from hbird.cli import COMMANDS

    # the modules on disk, not the table itself: a new cli/<cmd>.py must be registered
    on_disk = {m.name for m in pkgutil.iter_modules(hbird.cli.__path__)} - {"common", "__main__"}
    assert on_disk == set(COMMANDS)
    for name, description in COMMANDS.items():
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert text.startswith(f"usage: hbird {name}") and description in text, name
