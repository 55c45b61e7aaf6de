"""Linear-probe baseline (Balazevic et al. 2023, §4.2/4.3): a linear head on frozen patches.

The same encoder, layers and input size as the retrieval protocol; instead of a memory,
a linear layer maps every patch feature to its label:

- segmentation: soft targets = the patch's class fractions (:func:`hbird.memory.labels.pool_labels`),
  cross-entropy with soft targets; patches whose pixels are all ignored are left out;
- depth / regression: the mean of the patch's valid pixels, L1 (default) or L2 loss on
  valid patches only.

Prompt patch features are extracted once, without augmentation, and cached in memory:
``patches × D × 2`` bytes in float16 (default ``cache_dtype``) — e.g. 10,582 VOC images
at 512² with a ViT-S/16 (≈1,000 patches each, D = 384) take ≈8 GB; pass
``cache_dtype="float32"`` to double that for exact features, or a smaller ``image_size``.
Features are standardised with the prompt's per-dimension mean and standard deviation
(regression targets too), an affine change that keeps the head linear and lets one
learning rate suit every encoder. The head starts at zero and is trained with SGD
(momentum 0.9) over shuffled mini-batches of patches for a given number of epochs, with a
cosine, step (×0.1 at 1/2 and 3/4 of the epochs) or constant learning rate; everything is
seeded. Query logits are upsampled bilinearly to each query's original size, then the
argmax is taken, and scored with the same metric objects and :class:`Report` as the
retrieval protocol, so both appear in one table (:func:`hbird.eval.report.compare_reports`).

One job per module: ``settings`` (:class:`ProbeSettings`, the learning-rate schedule),
``patches`` (the prompt's labelled patch features), ``head`` (:class:`LinearHead` and its
predictions), ``training`` (SGD), ``report`` (:class:`LinearProbeReport`) and ``protocol``
(:func:`linear_probe`: the steps in order, and the run folder).
"""

from hbird.eval.linear_probe.head import LinearHead, predict_linear
from hbird.eval.linear_probe.patches import PatchTable, extract_patch_table
from hbird.eval.linear_probe.protocol import linear_probe, score_linear_head
from hbird.eval.linear_probe.report import LinearProbeReport
from hbird.eval.linear_probe.settings import ProbeSettings, learning_rate
from hbird.eval.linear_probe.training import train_linear_head
from hbird.eval.report import compare_reports

__all__ = [
    "LinearHead",
    "LinearProbeReport",
    "PatchTable",
    "ProbeSettings",
    "compare_reports",
    "extract_patch_table",
    "learning_rate",
    "linear_probe",
    "predict_linear",
    "score_linear_head",
    "train_linear_head",
]
