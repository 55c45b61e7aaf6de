"""Cached availability checks for optional dependencies, with errors that name the extra."""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache
from types import ModuleType

from hbird._openblas import faiss_import_environment

_EXTRA_OF = {
    "faiss": "faiss",
    "transformers": "hf",
    "scann": "scann",
    "open_clip": "clip",
    "fastapi": "serve",
    "gradio": "serve",
    "scipy.signal": "audio",
}


@cache
def is_available(module: str) -> bool:
    """True if ``module`` can be imported (checked once per process)."""
    if importlib.util.find_spec(module) is None:
        return False
    try:
        if module == "faiss":  # its bundled OpenBLAS may need the core type named
            with faiss_import_environment():
                importlib.import_module(module)
        else:
            importlib.import_module(module)
    except Exception:  # a broken install counts as missing
        return False
    return True


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` or raise an ImportError saying which extra installs it."""
    if not is_available(module):
        extra = _EXTRA_OF.get(module)
        hint = f'pip install "hbird[{extra}]"' if extra else f"pip install {module}"
        raise ImportError(
            f"{feature} needs the optional package {module!r}; install it with: {hint}"
        )
    return importlib.import_module(module)
