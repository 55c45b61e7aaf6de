"""hbird: in-context dense scene understanding with frozen vision encoders.

from hbird import InContextPredictor
p = InContextPredictor(encoder="vit_small_patch14_dinov2.lvd142m", pretrained=True)
p.fit(prompt_images, prompt_masks, task="segmentation", num_classes=21)
masks = p.predict(query_images)

``import hbird`` is light: the names below are imported on first use (PEP 562), so a
user of one room (or ``hbird --help``) does not pay for torch, timm or the evaluation
harness.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "InContextPredictor": "hbird.predictor",
    "LabelSpec": "hbird.labelspec",
    "Report": "hbird.eval",
    "evaluate": "hbird.eval",
}

__all__ = ["InContextPredictor", "LabelSpec", "Report", "__version__", "evaluate"]

if TYPE_CHECKING:
    from hbird.eval import Report, evaluate
    from hbird.labelspec import LabelSpec
    from hbird.predictor import InContextPredictor


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hbird' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
