"""FUNGI for audio: an Audio Spectrogram Transformer and its filter-bank front end.

:class:`AudioBackbone` wraps a Hugging Face ``ASTModel`` (the format SSAST and AST
checkpoints convert to) and its ``ASTFeatureExtractor``: a clip becomes the model's
normalised log-mel filter bank ``(T, F)`` (``T = max_length`` frames, padded or cut;
``F = num_mel_bins``), which the KL view is and the SimCLR views perturb
(:class:`~hbird.fungi.views.NoiseShift`, appendix A.2). ``transformers`` computes the
filter bank with torchaudio's Kaldi ``fbank`` when torchaudio is installed and with its
own NumPy port otherwise (25 ms Hann windows every 10 ms at 16 kHz, in samples).

Weights are local only: :func:`load_ast` reads a folder written by ``save_pretrained``
(``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, and
``preprocessor_config.json`` for the front end's rate, mean and std if present), or the
weights file in such a folder. ``create_audio_backbone("test_ast")`` is a
tiny seeded random AST for trials and tests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hbird._optional import require
from hbird.errors import InputError
from hbird.fungi.backbones import FungiBackbone, _hf_default_layer, module_identity
from hbird.io.audio import read_wav, resample

POOLINGS = ("pooler", "mean", "cls")


class AudioBackbone(FungiBackbone):
    """A Hugging Face ``ASTModel`` and its ``ASTFeatureExtractor`` as a FUNGI backbone.

    Args:
        model: an ``ASTModel``; frozen (``eval``, ``requires_grad=False``) in place.
        feature_extractor: its ``ASTFeatureExtractor`` (``num_mel_bins`` and
            ``max_length`` must be the model's).
        name: how the model is named in reports.
        pooling: the clip embedding: ``"pooler"`` (the model's own ``pooler_output``,
            the mean of its CLS and distillation tokens after the final norm), ``"mean"``
            (mean of the patch tokens, SSAST's ``ft_avgtok``) or ``"cls"``.
        resample: resample clips at another rate to the front end's
            (:func:`hbird.io.audio.resample`); ``False`` refuses them.

    Inputs are ``.wav`` paths, ``(waveform (T,), sample_rate)`` pairs, or waveforms
    ``(T,)`` at the front end's rate.
    """

    modality = "audio"

    def __init__(
        self,
        model: nn.Module,
        feature_extractor: Any,
        *,
        name: str | None = None,
        pooling: str = "pooler",
        resample: bool = True,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        config = model.config
        fe = feature_extractor
        for field in ("num_mel_bins", "max_length"):
            if getattr(fe, field) != getattr(config, field):
                raise InputError(
                    f"the feature extractor makes {field}={getattr(fe, field)} but the model "
                    f"takes {getattr(config, field)}; use the checkpoint's preprocessor_config.json"
                )
        model.requires_grad_(False)
        self.root = model.eval()
        self.feature_extractor = fe
        self.sample_rate = int(fe.sampling_rate)
        self.pooling = pooling
        self.resample = resample
        self.name = name or getattr(config, "_name_or_path", "") or type(model).__name__
        self.embed_dim = int(config.hidden_size)
        self.default_layer = _hf_default_layer(model)

    def waveform(self, clip: Any, index: int = 0) -> np.ndarray:
        """One clip → ``(T,)`` float32 samples at :attr:`sample_rate`."""
        if isinstance(clip, (str, os.PathLike)):
            samples, rate = read_wav(clip)
            where = str(clip)
        elif isinstance(clip, tuple) and len(clip) == 2:
            samples, rate = clip
            where = f"clip {index}"
        else:
            samples, rate, where = clip, self.sample_rate, f"clip {index}"
        samples = np.asarray(
            samples.detach().cpu() if isinstance(samples, torch.Tensor) else samples,
            dtype=np.float32,
        )
        if samples.ndim != 1 or samples.size == 0:
            raise InputError(
                f"{where} must be a non-empty mono waveform (T,), got shape {samples.shape}"
            )
        if int(rate) != self.sample_rate:
            if not self.resample:
                raise InputError(
                    f"{where} is sampled at {rate} Hz but {self.name} takes {self.sample_rate} Hz; "
                    "resample it (or let hbird: AudioBackbone(resample=True))"
                )
            samples = resample(samples, int(rate), self.sample_rate)
        return samples

    def prepare(self, inputs: Sequence[Any]) -> torch.Tensor:
        """``B`` clips → normalised filter banks ``(B, T, F)`` (float32, CPU)."""
        waves = [self.waveform(clip, i) for i, clip in enumerate(inputs)]
        out = self.feature_extractor(waves, sampling_rate=self.sample_rate, return_tensors="pt")
        return out["input_values"].to(torch.float32)

    def embed(self, views: torch.Tensor) -> torch.Tensor:
        """Filter banks ``(N, T, F)`` → clip embeddings ``(N, D)``."""
        x = views.to(device=self.device, dtype=self.dtype)
        out = self.root(input_values=x)
        if self.pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state  # (N, 2 + patches, D): CLS, distillation, patches
        return hidden[:, 0] if self.pooling == "cls" else hidden[:, 2:].mean(dim=1)

    def identity(self) -> dict[str, str]:
        fe = self.feature_extractor
        front = f"{self.sample_rate} Hz, mean {fe.mean}, std {fe.std}, {self.pooling}"
        return {**module_identity(self.root, self.name), "front_end": front}


# -- building -----------------------------------------------------------------------------

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def load_ast(weights: str | os.PathLike[str]) -> tuple[nn.Module, Any]:
    """``(ASTModel, ASTFeatureExtractor)`` from a local checkpoint (see the module docs).

    ``transformers`` reads the weights (its own key layout of every version, and the
    ``audio_spectrogram_transformer.`` prefix of classification checkpoints, whose
    classifier is left out); any weight the model lacks is an error.
    """
    transformers = require("transformers", "the audio FUNGI backbone (ASTModel)")
    path = Path(weights)
    if not path.exists():
        raise InputError(f"--weights {path} does not exist")
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.name not in WEIGHT_FILES:
        raise InputError(
            f"--weights {path}: a weights file must be named {' or '.join(WEIGHT_FILES)} and "
            "sit beside its config.json (as ASTModel.save_pretrained writes them)"
        )
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise InputError(
            f"{folder} holds none of {', '.join(WEIGHT_FILES)}; --weights must be a folder "
            "saved by ASTModel.save_pretrained (or the weights file in it)"
        )
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder} has no config.json; the AST checkpoint needs its ASTConfig")
    try:
        model, info = transformers.ASTModel.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"cannot load an ASTModel from {folder}: {err}") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise InputError(
            f"{folder} is not an ASTModel checkpoint: {len(missing)} weights are missing (e.g. "
            f"{missing[:2]}); convert SSAST/AST weights to Hugging Face's ASTModel format first"
        )
    config = model.config
    if (folder / "preprocessor_config.json").is_file():
        fe = transformers.ASTFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
    else:
        fe = transformers.ASTFeatureExtractor(
            num_mel_bins=config.num_mel_bins, max_length=config.max_length
        )
    model.config._name_or_path = str(folder)
    return model, fe


TEST_AST = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "patch_size": 8,
    "frequency_stride": 8,
    "time_stride": 8,
    "num_mel_bins": 16,
    "max_length": 32,
}
TEST_AST_RATE = 8000
"""``test_ast``: 16 mel bins × 32 frames (8 patches of 8 × 8) at 8 kHz, width 32, 2 blocks."""


TEST_TOKEN_STD = 0.5
"""``test_ast``: std of its CLS, distillation and position embeddings."""


def tiny_ast(seed: int = 0, token_std: float = TEST_TOKEN_STD) -> tuple[nn.Module, Any]:
    """``(ASTModel, ASTFeatureExtractor)``: the tiny random ``test_ast``, seeded.

    ``transformers`` initialises the CLS and distillation tokens and the position
    embeddings of a new AST to zero, which leaves a random AST blind to where a patch
    is and its two tokens equal; ``test_ast`` draws them from ``N(0, token_std²)``
    (truncated at ±2) instead. At the default 0.5 they outweigh the random patch
    features in the residual stream, as a pretrained model's position embeddings can.
    """
    transformers = require("transformers", "the audio FUNGI backbone (ASTModel)")
    config = transformers.ASTConfig(**TEST_AST)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.ASTModel(config)
        emb = model.embeddings
        for token in (emb.cls_token, emb.distillation_token, emb.position_embeddings):
            if token_std > 0:  # 0: transformers' zeros
                nn.init.trunc_normal_(token.data, std=token_std)
    fe = transformers.ASTFeatureExtractor(
        sampling_rate=TEST_AST_RATE,
        num_mel_bins=config.num_mel_bins,
        max_length=config.max_length,
    )
    model.config._name_or_path = "test_ast"
    return model, fe


AUDIO_MODELS = ("ast", "test_ast")


def create_audio_backbone(
    name: str = "ast",
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    pooling: str = "pooler",
) -> AudioBackbone:
    """``"ast"`` from local ``weights`` (:func:`load_ast`) or the tiny random ``"test_ast"``."""
    if name not in AUDIO_MODELS:
        raise InputError(
            f"unknown audio model {name!r}; choose ast (with --weights <AST checkpoint>) or "
            "test_ast (tiny, random)"
        )
    if name == "ast":
        if weights is None:
            raise InputError(
                "the audio model ast needs --weights <folder or file of an ASTModel checkpoint> "
                "(hbird downloads no audio weights); --encoder test_ast is a tiny random model"
            )
        model, fe = load_ast(weights)
    else:
        model, fe = tiny_ast()
    return AudioBackbone(model.to(device), fe, pooling=pooling)
