"""Data safety through the CLI (issue 10, section 1): nothing silently ignored, mixed or lost.

Every case runs ``hbird`` in-process on synthetic folders with the tiny ``test_vit``.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from hbird.cli import main
from hbird.cli import predict as predict_cli
from hbird.cli.fungi import class_warnings
from hbird.data.folder import FolderDataset
from hbird.data.synthetic import write_scene_folder
from hbird.errors import InputError
from hbird.fungi.knn import kshot_indices
from hbird.io.images import load_mask
from hbird.pretrain import PretrainConfig, Trainer
from hbird.pretrain.data import SyntheticImages
from hbird.pretrain.presets import TINY_ARCH, TINY_VIT_KWARGS, tiny_options

FAST = ["--encoder", "test_vit", "--layers", "0", "--image-size", "64", "--quiet"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, scenes):
    prompt, queries = scenes
    root = tmp_path_factory.mktemp("safety")
    write_scene_folder(root / "prompt", prompt[:8])
    write_scene_folder(root / "query", queries[:4], prefix="query")
    shutil.rmtree(root / "prompt" / "depth")  # one label kind: the task is inferred
    return root


@pytest.fixture(scope="module")
def bank(folders):
    path = folders / "bank"
    assert (
        main(["bank", "build", "--prompt", str(folders / "prompt"), "--out", str(path), *FAST]) == 0
    )
    return path


def truncated_copy(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])  # the PNG's IDAT and IEND are cut off
    return dst


@pytest.fixture
def bad_queries(folders, tmp_path):
    """Two readable queries, then a truncated PNG and a text file named .jpg."""
    q = tmp_path / "queries"
    q.mkdir()
    for name in ("query_0000.png", "query_0001.png"):
        shutil.copy(folders / "query" / "images" / name, q / name)
    truncated_copy(folders / "query" / "images" / "query_0002.png", q / "query_0002.png")
    (q / "notes.jpg").write_text("not an image")
    return q


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--task", "depth"], ["--task"]),
        (["--num-classes", "7"], ["--num-classes"]),
        (["--memory-size", "10"], ["--memory-size"]),
        (["--ignore-index", "0", "--aug-epochs", "3"], ["--aug-epochs", "--ignore-index"]),
    ],
)
def test_predict_with_a_bank_refuses_flags_the_bank_fixes(
    bank, folders, tmp_path, capsys, flags, named
):
    out = tmp_path / "out"
    argv = ["predict", "--bank", str(bank), "--query", str(folders / "query" / "images")]
    assert main([*argv, "--out", str(out), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert all(flag in err for flag in named) and "rebuild the bank" in err
    assert " ".join(flags[:2]) in err  # the rebuild command carries the value given
    assert "Traceback" not in err and not out.exists()


def test_predict_with_a_bank_names_what_the_bank_holds(bank, folders, tmp_path, capsys):
    argv = ["predict", "--bank", str(bank), "--query", str(folders / "query" / "images")]
    assert main([*argv, "--out", str(tmp_path / "o"), "--task", "depth", "--num-classes", "7"]) == 2
    err = capsys.readouterr().err  # the prompt folder has 4 classes (classes.txt), masks only
    assert "--task segmentation" in err and "--num-classes 4" in err
    assert main([*argv, "--out", str(tmp_path / "o"), "--save-bank", str(tmp_path / "b")]) == 2
    assert "--save-bank" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_a_bad_query_stops_the_run_before_the_memory_is_built(
    folders, bad_queries, tmp_path, capsys
):
    out, saved = tmp_path / "out", tmp_path / "saved_bank"
    argv = ["predict", "--prompt", str(folders / "prompt"), "--query", str(bad_queries)]
    assert main([*argv, "--out", str(out), "--save-bank", str(saved), *FAST]) == 2
    err = capsys.readouterr().err
    assert "query_0002.png" in err and "notes.jpg" in err and "--skip-bad" in err
    assert not out.exists() and not saved.exists()  # no memory was built, nothing written


def test_skip_bad_skips_and_lists_bad_queries(bank, bad_queries, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["predict", "--bank", str(bank), "--query", str(bad_queries), "--out", str(out)]
    assert main([*argv, "--quiet", "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "query_0002.png" in captured.err and "notes.jpg" in captured.err
    assert sorted(p.name for p in out.glob("query_*.png")) == [
        "query_0000.png",
        "query_0000_overlay.png",
        "query_0001.png",
        "query_0001_overlay.png",
    ]
    settings = json.loads((out / "settings.json").read_text())
    assert sorted(settings["skipped"]) == [
        str(bad_queries / "notes.jpg"),
        str(bad_queries / "query_0002.png"),
    ]
    assert sorted(settings["outputs"]) == [str(bad_queries / f"query_000{i}.png") for i in (0, 1)]


def test_bad_prompt_files_are_found_first_and_can_be_skipped(folders, tmp_path, capsys):
    prompt = tmp_path / "prompt"
    shutil.copytree(folders / "prompt", prompt)
    truncated_copy(prompt / "images" / "scene_0003.png", prompt / "images" / "scene_0003.png")
    (prompt / "masks" / "scene_0005.png").unlink()  # its mask becomes a float .npy with 1.5
    mask = np.zeros((64, 80))
    mask[3, 4] = 1.5
    np.save(prompt / "masks" / "scene_0005.npy", mask)
    out = tmp_path / "out"
    argv = ["predict", "--prompt", str(prompt), "--query", str(folders / "query" / "images")]
    assert main([*argv, "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "2 prompt file(s)" in err and "scene_0003.png" in err
    assert "scene_0005.npy" in err and "1.5" in err and not out.exists()
    assert main([*argv, "--out", str(out), "--skip-bad", *FAST]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["bank"]["images"] == 6  # 8 prompt images, 2 skipped


def test_predict_resumes_keeping_outputs_with_the_same_settings(
    bank, folders, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    argv = ["predict", "--bank", str(bank), "--query", str(folders / "query" / "images")]
    argv += ["--out", str(out), "--quiet", "--k", "5"]
    real_load, calls = predict_cli.load_image, []

    def interrupted(path):  # Ctrl-C while reading the third query
        calls.append(path.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_load(path)

    monkeypatch.setattr(predict_cli, "load_image", interrupted)
    try:  # the CLI may turn Ctrl-C into a message and an exit status
        assert main(argv) != 0
    except KeyboardInterrupt:
        pass
    first = json.loads((out / "settings.json").read_text())
    assert sorted(first["outputs"]) == [
        str(folders / "query" / "images" / f"query_000{i}.png") for i in (0, 1)
    ]
    calls.clear()
    monkeypatch.setattr(predict_cli, "load_image", lambda p: calls.append(p.name) or real_load(p))
    assert main(argv) == 0
    assert calls == ["query_0002.png", "query_0003.png"]  # the first two were kept
    assert "keeping 2 prediction(s)" in capsys.readouterr().out
    assert len(json.loads((out / "settings.json").read_text())["outputs"]) == 4
    # the kept files are the ones a fresh run writes
    fresh = tmp_path / "fresh"
    assert main([*argv[:-5], "--out", str(fresh), "--quiet", "--k", "5"]) == 0
    assert (out / "query_0000.png").read_bytes() == (fresh / "query_0000.png").read_bytes()
    # other settings are refused, naming them, and nothing is touched
    before = (out / "settings.json").read_text()
    assert main([*argv, "--temperature", "0.5"]) == 2
    assert "--temperature differ" in capsys.readouterr().err
    assert (out / "settings.json").read_text() == before


def test_predict_refuses_an_out_folder_with_outputs_it_did_not_record(
    bank, folders, tmp_path, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "query_0001.png").write_bytes(b"someone's file")
    argv = ["predict", "--bank", str(bank), "--query", str(folders / "query" / "images")]
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    assert "query_0001.png exists" in capsys.readouterr().err
    assert (out / "query_0001.png").read_bytes() == b"someone's file"


def test_a_float_npy_mask_with_fractions_is_refused(tmp_path):
    whole, half = np.array([[0.0, 2.0], [1.0, 3.0]]), np.array([[0.0, 1.5], [1.0, 3.0]])
    np.save(tmp_path / "whole.npy", whole)
    np.save(tmp_path / "half.npy", half)
    assert load_mask(tmp_path / "whole.npy").tolist() == [[0, 2], [1, 3]]
    with pytest.raises(InputError, match=r"half\.npy holds 1 non-integer value\(s\), e.g. 1.5"):
        load_mask(tmp_path / "half.npy")
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan]]))
    with pytest.raises(InputError, match="nan.npy"):
        load_mask(tmp_path / "nan.npy")


def test_a_mask_stored_twice_is_refused_naming_both(folders, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(folders / "prompt", root)
    np.save(root / "masks" / "scene_0002.npy", np.zeros((64, 80), dtype=np.int64))
    with pytest.raises(InputError) as err:
        FolderDataset(root)
    assert str(root / "masks" / "scene_0002.png") in str(err.value)
    assert str(root / "masks" / "scene_0002.npy") in str(err.value)


@pytest.mark.parametrize("kind", ["masks", "depth"])
def test_a_label_stored_as_png_and_npy_stops_predict_naming_both(scenes, tmp_path, capsys, kind):
    """Masks and depth maps alike (depth was resolved "the PNG wins", silently)."""
    root = write_scene_folder(tmp_path / "p", scenes[0][:4])
    shutil.rmtree(root / ("depth" if kind == "masks" else "masks"))
    np.save(root / kind / "scene_0002.npy", np.ones((64, 80), dtype=np.float32))
    query = write_scene_folder(tmp_path / "q", scenes[1][:1], prefix="query") / "images"
    out = tmp_path / "out"
    argv = ["predict", "--prompt", str(root), "--query", str(query), "--out", str(out), *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(root / kind / "scene_0002.png") in err and str(root / kind / "scene_0002.npy") in err
    assert "keep one of them" in err and "Traceback" not in err and not out.exists()


def test_fungi_class_warnings_count_what_is_really_used():
    names = ("cat", "dog", "eel")
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])  # cat 4, dog 2, eel 1
    assert class_warnings(labels, names, shots=3) == [
        "--shots 3: 2 class(es) have fewer training images (dog 2, eel 1); "
        "the 3-shot rows use all of those, 6 images in all"  # 3 + 2 + 1
    ]
    assert len(kshot_indices(labels, 3)) == 6  # what the 3-shot rows really use
    assert class_warnings(labels, names, shots=1) == []
    (one,) = class_warnings(torch.tensor([1, 1, 1]), names, shots=0)
    assert "one class (dog)" in one


def test_fungi_knn_warns_about_a_single_class(tmp_path, capsys, scenes):
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        for i, scene in enumerate(scenes[0][:3]):
            array = (scene.image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            Image.fromarray(array).save(tmp_path / split / "cat" / f"{i}.png")
    argv = ["fungi", "knn", "--encoder", "test_vit", "--dataset", f"folder:root={tmp_path}"]
    argv += ["--image-size", "32", "--losses", "kl", "--shots", "5", "--k", "2", "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "one class (cat)" in err and "--shots 5: 1 class(es)" in err and "3 images in all" in err


def test_resume_without_a_run_is_refused(tmp_path):
    out = tmp_path / "typo"
    cfg = PretrainConfig(
        objective="hummingbird",
        objective_options=tiny_options("hummingbird"),
        arch=TINY_ARCH,
        model_kwargs=TINY_VIT_KWARGS,
        steps=1,
        batch_size=4,
        crop_size=32,
        num_workers=0,
        out=str(out),
        resume=True,
    )
    trainer = Trainer(cfg, images=SyntheticImages(n=4, seed=0, size=48), log=lambda _: None)
    with pytest.raises(InputError, match=r"--resume: .*typo holds no run to continue"):
        trainer.fit()
    assert not out.exists()


def test_a_failed_eval_start_leaves_no_config_so_the_corrected_rerun_runs(
    folder_dataset, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["eval", "--dataset", folder_dataset, "--out", str(out), "--layers", "0"]
    argv += ["--image-size", "64", "--memory-size", "2000", "--quiet", "max_queries=2"]
    assert main([*argv, "--encoder", "test_vti"]) == 2  # a typo: no such encoder
    assert "test_vti" in capsys.readouterr().err
    assert not (out / "config.json").exists()
    assert main([*argv, "--encoder", "test_vit"]) == 0  # was: "holds a run with other settings"
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["encoder"] == "test_vit"
    assert main([*argv, "--encoder", "test_vit", "--k", "3"]) == 2  # a real run is still guarded
    assert "holds a run with other settings (k differ)" in capsys.readouterr().err


@pytest.fixture
def bad_eval_dataset(scenes, tmp_path):
    """A folder dataset (8 prompt, 4 query images) with a truncated prompt image, a query
    mask of the wrong size and, as the last query, a text file named .png."""
    root = tmp_path / "data"
    write_scene_folder(root / "train", scenes[0][:8], with_depth=False)
    write_scene_folder(root / "val", scenes[1][:3], prefix="val", with_depth=False)
    truncated_copy(
        root / "train" / "images" / "scene_0003.png", root / "train" / "images" / "scene_0003.png"
    )
    np.save(root / "val" / "masks" / "val_0001.npy", np.zeros((8, 8), dtype=np.int64))
    (root / "val" / "masks" / "val_0001.png").unlink()
    (root / "val" / "images" / "val_0009.png").write_text("not an image")
    shutil.copy(root / "val" / "masks" / "val_0000.png", root / "val" / "masks" / "val_0009.png")
    return root


EVAL_FAST = (
    "--encoder test_vit --layers 0 --image-size 64 --memory-size 2000 --aug-epochs 1 "
    "--overlays 0 --quiet"
).split()


def test_eval_checks_every_prompt_and_query_file_before_the_memory(
    bad_eval_dataset, tmp_path, monkeypatch, capsys
):
    from hbird.eval import retrieval

    built = []
    monkeypatch.setattr(retrieval, "fitted_predictor", lambda *a, **kw: built.append(a) or 1 / 0)
    out = tmp_path / "run"
    argv = ["eval", "--dataset", f"folder:root={bad_eval_dataset}", "--out", str(out), *EVAL_FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "1 prompt file(s)" in err and "scene_0003.png" in err and "--skip-bad" in err
    assert "Traceback" not in err and not out.exists() and built == []  # before any work
    (bad_eval_dataset / "train" / "images" / "scene_0003.png").unlink()  # the prompt is fixed
    (bad_eval_dataset / "train" / "masks" / "scene_0003.png").unlink()
    assert main(argv) == 2
    err = capsys.readouterr().err  # the queries' problems, all of them at once
    assert "2 query file(s)" in err and "val_0001.npy" in err and "8x8" in err
    assert "val_0009.png" in err and not out.exists() and built == []


def test_eval_skip_bad_skips_lists_and_records_bad_files(bad_eval_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["eval", "--dataset", f"folder:root={bad_eval_dataset}", "--out", str(out), *EVAL_FAST]
    assert main([*argv, "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "skipping 1 prompt file(s) (--skip-bad)" in err and "scene_0003.png" in err
    assert "skipping 2 query file(s) (--skip-bad)" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"]["prompt_images"] == 7 and metrics["counts"]["queries"] == 2
    summary = (out / "summary.md").read_text()
    assert "Skipped 3 unusable file(s)" in summary and "val_0009.png" in summary
    for stem, split in (("scene_0003", "train"), ("val_0001", "val"), ("val_0009", "val")):
        for path in (bad_eval_dataset / split).glob(f"*/{stem}.*"):
            path.unlink()  # the oracle: the same dataset with the bad entries removed
    clean = tmp_path / "clean"
    argv = ["eval", "--dataset", f"folder:root={bad_eval_dataset}", "--out", str(clean), *EVAL_FAST]
    assert main(argv) == 0
    assert json.loads((clean / "metrics.json").read_text())["metrics"] == metrics["metrics"]


def test_checked_dataset_checks_only_what_a_run_uses(bad_eval_dataset):
    from hbird.data.checks import checked_dataset
    from hbird.data.imagesets import ImageFolderDataset

    queries = FolderDataset(bad_eval_dataset, split="val")  # val_0000 good, 0001 bad, ...
    assert len(checked_dataset(queries, "query", limit=1)) == 4  # max_queries=1: one checked
    with pytest.raises(InputError, match="2 query file"):
        checked_dataset(queries, "query")
    kept = checked_dataset(queries, "query", skip_bad=True)
    assert kept.names == ["val_0000", "val_0002"] and len(kept.skipped_files) == 2
    assert kept.files_checked and kept.subset([1]).files_checked  # subsets: checked already
    images = ImageFolderDataset(bad_eval_dataset / "val" / "images")  # imagefolder: images
    assert [name for name in checked_dataset(images, "query", skip_bad=True).names] == [
        "val_0000",
        "val_0001",
        "val_0002",
    ]


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Offline mode, an empty Hugging Face cache, and any request an error (none is made)."""
    import urllib.request

    from huggingface_hub import constants

    def refuse(*args, **kwargs):
        raise AssertionError("a test made a network request")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return constants


def test_the_default_encoder_offline_fails_in_seconds_naming_the_ways_out(
    folders, tmp_path, no_network, capsys
):
    import time

    out = tmp_path / "out"
    argv = [
        "predict",
        "--prompt",
        str(folders / "prompt"),
        "--query",
        str(folders / "query" / "images"),
    ]
    start = time.perf_counter()
    assert main([*argv, "--out", str(out), "--quiet"]) == 2  # no --encoder: the default one
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert "vit_small_patch14_dinov2.lvd142m" in err and "offline" in err
    assert "--weights" in err and "--no-pretrained" in err and "test_vit" in err
    assert "Traceback" not in err and not out.exists()
    assert seconds < 30  # was ~53 s of hub retries; here: building ViT-S/14 on a loaded CPU
    assert no_network.HF_HUB_OFFLINE is False  # the hub's switch is restored


def test_hub_reachable_decides_with_one_quick_request(monkeypatch):
    import urllib.error
    import urllib.request

    from hbird.encoders import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    seen = []

    def answer(error):
        def urlopen(request, timeout):
            seen.append(timeout)
            raise error

        return urlopen

    monkeypatch.setattr(urllib.request, "urlopen", answer(urllib.error.URLError("no route")))
    assert hub.hub_reachable() is False and seen == [hub.PROBE_SECONDS]
    http_error = urllib.error.HTTPError("https://huggingface.co", 503, "busy", {}, None)
    monkeypatch.setattr(urllib.request, "urlopen", answer(http_error))
    assert hub.hub_reachable() is True  # an error status is still an answer
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_reachable() is False and len(seen) == 2  # offline: no request at all


@pytest.fixture
def no_hub_requests(no_network, monkeypatch):
    """``no_network`` without ``HF_HUB_OFFLINE``: the first request fails quickly (no
    route), and any connection any HTTP client would open is recorded and refused (at the
    socket layer, so it holds whatever client the hub library uses)."""
    import socket
    import urllib.error
    import urllib.request

    pytest.importorskip("transformers")
    sent = []

    def no_route(request, timeout):
        raise urllib.error.URLError("no route to host")

    def lookup(host, *args, **kwargs):
        sent.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def connect(self, address):
        sent.append(address)
        raise OSError("no route to host")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(urllib.request, "urlopen", no_route)
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return sent


def predict_with_hf(folders, out, *flags):
    """``hbird predict`` on the safety folders with a hub-hosted ``hf:`` encoder."""
    query = folders / "query" / "images"
    argv = ["predict", "--prompt", str(folders / "prompt"), "--query", str(query)]
    return [*argv, "--out", str(out), "--encoder", "hf:facebook/dinov2-small", *flags]


@pytest.mark.parametrize("offline_by", ["HF_HUB_OFFLINE", "a failed first request"])
@pytest.mark.parametrize("weights", [[], ["--no-pretrained"]])
def test_an_hf_encoder_offline_fails_in_seconds_naming_the_ways_out(
    folders, tmp_path, no_hub_requests, monkeypatch, capsys, offline_by, weights
):
    import time

    if offline_by == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    start = time.perf_counter()
    assert main(predict_with_hf(folders, out, "--quiet", *weights)) == 2
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert "hf:facebook/dinov2-small" in err and "offline" in err
    assert "--weights" in err and "--no-pretrained" in err and "test_vit" in err
    assert "--encoder hf:/path/to/folder" in err  # the way out that works for hf: models
    assert "Traceback" not in err and not out.exists()
    assert no_hub_requests == []  # was: five retried requests per file, ~25 s
    assert seconds < 15  # no model is built; the prompt folder's check is most of it


def test_a_local_hf_folder_is_read_offline_without_asking_the_hub(tmp_path, no_hub_requests):
    from hbird.encoders import create_encoder
    from hf_models import save_tiny

    save_tiny(tmp_path / "tiny_vit", "vit")
    encoder = create_encoder(f"hf:{tmp_path / 'tiny_vit'}", pretrained=True)
    assert encoder.weights_source == f"hf:{tmp_path / 'tiny_vit'}"
    assert no_hub_requests == []


def test_weights_with_an_hf_encoder_is_refused_naming_the_flags(folders, tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    assert main(predict_with_hf(folders, out, "--weights", "w.pt")) == 2
    err = capsys.readouterr().err
    assert "--weights w.pt" in err and "--encoder hf:/path/to/folder" in err
    assert "weights=" not in err and "Traceback" not in err and not out.exists()
