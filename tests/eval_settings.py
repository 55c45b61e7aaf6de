"""Settings shared by the protocol tests: a cheap retrieval protocol on test_vit."""

FAST_PROTOCOL = dict(
    layers=0,
    image_size=64,
    k=10,
    temperature=0.05,
    memory_size=None,
    aug_epochs=1,
    index="exact",
    batch_size=4,
)
"""Retrieval settings small enough for a 2-core CPU (exact search, no augmentation)."""

PREDICTOR_FIELDS = (
    "layers",
    "image_size",
    "k",
    "temperature",
    "memory_size",
    "aug_epochs",
    "index",
)
"""The fields of ``FAST_PROTOCOL`` an :class:`~hbird.InContextPredictor` takes as they are."""
