"""Published weights from the Hugging Face hub: fail in seconds when offline, saying what to do.

Without a network, a hub download spends close to a minute in retries and ends in an
error about the hub. :func:`published_weights` wraps a download instead: when
``HF_HUB_OFFLINE`` is set, or the hub does not answer one quick request, only the local
cache is tried, and a miss raises :class:`WeightsUnavailableError` naming the ways out
(a local ``--weights`` file, ``--no-pretrained``, the tiny offline ``test_vit``).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from hbird.errors import HbirdError

PROBE_SECONDS = 3.0
"""How long the one request that decides "offline" may take."""


class WeightsUnavailableError(HbirdError):
    """An encoder's published weights are neither in the local cache nor downloadable."""


def _env_offline() -> bool:
    return any(
        os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """False when offline mode is set or the hub's endpoint does not answer in ``timeout`` s."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _env_offline():
        return False
    request = urllib.request.Request(constants.ENDPOINT, method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:  # an HTTP error status: the hub answered
        return True
    except OSError:  # no route, refused, timed out, no DNS
        return False
    return True


TIMM_WAYS_OUT = (
    "give a local checkpoint with --weights FILE (Python: weights=); use random weights with "
    "--no-pretrained (pretrained=False); or try hbird offline with the tiny --encoder test_vit"
)
"""The ways out for a timm model's published weights."""

HF_WAYS_OUT = (
    "save the model once where there is network (save_pretrained) and give its folder, "
    "--encoder hf:/path/to/folder; --no-pretrained (pretrained=False) builds random weights "
    "but still needs the model's config.json, cached or in such a folder; --weights FILE "
    "(weights=) loads a local checkpoint into a timm encoder (hf: encoders read theirs from "
    "the folder); or try hbird offline with the tiny --encoder test_vit"
)
"""The ways out for a Hugging Face (``hf:``) model's files (config and weights)."""


def offline_help(name: str, ways_out: str = TIMM_WAYS_OUT) -> str:
    from huggingface_hub import constants

    return (
        f"the published weights of {name} are not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and cannot be downloaded: the hub is offline "
        f"(HF_HUB_OFFLINE is set or the network does not answer). Ways out: {ways_out}. "
        "With network access, run the command once to download the weights"
    )


@contextmanager
def published_weights(name: str, ways_out: str = TIMM_WAYS_OUT) -> Iterator[None]:
    """Around the download of ``name``'s published weights (``timm.create_model(...,
    pretrained=True)``, ``from_pretrained``): offline, only the cache is read, and a miss
    raises :class:`WeightsUnavailableError` within seconds, naming ``ways_out``."""
    from huggingface_hub import constants

    offline, saved = not hub_reachable(), constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or offline  # the hub's own switch: cache only, no retries
    try:
        yield
    except OSError as err:  # the hub's cache misses and connection errors are OSErrors
        if not offline:
            raise
        raise WeightsUnavailableError(offline_help(name, ways_out)) from err
    finally:
        constants.HF_HUB_OFFLINE = saved
