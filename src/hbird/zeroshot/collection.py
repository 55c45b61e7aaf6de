"""An unlabelled image collection indexed by CLIP image embeddings (issue 11, step 2).

``e_n`` is the L2-normalised CLIP image embedding of every image, after CLIP's own
preprocessing (bicubic short-side resize, centre crop, CLIP mean/std). On disk a
collection is a memory bank folder (:mod:`hbird.memory.bank`: safetensors shards,
checksums, an atomic and resumable build) whose keys are the embeddings ``(N, E)``,
whose values are the row's file index ``(N, 1)`` and whose encoder identity is the
CLIP's, plus ``files.json``: the image paths relative to the root, with checksums::

    manifest.json            the bank manifest; config: kind, root, preprocessing,
                             number of files and the checksum of files.json
    files.json               [{"path": "a/b.jpg", "sha256": ...}, ...]
    shard_00000.safetensors  {"keys": (n, E) float32, "values": (n, 1) file index}

It is searched by inner product through :mod:`hbird.index` (exact for small
collections, faiss IVF-PQ above ``AUTO_EXACT_MAX``; a built faiss index is cached in
the folder). A collection built with another CLIP is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hbird.errors import BankError, InputError
from hbird.io.files import write_json
from hbird.labelspec import LabelSpec
from hbird.memory.bank import BankWriter, MemoryBank, _sha256, content_id

KIND = "image_collection"
FILES = "files.json"
SHARD_SIZE = 10_000
INDEX_CACHE = "index_cache"
IDENTITY_FIELDS = ("name", "config_hash", "weights_hash")


class CollectionError(InputError):
    """A collection is empty, unreadable, or was built with another CLIP."""


def _listing(images: str | Path | Sequence[str | Path]) -> tuple[Path, list[str]]:
    """``(root, relative paths)`` of a folder (any depth, sorted) or a list of files."""
    from hbird.data.imagesets import _walk_images

    if isinstance(images, (str, Path)):
        root = Path(images).resolve()
        if not root.is_dir():
            raise CollectionError(f"{images} is not a folder of images (--images)")
        files = _walk_images(root)
    else:
        files = [Path(f).resolve() for f in images]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise CollectionError(f"image {missing[0]} does not exist")
        root = Path(os.path.commonpath([f.parent for f in files])) if files else Path(".")
    if not files:
        raise CollectionError(
            f"the collection is empty: no image files ({', '.join(('.jpg', '.png', '...'))}) "
            f"under {images}; point --images at a folder of unlabelled images"
        )
    return root, [f.relative_to(root).as_posix() for f in files]


def check_clip(recorded: dict[str, Any], current: dict[str, Any], source: str) -> None:
    """Raise :class:`CollectionError` unless two CLIP identities are the same model."""
    for field in IDENTITY_FIELDS:
        if recorded.get(field) != current.get(field):
            raise CollectionError(
                f"{source} was built with CLIP {recorded.get('name')} ({field} "
                f"{recorded.get(field)}) but the CLIP in use is {current.get('name')} ({field} "
                f"{current.get(field)}); use the same CLIP and weights (--clip, --clip-weights), "
                "or rebuild the collection with `hbird zeroshot index`"
            )


class ImageCollection:
    """CLIP image embeddings ``(N, E)`` of ``N`` unlabelled images, searchable by text."""

    def __init__(self, bank: MemoryBank, root: Path, files: list[str], path: Path) -> None:
        self.bank, self.root, self.files, self.path = bank, Path(root), list(files), Path(path)
        order = bank.values[:, 0].round().long()
        self.embeddings = torch.empty(len(order), bank.feature_dim)
        self.embeddings[order] = bank.keys.float()
        self._index = None

    # -- building --------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        images: str | Path | Sequence[str | Path],
        clip: Any,
        out: str | Path,
        clip_weights: str | Path | None = None,
        batch_size: int = 32,
        device: str = "cpu",
        shard_size: int = SHARD_SIZE,
        overwrite: bool = False,
        progress: bool = True,
        load: Callable[[Path], torch.Tensor] | None = None,
    ) -> ImageCollection:
        """Embed every image under ``images`` with ``clip`` (a name or a ``ClipModel``)
        into the folder ``out``. An interrupted build resumes from its finished shards.

        Args:
            load: reads one file as ``(3, H, W)`` in [0, 1] (default ``io.images.load_image``).
        """
        from hbird.io.images import load_image
        from hbird.zeroshot.clip import create_clip

        load = load or load_image
        model = create_clip(clip, clip_weights, device=device) if isinstance(clip, str) else clip
        root, files = _listing(images)
        listing = [{"path": f, "sha256": _sha256(root / f)} for f in files]
        listing_hash = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
        config = {
            "kind": KIND,
            "root": str(root),
            "num_files": len(files),
            "files_sha256": listing_hash,
            "preprocess": {
                "resize": "bicubic short side",
                "crop": "centre",
                "image_size": model.image_size,
                "mean": list(model.mean),
                "std": list(model.std),
            },
        }
        writer = BankWriter(
            out,
            feature_dim=model.embed_dim,
            label_spec=LabelSpec(task="regression", channels=1),
            encoder=model.identity(),
            key_dtype="float32",
            config=config,
            shard_size=shard_size,
            overwrite=overwrite,
        )
        write_json(writer.staging / FILES, listing)
        starts = [s for s in range(0, len(files), batch_size) if str(s) not in writer.done]
        done = len(files) - sum(min(batch_size, len(files) - s) for s in starts)
        bar = tqdm(
            total=len(files), initial=done, desc="CLIP index", unit="img", disable=not progress
        )
        try:
            dev = model.device
            for start in starts:
                names = files[start : start + batch_size]
                batch = torch.stack([model.preprocess(load(root / f)) for f in names]).to(dev)
                keys = model.encode_image(batch).cpu()
                rows = torch.arange(start, start + len(names), dtype=torch.float32)[:, None]
                writer.add(keys, rows, item=str(start), images=len(names))
                bar.update(len(names))
        except BaseException:
            writer.discard_if_empty()
            raise
        finally:
            bar.close()
        return cls.load(writer.finalize(), clip=model)

    # -- reading ---------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, clip: Any = None) -> ImageCollection:
        """Open a collection folder; with ``clip`` (a ``ClipModel``), refuse another CLIP."""
        path = Path(path)
        try:
            bank = MemoryBank.load(path)
        except BankError as err:
            raise CollectionError(f"{path} is not a usable image collection: {err}") from None
        config = bank.config
        if config.get("kind") != KIND:
            raise CollectionError(
                f"{path} is a memory bank, not an image collection; build one with "
                "`hbird zeroshot index --images DIR --clip NAME --out COLL`"
            )
        files_file = path / FILES
        if not files_file.is_file():
            raise CollectionError(f"{files_file} is missing; rebuild the collection")
        listing = json.loads(files_file.read_text())
        digest = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
        if digest != config["files_sha256"] or len(listing) != len(bank):
            raise CollectionError(f"{files_file} does not match {path}'s manifest; rebuild it")
        if clip is not None:
            check_clip(bank.encoder, clip.identity(), f"collection {path}")
        return cls(bank, Path(config["root"]), [e["path"] for e in listing], path)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def clip_identity(self) -> dict[str, Any]:
        return dict(self.bank.encoder)

    def identity(self) -> dict[str, Any]:
        """What saved references record: the folder, a hash of its contents, its CLIP."""
        manifest = MemoryBank.read_manifest(self.path)
        return {
            "path": str(self.path.resolve()),
            "content_id": content_id(manifest),
            "num_images": len(self),
            "clip": self.clip_identity,
        }

    def check_clip(self, clip: Any) -> None:
        check_clip(self.bank.encoder, clip.identity(), f"collection {self.path}")

    def image_path(self, i: int) -> Path:
        return self.root / self.files[i]

    def load_image(self, i: int) -> torch.Tensor:
        """Image ``i`` as ``(3, H, W)`` in [0, 1]."""
        from hbird.io.images import load_image

        file = self.image_path(i)
        if not file.is_file():
            raise CollectionError(
                f"image {file} of collection {self.path} is missing; the collection's images "
                f"must stay under {self.root}"
            )
        return load_image(file)

    # -- search ----------------------------------------------------------------------
    def index(self):
        """The :mod:`hbird.index` index over the embeddings (built once, faiss ones cached)."""
        if self._index is None:
            from hbird.index import create_index
            from hbird.index.cache import load_or_build

            empty = create_index("auto", self.bank.feature_dim, expected_size=len(self))
            source = content_id(MemoryBank.read_manifest(self.path))
            fill = lambda index: index.fill(self.embeddings)  # noqa: E731
            self._index = load_or_build(empty, fill, len(self), self.path / INDEX_CACHE, source)
        return self._index

    def retrieve(self, text: torch.Tensor, k: int, what: str = "the query") -> torch.Tensor:
        """Step 3: the top ``k`` images by ``e_n · t`` for ``text (E,)`` → ids ``(k,)``."""
        if k > len(self):
            raise CollectionError(
                f"{what} needs an archive of k={k} images but collection {self.path} holds only "
                f"{len(self)}; lower k (--k) or index more images"
            )
        _, ids = self.index().search(text.reshape(1, -1).float(), k)
        ids = ids[0]
        if (ids < 0).any():
            raise CollectionError(
                f"the index of collection {self.path} found fewer than k={k} images for {what}; "
                "lower k (--k)"
            )
        return ids
