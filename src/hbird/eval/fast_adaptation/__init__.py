"""Fast adaptation (Balazevic et al. 2023, §4.3): quality against prompt size and wall-clock.

Retrieval adapts to a task by filling a memory, a linear probe by training. This module
measures both on one dataset:

- **retrieval**: for growing seeded subsets of the prompt split (1/64 … 1/1, one seed),
  the memory is built and the queries scored, recording the memory entries, the build
  seconds, the evaluation seconds and the metric;
- **linear probe** (``compare_linear=True``): the head is trained on the same subsets for
  ``max(linear_epochs)`` epochs, and on the whole prompt for each of ``linear_epochs``;
  its adaptation time is the feature extraction of its images plus the training.

The encoder is built once, and each method runs once, untimed, on one prompt image and
one query before anything is timed (the first encoder call, index build and head
training pay one-off costs); every point is timed in one go (no run folders, so no
half-reused timings). ``out`` receives
``fast_adaptation.json`` / ``.csv``, ``fast_adaptation.png`` (metric against adaptation
seconds, both methods), ``fast_adaptation_fraction.png`` (metric against the fraction of
the prompt, both methods) and ``summary.md``. Points already in ``fast_adaptation.json``
with the same settings are kept when a sweep is run again, so an interrupted sweep resumes.

One job per module: ``report`` (:class:`AdaptationPoint`, :class:`FastAdaptationReport`),
``points`` (measuring one point, and the warm-up), ``sweep`` (which points, the resumable
record of a sweep, and :func:`fast_adaptation`).
"""

from hbird.eval.fast_adaptation.report import AdaptationPoint, FastAdaptationReport
from hbird.eval.fast_adaptation.sweep import (
    DEFAULT_FRACTIONS,
    DEFAULT_LINEAR_EPOCHS,
    AdaptationSweep,
    fast_adaptation,
)

__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_LINEAR_EPOCHS",
    "AdaptationPoint",
    "AdaptationSweep",
    "FastAdaptationReport",
    "fast_adaptation",
]
