"""FUNGI: features from self-supervised gradients of a frozen model (Simoncini et al. 2024).

>>> from hbird.fungi import FungiExtractor
>>> fx = FungiExtractor(encoder, losses=("kl", "dino", "simclr"), seed=0).fit(train_images)
>>> feats = fx.transform(images)          # (B, d)

Defaults are FUNGI's Table 17 and the authors' code (``preset="paper"``); ``preset="fast"``
keeps hbird's older, cheaper views (``presets``; docs/fungi.md).

Rooms: ``losses/`` (KL, DINO, SimCLR), ``views`` (crops, patches, word deletion, audio
noise and shift), ``audio`` (the Audio Spectrogram Transformer backbone),
``gradients`` (batched per-sample gradients of one linear layer), ``projection`` (seeded
±1 random projection, or a given matrix), ``presets`` (paper, fast), ``pca``, ``extractor`` (image/text level), ``dense`` (per-patch
features for in-context prediction), ``knn`` (kNN classification and retrieval metrics).
"""

from hbird.fungi.audio import AudioBackbone, create_audio_backbone
from hbird.fungi.backbones import FungiBackbone, ImageBackbone, TextBackbone, as_backbone
from hbird.fungi.dense import DenseFungi
from hbird.fungi.extractor import EMBEDDING, FungiExtractor, combine_parts
from hbird.fungi.gradients import LinearTap, batched_gradients, gradient_dim, naive_gradients
from hbird.fungi.knn import knn_evaluate, knn_predict, kshot_indices, retrieval_map
from hbird.fungi.losses import LOSSES, DINOLoss, GradientLoss, KLLoss, SimCLRLoss, create_loss
from hbird.fungi.pca import PCA
from hbird.fungi.presets import PRESETS
from hbird.fungi.projection import MatrixProjection, RandomProjection
from hbird.fungi.views import CropBox

__all__ = [
    "EMBEDDING",
    "AudioBackbone",
    "LOSSES",
    "PCA",
    "PRESETS",
    "CropBox",
    "DINOLoss",
    "DenseFungi",
    "FungiBackbone",
    "FungiExtractor",
    "GradientLoss",
    "ImageBackbone",
    "KLLoss",
    "LinearTap",
    "MatrixProjection",
    "RandomProjection",
    "SimCLRLoss",
    "TextBackbone",
    "as_backbone",
    "batched_gradients",
    "combine_parts",
    "create_audio_backbone",
    "create_loss",
    "gradient_dim",
    "knn_evaluate",
    "knn_predict",
    "kshot_indices",
    "naive_gradients",
    "retrieval_map",
]
