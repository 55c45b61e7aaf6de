"""What a metric must offer to be scored by :func:`hbird.eval.scoring.score_queries`."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class StreamingMetric(Protocol):
    """A metric accumulated one image at a time, whose state can be saved and restored.

    ``update`` adds one image; ``state_dict`` returns everything accumulated so far as
    plain values or tensors (tensors are stored as nested lists, so float64 and int64
    survive exactly); ``load_state_dict`` restores it into a fresh metric built with the
    same arguments, raising ``ValueError`` if they differ. :class:`ConfusionMatrix` and
    :class:`DepthMetrics` are two; a panoptic-quality metric is a third with the same
    three methods. How the result reads (``compute()``) is up to each metric.
    """

    def update(self, prediction: Any, target: Any) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
