"""Checks every predictor must pass, in the spirit of scikit-learn's ``check_estimator``.

    from hbird.testing import check_predictor
    check_predictor(lambda: InContextPredictor(encoder="test_vit", ...), prompt, other, queries)

Each check raises ``AssertionError`` saying what broke the contract.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

Prompt = tuple[Sequence[Any], Sequence[Any], dict[str, Any]]
"""``(images, labels, fit keyword arguments)``."""


def check_params_stored(predictor: Any) -> None:
    """Every constructor argument is an attribute of its own name, stored as given."""
    names = [n for n in inspect.signature(type(predictor).__init__).parameters if n != "self"]
    params = predictor.get_params()
    assert sorted(params) == sorted(names), f"get_params() gives {sorted(params)}, not {names}"
    clone = type(predictor)(**params)
    for name in names:
        assert getattr(predictor, name) is params[name], f"get_params()[{name!r}] is a copy"
        assert getattr(clone, name) is params[name], f"argument {name!r} is not stored as given"


def check_fit(make: Callable[[], Any], prompt: Prompt) -> Any:
    """``fit`` returns ``self``, leaves the arguments alone, and names its state ``*_``."""
    predictor = make()
    before = predictor.get_params()
    attributes = set(vars(predictor))
    images, labels, kwargs = prompt
    assert predictor.fit(images, labels, **kwargs) is predictor, "fit must return self"
    after = predictor.get_params()
    changed = [n for n in before if after[n] is not before[n]]
    assert not changed, f"fit changed the constructor arguments {changed}"
    unnamed = sorted(a for a in set(vars(predictor)) - attributes if not a.endswith("_"))
    assert not unnamed, f"fit set attributes without a trailing underscore: {unnamed}"
    return predictor


def check_refit(make: Callable[[], Any], prompt: Prompt, other: Prompt, queries: Sequence) -> None:
    """A refit on ``other`` predicts exactly as a fresh fit on ``other``: no stale state."""
    refit = check_fit(make, prompt)
    refit.predict_dense(queries)  # fill any cache the first prompt leaves behind
    images, labels, kwargs = other
    refit.fit(images, labels, **kwargs)
    fresh = make().fit(images, labels, **kwargs)
    for i, (a, b) in enumerate(zip(refit.predict_dense(queries), fresh.predict_dense(queries))):
        same = torch.equal(a.patch_labels, b.patch_labels) and torch.equal(
            a.confidence, b.confidence
        )
        assert same, f"query {i}: a refit predicts otherwise than a fresh fit (stale state)"


def check_predictor(
    make: Callable[[], Any], prompt: Prompt, other: Prompt, queries: Sequence
) -> None:
    """Run every check; ``make()`` builds a new, unfitted predictor each time it is called."""
    check_params_stored(make())
    check_refit(make, prompt, other, queries)
