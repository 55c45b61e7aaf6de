"""Audio clips on disk (PCM .wav, resampling), the audio dataset layouts (class folders,
ESC-50, SpeechCommands) and ``hbird fungi knn --modality audio`` through ``main``."""

import json
import wave

import numpy as np
import pytest

from hbird.cli import main
from hbird.data.audio import load_audio_classification, synthetic_tones
from hbird.errors import InputError
from hbird.io.audio import read_wav, resample, write_wav

RATE = 8000


def raw_wav(path, frames: bytes, width: int, channels: int = 1, rate: int = RATE):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(frames)
    return path


def test_read_wav_decodes_pcm_by_hand(tmp_path):
    # 16-bit: -32768, 0, 16384 → -1, 0, 0.5
    wav16 = raw_wav(tmp_path / "a.wav", np.array([-32768, 0, 16384], "<i2").tobytes(), 2)
    samples, rate = read_wav(wav16)
    assert rate == RATE and samples.tolist() == [-1.0, 0.0, 0.5]
    # 8-bit is unsigned: 0, 128, 192 → -1, 0, 0.5
    samples, _ = read_wav(raw_wav(tmp_path / "b.wav", bytes([0, 128, 192]), 1))
    assert samples.tolist() == [-1.0, 0.0, 0.5]
    # 24-bit little-endian: 0x400000 = 2^22 → 0.5; 0xC00000 = -2^22 → -0.5
    samples, _ = read_wav(raw_wav(tmp_path / "c.wav", bytes([0, 0, 0x40, 0, 0, 0xC0]), 3))
    assert samples.tolist() == [0.5, -0.5]
    # stereo is averaged: (16384 + 0) / 2 → 0.25
    stereo = raw_wav(tmp_path / "d.wav", np.array([16384, 0], "<i2").tobytes(), 2, channels=2)
    assert read_wav(stereo)[0].tolist() == [0.25]
    tone = np.sin(np.arange(100) / 5.0).astype(np.float32) * 0.5
    back, _ = read_wav(write_wav(tmp_path / "e.wav", tone, RATE))
    assert np.abs(back - tone).max() <= 0.5 / 32768 + 1e-7


def test_read_wav_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "x.mp3").write_bytes(b"ID3")
    with pytest.raises(InputError, match=r"x\.mp3 is not a \.wav file.*ffmpeg"):
        read_wav(tmp_path / "x.mp3")
    (tmp_path / "bad.wav").write_bytes(b"not a riff file")
    with pytest.raises(InputError, match=r"cannot read .*bad\.wav as PCM \.wav"):
        read_wav(tmp_path / "bad.wav")
    with pytest.raises(InputError, match="holds no samples"):
        read_wav(raw_wav(tmp_path / "empty.wav", b"", 2))


def test_resampling_keeps_a_tone():
    """A 44.1 kHz 440 Hz sine resampled to 16 kHz is the 16 kHz 440 Hz sine (away from the
    edges, where the filter sees the clip's ends), and has ceil(T · 160/441) samples."""
    t = np.arange(44100) / 44100
    out = resample(np.sin(2 * np.pi * 440 * t), 44100, 16000)
    assert out.shape == (16000,)
    expected = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert np.abs(out - expected)[500:-500].max() < 1e-3
    assert np.array_equal(resample(expected, 16000, 16000), expected.astype(np.float32))


def tone_file(path, label: int, seed: int = 0):
    clip = synthetic_tones(label + 1, seed=seed, num_classes=max(2, label + 1), rate=RATE)
    return write_wav(path, clip.clips[label][0], RATE)


def class_folders(root, classes=("high", "low"), per_class=3):
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            for i in range(per_class):
                tone_file(root / split / name / f"{i}.wav", c, seed=i)
    return root


def test_class_folder_layout(tmp_path):
    root = class_folders(tmp_path / "sounds")
    train = load_audio_classification(f"folder:root={root}", "train")
    assert train.class_names == ("high", "low") and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.inputs[0] == root / "train" / "high" / "0.wav"
    (root / "val" / "low" / "3.mp3").write_bytes(b"ID3")
    with pytest.raises(InputError, match=r"3\.mp3 is not a \.wav clip"):
        load_audio_classification(f"folder:root={root}", "val")
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(InputError, match="has no .wav clips in class sub-folders"):
        load_audio_classification(f"folder:root={tmp_path / 'empty'}", "train")


def test_esc50_layout_splits_by_fold(tmp_path):
    root = tmp_path / "ESC-50"
    rows = [("1-a.wav", 1, 0, "dog"), ("2-b.wav", 2, 1, "rain"), ("5-c.wav", 5, 1, "rain")]
    (root / "meta").mkdir(parents=True)
    lines = ["filename,fold,target,category,esc10,src_file,take"]
    lines += [f"{f},{fold},{t},{c},False,x,A" for f, fold, t, c in rows]
    (root / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")
    for f, _, t, _ in rows:
        tone_file(root / "audio" / f, t)
    train = load_audio_classification(f"esc50:root={root}", "train")
    test = load_audio_classification(f"esc50:root={root}", "test")
    assert [p.name for p in train.clips] == ["1-a.wav", "2-b.wav"]
    assert train.labels.tolist() == [0, 1]
    assert [p.name for p in test.clips] == ["5-c.wav"] and test.class_names == ("dog", "rain")
    fold1 = load_audio_classification(f"esc50:root={root}:fold=1", "test")
    assert [p.name for p in fold1.clips] == ["1-a.wav"]
    with pytest.raises(InputError, match="--test-split test"):
        load_audio_classification(f"esc50:root={root}", "val")
    with pytest.raises(InputError, match=r"fold=3 is not in .*folds are \[1, 2, 5\]"):
        load_audio_classification(f"esc50:root={root}:fold=3", "test")
    (root / "audio" / "2-b.wav").unlink()
    with pytest.raises(InputError, match=r"2-b\.wav does not exist"):
        load_audio_classification(f"esc50:root={root}", "train")


def test_speechcommands_lists(tmp_path):
    root = tmp_path / "sc"
    for word, n in (("no", 3), ("yes", 3), ("_background_noise_", 1)):
        for i in range(n):
            tone_file(root / word / f"{i}.wav", int(word == "yes"))
    (root / "validation_list.txt").write_text("yes/1.wav\n")
    (root / "testing_list.txt").write_text("no/2.wav\nyes/2.wav\n")
    train = load_audio_classification(f"speechcommands:root={root}", "train")
    assert train.class_names == ("no", "yes")
    assert [str(p.relative_to(root)) for p in train.clips] == ["no/0.wav", "no/1.wav", "yes/0.wav"]
    assert train.labels.tolist() == [0, 0, 1]
    val = load_audio_classification(f"speechcommands:root={root}", "val")
    test = load_audio_classification(f"speechcommands:root={root}", "test")
    assert val.labels.tolist() == [1] and test.labels.tolist() == [0, 1]
    (root / "testing_list.txt").write_text("maybe/0.wav\n")
    with pytest.raises(InputError, match="maybe/0.wav, whose word folder does not exist"):
        load_audio_classification(f"speechcommands:root={root}", "test")


def test_synthetic_tones_are_seeded_and_differ_in_pitch_and_rhythm():
    a, b = synthetic_tones(8, seed=1, rate=RATE), synthetic_tones(8, seed=1, rate=RATE)
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a.clips, b.clips))
    assert a.labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    # class 1's tone sits 1.5× higher than class 0's: compare spectral peaks
    peak = [np.argmax(np.abs(np.fft.rfft(c[0]))) for c in a.clips[:2]]
    assert 1.4 < peak[1] / peak[0] < 1.6
    # classes 0, 4 and 8 share a pitch but play 1, 2 and 3 bursts: count the runs of a
    # 20 ms moving average of |x| above the noise (|noise| averages 0.04)
    twelve = synthetic_tones(12, seed=0, num_classes=12, rate=RATE)
    runs = []
    for clip in (twelve.clips[0], twelve.clips[4], twelve.clips[8]):
        loud = np.convolve(np.abs(clip[0]), np.ones(160) / 160, "same") > 0.1
        runs.append(int(np.sum(np.diff(np.r_[0, loud.astype(int)]) == 1)))
    assert runs == [1, 2, 3]


pytest.importorskip("transformers")


def run_knn(tmp_path, dataset, *extra):
    out = tmp_path / "knn.json"
    argv = ["fungi", "knn", "--modality", "audio", "--encoder", "test_ast"]
    argv += ["--dataset", dataset, "--losses", "kl,simclr", "--k", "3", "--shots", "2"]
    argv += ["--loss-option", "simclr.num_negative_inputs=4", "--quiet", "--out", str(out)]
    return main([*argv, *extra]), out


def test_cli_knn_on_audio_folders(tmp_path, capsys):
    root = class_folders(tmp_path / "sounds")
    code, out = run_knn(tmp_path, f"folder:root={root}")
    assert code == 0
    printed = capsys.readouterr().out
    assert "test_ast on folder" in printed and "6 train / 6 test clips" in printed
    assert "embedding + kl + simclr" in printed
    report = json.loads(out.read_text())
    assert report["layer"] == "layers.1.attention.o_proj"
    assert report["losses"]["simclr"]["audio_views"] == 16
    assert report["losses"]["simclr"]["head_dim"] == 768


def test_cli_audio_errors_are_one_line(tmp_path, capsys):
    root = class_folders(tmp_path / "sounds")
    (root / "train" / "low" / "x.flac").write_bytes(b"fLaC")
    code, out = run_knn(tmp_path, f"folder:root={root}")
    err = capsys.readouterr().err
    assert code == 2 and "x.flac is not a .wav clip" in err and "Traceback" not in err
    assert not out.exists()
    (tmp_path / "none" / "train").mkdir(parents=True)
    (tmp_path / "none" / "val").mkdir()
    code, _ = run_knn(tmp_path, f"folder:root={tmp_path / 'none'}")
    assert code == 2 and "has no .wav clips" in capsys.readouterr().err
    (root / "train" / "low" / "x.flac").unlink()
    code = main(["fungi", "knn", "--modality", "audio", "--dataset", f"folder:root={root}"])
    assert code == 2 and "needs --weights" in capsys.readouterr().err


def test_cli_warns_on_one_class(tmp_path, capsys):
    root = class_folders(tmp_path / "one", classes=("only",))
    code, _ = run_knn(tmp_path, f"folder:root={root}")
    assert code == 0
    assert "holds one class (only)" in capsys.readouterr().err
