"""Audio clips on disk: PCM ``.wav`` files read as mono float waveforms, and resampling.

Reading uses the standard library's :mod:`wave` (8-, 16-, 24- and 32-bit integer PCM;
ESC-50 and SpeechCommands are 16-bit PCM). Samples come back as ``(T,)`` float32 in
[-1, 1]; several channels are averaged to one. Other formats are refused with the
command that converts them.

Resampling is band-limited polyphase filtering (:func:`scipy.signal.resample_poly`,
the ``audio`` extra), by the reduced ratio of the two rates (16000 / 44100 = 160 / 441).
"""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np

from hbird.errors import InputError

AUDIO_SUFFIXES = (".wav",)
CONVERT_HINT = "convert it to 16-bit PCM .wav, e.g. ffmpeg -i IN -acodec pcm_s16le OUT.wav"


def _pcm_samples(frames: bytes, width: int) -> np.ndarray:
    """Little-endian PCM bytes of ``width`` bytes per sample → float64 in [-1, 1]."""
    if width == 1:  # 8-bit WAV is unsigned
        return (np.frombuffer(frames, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    if width == 3:
        raw = np.frombuffer(frames, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        return ints.astype(np.float64) / float(1 << 23)
    dtype = {2: "<i2", 4: "<i4"}[width]
    return np.frombuffer(frames, dtype=dtype).astype(np.float64) / float(1 << (8 * width - 1))


def wav_info(path: str | Path) -> tuple[int, int]:
    """``(sample_rate, frames)`` of a PCM ``.wav`` file, read from its header only."""
    return _open_wav(Path(path), read=False)[1:]


def _open_wav(path: Path, read: bool) -> tuple[np.ndarray | None, int, int]:
    if path.suffix.lower() not in AUDIO_SUFFIXES:
        raise InputError(f"{path} is not a .wav file; hbird reads PCM .wav clips: {CONVERT_HINT}")
    if not path.is_file():
        raise InputError(f"audio clip {path} does not exist")
    try:
        with wave.open(str(path), "rb") as f:
            rate, channels, width, frames = (
                f.getframerate(),
                f.getnchannels(),
                f.getsampwidth(),
                f.getnframes(),
            )
            data = f.readframes(frames) if read else b""
    except (wave.Error, EOFError, OSError) as err:
        raise InputError(
            f"cannot read {path} as PCM .wav ({err}); hbird reads integer PCM .wav: {CONVERT_HINT}"
        ) from None
    if width not in (1, 2, 3, 4) or rate < 1 or channels < 1:
        raise InputError(
            f"{path}: unsupported .wav ({width}-byte samples, {rate} Hz); {CONVERT_HINT}"
        )
    if not read:
        return None, rate, frames
    if len(data) < frames * channels * width:
        raise InputError(f"{path} is truncated: its header promises {frames} frames; re-export it")
    samples = _pcm_samples(data[: frames * channels * width], width).reshape(-1, channels)
    return samples.mean(axis=1).astype(np.float32), rate, frames


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A PCM ``.wav`` file → ``(waveform (T,) float32 in [-1, 1], sample_rate)``, mono."""
    waveform, rate, frames = _open_wav(Path(path), read=True)
    if frames == 0:
        raise InputError(f"{path} holds no samples (an empty clip)")
    return waveform, rate


def resample(waveform: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """``(T,)`` samples at ``rate`` Hz → ``(ceil(T · target / rate),)`` at ``target_rate``.

    Polyphase resampling by ``up / down = target_rate / rate`` reduced (scipy's Kaiser
    window FIR low-pass at the lower Nyquist frequency); a no-op at the same rate.
    """
    if rate == target_rate:
        return np.asarray(waveform, dtype=np.float32)
    from hbird._optional import require

    signal = require("scipy.signal", f"resampling audio from {rate} Hz to {target_rate} Hz")
    common = math.gcd(int(rate), int(target_rate))
    out = signal.resample_poly(
        np.asarray(waveform, dtype=np.float64), target_rate // common, rate // common
    )
    return out.astype(np.float32)


def write_wav(path: str | Path, waveform: np.ndarray, rate: int) -> Path:
    """``(T,)`` float samples in [-1, 1] → a 16-bit mono PCM ``.wav``, atomically (``x · 2¹⁵``
    rounded and clipped, the inverse of :func:`read_wav`'s scaling)."""
    from hbird.io.files import atomic_file

    ints = np.clip(np.round(np.asarray(waveform, dtype=np.float64) * 32768.0), -32768, 32767)
    with atomic_file(path) as tmp, wave.open(str(tmp), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(rate))
        f.writeframes(ints.astype("<i2").tobytes())
    return Path(path)


def list_audio(folder: str | Path) -> list[Path]:
    """``.wav`` files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
