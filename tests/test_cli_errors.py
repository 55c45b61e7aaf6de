"""Every bad input of issue 10 (section 1) through ``main(argv)``: one message naming the
flag or file and the fix, a non-zero exit, no traceback, and no output left behind."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hbird.cli import main
from hbird.data.synthetic import make_scenes, write_scene_folder
from hbird.errors import InputError
from hbird.index import create_index

FAST = "--task segmentation --encoder test_vit --layers 0 --image-size 32 --quiet".split()
PREDICT = ["predict", "--prompt", "{prompt}", "--query", "{query}", *FAST]
BANK = ["bank", "build", "--prompt", "{prompt}", *FAST]
EVAL = [
    "eval",
    "--encoder",
    "test_vit",
    "--dataset",
    "{dataset}",
    "--preset",
    "quick",
    "--quiet",
    "layers=0",
    "image_size=32",
]
FUNGI = [
    "fungi",
    "knn",
    "--encoder",
    "test_vit",
    "--dataset",
    "synthetic:train=6:val=3:classes=2:size=32",
    "--image-size",
    "32",
    "--shots",
    "0",
    "--k",
    "2",
    "--losses",
    "kl",
    "--quiet",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Prompt (masks/ and depth/), queries and a dataset of 32x40 scenes (1,280 pixels each),
    a 64x80 query (5,120 pixels), a malformed preset, a file and a folder."""
    root = tmp_path_factory.mktemp("errors")
    scenes = make_scenes(10, seed=3, num_classes=3, size=(32, 40))
    write_scene_folder(root / "prompt", scenes[:6])
    write_scene_folder(root / "query", scenes[6:], prefix="q")
    write_scene_folder(root / "data" / "train", scenes[:6])
    write_scene_folder(root / "data" / "val", scenes[6:], prefix="val")
    (root / "big").mkdir()
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(root / "big" / "big.png")
    (root / "bad.yaml").write_text("k: [1, 2\n  : :\n")
    (root / "a_file").write_text("keep me")
    (root / "a_folder").mkdir()
    bank = [a.replace("{prompt}", str(root / "prompt")) for a in BANK]
    assert main([*bank, "--out", str(root / "bank")]) == 0
    return {
        "bank": root / "bank",
        "prompt": root / "prompt",
        "query": root / "query" / "images",
        "big": root / "big",
        "dataset": f"folder:root={root / 'data'}:task=segmentation",
        "bad_yaml": root / "bad.yaml",
        "file": root / "a_file",
        "folder": root / "a_folder",
    }


@pytest.fixture
def read_only(tmp_path):
    """A folder this process cannot create files in (root ignores modes: use /sys)."""
    if os.geteuid() == 0:
        if not os.path.isdir("/sys"):
            pytest.skip("running as root with no /sys to stand for a read-only folder")
        return Path("/sys/hbird-test-out")
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "out"


def run(argv, files, out):
    """``main`` on ``argv`` with ``{name}`` filled from ``files`` (and ``{out}``); argparse
    errors exit through SystemExit, which is returned as the code."""
    values = {k: str(v) for k, v in files.items()} | {"out": str(out)}
    try:
        return main([a.format(**values) for a in argv])
    except SystemExit as stop:
        return stop.code


def said(capsys) -> str:
    captured = capsys.readouterr()
    text = captured.err + captured.out
    assert "Traceback" not in text
    return text


# argv, words the message must hold, words it must not
# fmt: off
CASES = {
    "predict --k -3": ([*PREDICT, "--out", "{out}", "--k", "-3"], ["--k", ">= 1", "-3"], []),
    "predict --k 0": ([*PREDICT, "--out", "{out}", "--k", "0"], ["--k", ">= 1"], []),
    "predict --temperature 0": (
        [*PREDICT, "--out", "{out}", "--temperature", "0"], ["--temperature", "> 0"], []
    ),
    "predict --temperature -1": (
        [*PREDICT, "--out", "{out}", "--temperature", "-1"], ["--temperature", "> 0"], []
    ),
    "predict --temperature nan": (
        [*PREDICT, "--out", "{out}", "--temperature", "nan"], ["--temperature", "finite"], []
    ),
    "predict --image-size 0": (
        [*PREDICT, "--out", "{out}", "--image-size", "0"], ["--image-size", ">= 1"], []
    ),
    "predict --memory-size 0": (
        [*PREDICT, "--out", "{out}", "--memory-size", "0"], ["--memory-size", ">= 1"], []
    ),
    "predict --memory-size -5": (
        [*PREDICT, "--out", "{out}", "--memory-size", "-5"], ["--memory-size", ">= 1"], []
    ),
    "predict --layers 99": (
        [*PREDICT, "--out", "{out}", "--layers", "99"], ["layer 99", "2 blocks", "0 to 1", "check --layers"],
        ["layers="],
    ),
    "predict --layers abc": (
        [*PREDICT, "--out", "{out}", "--layers", "abc"], ["--layers", "8,9,10", "'abc'"], []
    ),
    "predict --out FILE": ([*PREDICT, "--out", "{file}"], ["--out", "a_file", "is a file"], []),
    "eval --out FILE": ([*EVAL, "--out", "{file}"], ["--out", "a_file", "is a file"], []),
    "demo --out FILE": (["demo", "--out", "{file}", "--quiet"], ["--out", "a_file"], []),
    "fungi --out FOLDER": (
        [*FUNGI, "--out", "{folder}"], ["--out", "a_folder", "is a folder", "results.json"], []
    ),
    "predict --save-bank FILE": (
        [*PREDICT, "--out", "{out}", "--save-bank", "{file}"], ["a_file", "nothing was deleted"],
        [],
    ),
    "predict --index-param bogus=1": (
        [*PREDICT, "--out", "{out}", "--index", "hnsw", "--index-param", "bogus=1"],
        ["bogus", "ef_search", "ef_construction", "--index-param"], ["index_params"],
    ),
    "eval --dataset nosuch:root=x": (
        [*EVAL, "--dataset", "nosuch:root=x", "--out", "{out}"], ["nosuch", "voc", "folder"], []
    ),
    "eval k=abc": ([*EVAL, "k=abc", "--out", "{out}"], ["k must be an integer", "'abc'"], []),
    "eval k=-1": ([*EVAL, "k=-1", "--out", "{out}"], ["k must be >= 1"], []),
    "eval temperature=0": ([*EVAL, "temperature=0", "--out", "{out}"], ["temperature", "> 0"], []),
    "eval malformed preset": (
        ["eval", "--encoder", "test_vit", "--dataset", "{dataset}", "--preset", "{bad_yaml}",
         "--out", "{out}", "--quiet"],
        ["bad.yaml", "not valid YAML", "line 2"], [],
    ),
    "eval --seeds abc": (
        [*EVAL, "--out", "{out}", "--fractions", "1/2", "--seeds", "abc"],
        ["--seeds", "42,400,783", "'abc'"], [],
    ),
    "fungi --losses kl,bogus": (
        [*FUNGI, "--losses", "kl,bogus", "--out", "{out}"], ["bogus", "--losses", "simclr"], []
    ),
    "fungi --loss-option kl.nosuch=3": (
        [*FUNGI, "--loss-option", "kl.nosuch=3", "--out", "{out}"],
        ["nosuch", "temperature", "head_dim", "--loss-option"], ["loss_options"],
    ),
    "fungi --layer blocks.9.attn.proj": (
        [*FUNGI, "--layer", "blocks.9.attn.proj", "--out", "{out}"],
        ["--layer blocks.9.attn.proj", "blocks.1.attn.proj"], [],
    ),
    "fungi synthetic:train=0": (
        [*FUNGI[:4], "--dataset", "synthetic:train=0", "--out", "{out}", "--quiet"],
        ["synthetic", "train=200"], [],
    ),
    "predict huge query": (
        ["predict", "--prompt", "{prompt}", "--query", "{big}", "--out", "{out}", *FAST,
         "--max-pixels", "2000"],
        ["big.png", "2,000 pixels", "80x64", "--max-pixels"], [],
    ),
    "bank build huge prompt": (
        [*BANK, "--out", "{out}", "--max-pixels", "1000"], ["1,000 pixels", "--max-pixels"], []
    ),
    "eval huge images": (
        [*EVAL, "--max-pixels", "1000", "--out", "{out}"], ["1,000 pixels", "--max-pixels"], []
    ),
    "predict --max-pixels 0": (
        [*PREDICT, "--out", "{out}", "--max-pixels", "0"], ["--max-pixels", ">= 1"], []
    ),
    "predict --prompt NOPE": (
        ["predict", "--prompt", "{out}_nope", "--query", "{query}", "--out", "{out}", *FAST],
        ["_nope", "check --prompt"], ["root="],
    ),
    "predict --bank B --image-size 64": (
        ["predict", "--bank", "{bank}", "--query", "{query}", "--out", "{out}", "--image-size", "64"],
        ["--image-size is a bank setting", "--image-size 32", "--image-size 64"], ["image_size"],
    ),
    "predict --num-classes 2 (classes.txt has 3)": (
        [*PREDICT, "--out", "{out}", "--num-classes", "2"],
        ["--num-classes 2", "classes.txt", "drop --num-classes"], ["num_classes"],
    ),
    "predict prompt with masks/ and depth/": (
        ["predict", "--prompt", "{prompt}", "--query", "{query}", "--out", "{out}", *FAST[2:]],
        ["--task segmentation", "--task depth"], ["task="],
    ),
}
# fmt: on


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_message_and_leaves_nothing(name, files, tmp_path, capsys):
    argv, words, not_words = CASES[name]
    out = tmp_path / "out"
    code = run(argv, files, out)
    text = said(capsys)
    assert code == 2, text
    assert "error:" in text
    for word in words:
        assert word in text, f"{word!r} missing from: {text}"
    for word in not_words:
        assert word not in text, f"{word!r} (Python words) in: {text}"
    assert not out.exists() and not out.with_name("out.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert files["file"].read_text() == "keep me" and not any(files["folder"].iterdir())


@pytest.mark.parametrize(
    "argv",
    [
        [*PREDICT, "--out", "{out}"],
        [*BANK, "--out", "{out}"],
        [*EVAL, "--out", "{out}"],
        ["demo", "--out", "{out}", "--quiet"],
    ],
    ids=["predict", "bank build", "eval", "demo"],
)
def test_read_only_out_is_refused_before_any_work(argv, files, read_only, capsys):
    code = run(argv, files, read_only)
    text = said(capsys)
    assert code == 2 and "--out" in text and "cannot create files" in text
    assert not read_only.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu_says_so_and_cpu_works(files, tmp_path, capsys):
    code = run([*PREDICT, "--out", "{out}", "--device", "cuda"], files, tmp_path / "out")
    text = said(capsys)
    assert code == 2 and "--device cuda" in text and "no GPU is visible" in text
    assert "--device cpu works" in text and not (tmp_path / "out").exists()
    assert run([*PREDICT, "--out", "{out}", "--device", "cpu"], files, tmp_path / "out") == 0


def test_max_pixels_raises_the_limit(files, tmp_path, monkeypatch, capsys):
    """With the limit at 2,000 pixels (standing for PIL's 179 MP), the 5,120-pixel query is
    refused; --max-pixels 6000 reads it."""
    import hbird.io.images as images

    monkeypatch.setattr(images, "_max_pixels", 2000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own error at 2,000
    argv = ["predict", "--prompt", "{prompt}", "--query", "{big}", "--out", "{out}", *FAST]
    assert run(argv, files, tmp_path / "out") == 2
    assert "2,000 pixels" in said(capsys) and not (tmp_path / "out").exists()
    assert run([*argv, "--max-pixels", "6000"], files, tmp_path / "out") == 0
    assert (tmp_path / "out" / "big.png").is_file()
    assert images._max_pixels == 2000 and Image.MAX_IMAGE_PIXELS == 1000  # restored


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


# command, the step interrupted, words of the line
# fmt: off
INTERRUPTS = {
    "bank build": (
        [*BANK, "--shard-size", "1"], "hbird.memory.bank.BankWriter.finalize",
        ["out.partial", "resume"],
    ),
    "bank build before its first shard": (
        BANK, "hbird.memory.bank.BankWriter.add", ["nothing was kept", "same command"]
    ),
    "index build": (
        [*BANK, "--index", "hnsw"], "hbird.predictor.load_or_build",
        ["is complete", "search index", "predict --bank"],
    ),
    "predict": (PREDICT, "hbird.cli.predict.write_prediction", ["kept in", "same command"]),
    "eval": (EVAL, "hbird.predictor.InContextPredictor.predict_dense", ["kept in", "resume"]),
    "pretrain": (
        ["pretrain", "--tiny", "--data", "synthetic:n=8:seed=0:size=32", "--steps", "2",
         "--batch-size", "4"],
        "hbird.pretrain.trainer.Trainer.fit", ["checkpoints", "--resume"],
    ),
    "demo (no resume)": (["demo", "--quiet"], "hbird.demo.run_demo", ["run the command again"]),
}
# fmt: on


@pytest.mark.parametrize("name", list(INTERRUPTS))
def test_ctrl_c_stops_with_one_line_and_exit_130(name, files, tmp_path, monkeypatch, capsys):
    argv, step, words = INTERRUPTS[name]
    out = tmp_path / "out"
    monkeypatch.setattr(step, _interrupt)
    code = run([*argv, "--out", "{out}"], files, out)
    captured = capsys.readouterr()
    assert code == 130 and "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "interrupted (Ctrl-C)" in lines[0]
    for word in words:
        assert word in lines[0], lines[0]


def test_interrupted_bank_build_resumes_when_rerun(files, tmp_path, monkeypatch, capsys):
    """The hint is true: the same command finishes the bank from its .partial folder."""
    out = tmp_path / "bank"
    calls = []

    def add_once(self, *args, **kwargs):  # write the first image, then Ctrl-C
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return original(self, *args, **kwargs)

    from hbird.memory.bank import BankWriter

    original = BankWriter.add
    monkeypatch.setattr(BankWriter, "add", add_once)
    assert run([*BANK, "--out", "{out}", "--shard-size", "1"], files, out) == 130
    assert out.with_name("bank.partial").is_dir() and not out.exists()
    monkeypatch.setattr(BankWriter, "add", original)
    assert run([*BANK, "--out", "{out}", "--shard-size", "1"], files, out) == 0
    assert "from 6 prompt images" in said(capsys)


def test_library_errors_keep_python_words():
    """Outside the command line the same messages name the keyword arguments."""
    with pytest.raises(InputError, match=r"set them with index_params\)") as err:
        create_index("exact", 4, bogus=1)
    assert "bogus" in str(err.value) and "chunk_size" in str(err.value)
