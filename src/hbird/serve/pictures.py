"""The pictures the page sends, as files named by their content and never rewritten.

Gradio serves an output picture by path (``/gradio_api/file=...``) with a
``Content-Length`` taken from ``stat`` before it reads the file. A picture handed to it
as an array is encoded into its cache as ``<hash of the bytes>/image.png`` and that file
is rewritten in place every time the same picture is sent again (every page load sends
the editor's image). A browser reading the file meanwhile gets fewer (or more) bytes than
declared: h11's "Too little data for declared Content-Length", a broken picture.

So the page hands Gradio files only: each picture is encoded here once, written
atomically (:func:`hbird.io.files.write_bytes`) under the SHA-256 of its bytes, and never
written again; Gradio copies a file into its cache once, atomically, and serves the copy.
A file is deleted only when no page state holds it (``sweep``'s ``keep``) and nobody was
handed it for ``grace_s`` seconds (Gradio copies it right after the handler returns).
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from hbird.io.files import write_bytes

THUMBNAIL_SIZE = 320
"""Gallery pictures larger than this (long side, px) are sent shrunk: the gallery shows
them at about 180 px, and a 4000 x 3000 photo's overlay would be tens of MB as a PNG."""
THUMBNAIL_QUALITY = 90
GRACE_S = 120.0
FILE_NAME = re.compile(r"[0-9a-f]{64}\.(?:png|jpg)")
"""The name of every file :class:`PictureFiles` writes."""
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg"}


def png(picture: np.ndarray) -> bytes:
    """``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8 → lossless PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(picture, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def thumbnail(picture: np.ndarray) -> tuple[bytes, str]:
    """A gallery picture's bytes and suffix: a PNG (lossless) when it fits
    :data:`THUMBNAIL_SIZE`, else shrunk to it on the long side by area averaging (``BOX``)
    in a JPEG without chroma subsampling (class colours keep their edges)."""
    image = Image.fromarray(np.asarray(picture, dtype=np.uint8))
    if max(image.size) <= THUMBNAIL_SIZE:
        return png(picture), ".png"
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BOX)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY, subsampling=0)
    return buffer.getvalue(), ".jpg"


class PictureFiles:
    """A temporary folder of content-named picture files (removed with this object).

    Args:
        grace_s: how long a file no page state keeps survives after it was last handed out.
        clock: seconds (monotonic), replaceable in tests.
    """

    def __init__(self, grace_s: float = GRACE_S, clock: Callable[[], float] = time.monotonic):
        self.grace_s = grace_s
        self.clock = clock
        self.lock = threading.Lock()
        self._handed: dict[Path, float] = {}  # file -> when it was last handed out
        self.folder = Path(tempfile.mkdtemp(prefix="hbird-serve-pictures-"))
        weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)

    def add(self, data: bytes, suffix: str) -> Path:
        """The file holding ``data``: ``<sha256 of data><suffix>``, written once."""
        path = self.folder / (hashlib.sha256(data).hexdigest() + suffix)
        with self.lock:
            if not path.is_file():
                write_bytes(path, data)
            self._handed[path] = self.clock()
        return path

    def hand(self, path: Path) -> None:
        """Note that ``path`` (from :meth:`add`) is handed out again now."""
        with self.lock:
            self._handed[path] = self.clock()

    def held(self, name: str) -> Path | None:
        """The file this object wrote and still holds under the bare file ``name`` (the
        ``<sha256><suffix>`` of :meth:`add`), or ``None``: a client's name is never a path."""
        if not FILE_NAME.fullmatch(name):
            return None
        path = self.folder / name
        with self.lock:
            return path if path in self._handed else None

    def picture(self, picture: np.ndarray | None) -> str | None:
        """A picture (or ``None``) as a lossless PNG file, the way Gradio takes it."""
        return None if picture is None else str(self.add(png(picture), ".png"))

    def sweep(self, keep: Iterable[Path]) -> list[Path]:
        """Delete the files not in ``keep`` that nobody was handed for ``grace_s``;
        returns them."""
        keep = set(keep)
        with self.lock:
            now = self.clock()
            old = [p for p, t in self._handed.items() if p not in keep and now - t > self.grace_s]
            for path in old:
                path.unlink(missing_ok=True)
                del self._handed[path]
        return old
