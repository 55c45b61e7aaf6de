"""The memory bank: L2-normalised patch keys, their labels, and a manifest.

On disk a bank is a folder::

    manifest.json            format version, encoder identity, feature dim and dtype,
                             label spec, sampling/prompt config, counts, shard checksums
    shard_00000.safetensors  {"keys": (n, D) float16|float32, "values": (n, C) float32,
                              "image_ids": (n,) int64}; sparse values (format 2) hold
                              value_classes / value_weights / value_overflow* instead
                              (hbird.memory.values)
    shard_00001.safetensors  ...

Each entry records the prompt image it came from (``image_ids``, ``-1`` when unknown:
banks saved before hbird recorded them, which still load), so the entries of one image
can be removed again (:meth:`MemoryBank.remove`).

Shards let a bank larger than memory be built and read piece by piece. A build writes
into ``<bank>.partial/`` and renames it into place only when complete; a killed build
resumes from the shards it finished (:class:`BankWriter`). Loading verifies checksums
and refuses a bank built with a different encoder.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from hbird.errors import BankError, check_format_version, spell
from hbird.io.files import (
    check_replaceable,
    remove_folder,
    replace_folder,
    save_tensors,
    write_json,
)
from hbird.labelspec import LabelSpec
from hbird.memory.rows import MIN_BLOCK_ROWS, Rows
from hbird.memory.values import PER_ENTRY, STORAGES, create_values, extend_column

FORMAT_VERSION = 2
"""Version 2 adds sparse values (``value_storage``); a dense bank is still written as 1,
so an older hbird reads it."""
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
ATTACHMENTS = "attachments.safetensors"
KEY_DTYPES = {"float16": torch.float16, "float32": torch.float32}
ENTRY_TENSORS = ("keys", "image_ids", *PER_ENTRY)
"""Shard tensors with one row per entry."""
UNKNOWN_IMAGE = -1
"""The image id of entries whose prompt image was not recorded (older banks)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_bank(folder: Path) -> bool:
    """True if ``folder`` holds a manifest that says it is an hbird memory bank."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"format_version", "encoder", "shards"} <= set(manifest)


def check_bank_path(path: str | Path, overwrite: bool = False) -> None:
    """Raise :class:`BankError` unless a bank may be written at ``path``: it is new or an
    empty folder, or (with ``overwrite``) a bank. Anything else is left untouched."""
    check_replaceable(
        path, "a memory bank", is_bank, overwrite, spell("overwrite", True), BankError
    )


def _is_staging(folder: Path) -> bool:
    """A ``<bank>.partial`` build folder: its progress file, or a finished manifest."""
    return (folder / PROGRESS).is_file() or is_bank(folder)


def normalize_keys(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(N, D)`` features → L2-normalised rows in ``dtype`` (normalised in float32)."""
    keys = keys.to(torch.float32)
    return torch.nn.functional.normalize(keys, dim=-1).to(dtype)


class MemoryBank:
    """Keys ``(N, D)`` and values ``(N, C)`` with the metadata needed to use them safely.

    Args:
        feature_dim: ``D``.
        label_spec: what the values mean (``C = label_spec.value_dim``).
        encoder: the encoder's ``identity()`` dict.
        key_dtype: ``"float16"`` (default, half the memory) or ``"float32"``.
        value_storage: ``"dense"`` (default) or ``"sparse"`` (class banks: per entry a few
            (class, weight) pairs, lossless; :mod:`hbird.memory.values`).
        config: free-form settings to record (sampling, image size, layers...).

    Attributes:
        search: default search settings for loaders (``k``, temperature...); not part of
            the bank's identity.
        attachments: named tensors stored beside the entries (e.g. the support set a
            feature transform needs), saved in ``attachments.safetensors``.
    """

    def __init__(
        self,
        feature_dim: int,
        label_spec: LabelSpec,
        encoder: dict[str, str],
        key_dtype: str = "float16",
        config: dict[str, Any] | None = None,
        value_storage: str = "dense",
    ) -> None:
        if key_dtype not in KEY_DTYPES:
            raise ValueError(f"key_dtype must be one of {sorted(KEY_DTYPES)}, not {key_dtype!r}")
        if value_storage not in STORAGES:
            raise ValueError(f"value_storage must be one of {STORAGES}, not {value_storage!r}")
        if value_storage == "sparse" and not label_spec.is_classification:
            raise BankError(
                f"sparse values store class fractions; this bank's labels are "
                f"{label_spec.task}: use value_storage=dense (--value-storage dense)"
            )
        self.feature_dim = int(feature_dim)
        self.label_spec = label_spec
        self.encoder = dict(encoder)
        self.key_dtype = key_dtype
        self.config = dict(config or {})
        self.search: dict[str, Any] = {}
        self.num_images = 0
        self.attachments: dict[str, torch.Tensor] = {}
        self._keys = Rows((self.feature_dim,), KEY_DTYPES[key_dtype])
        self._values = create_values(value_storage, label_spec.value_dim)
        self._image_ids = Rows((), torch.int64)
        self._source: tuple[Path, dict[str, Any]] | None = None  # folder + manifest it came from
        self._keys_on_disk = False

    # -- contents ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._image_ids)

    @property
    def keys(self) -> torch.Tensor:
        """``(N, D)`` L2-normalised keys in ``key_dtype``, in memory (see :meth:`read_keys`)."""
        if self._keys_on_disk:
            raise BankError(
                f"this bank's keys are still in {self._source[0]}; call read_keys() to read "
                "them into memory, or iter_keys() to stream them"
            )
        return self._keys.tensor()

    def read_keys(self) -> torch.Tensor:
        """:attr:`keys`, read from the bank's folder first if they are still on disk."""
        self._restore_keys()
        return self.keys

    @property
    def value_storage(self) -> str:
        """``"dense"`` or ``"sparse"`` (:mod:`hbird.memory.values`)."""
        return self._values.storage

    @property
    def values(self) -> torch.Tensor:
        """``(N, C)`` float32 patch labels (built here for sparse values: prefer
        :meth:`gather_values`)."""
        return self._values.dense()

    def gather_values(self, ids: torch.Tensor) -> torch.Tensor:
        """The values of entries ``ids (...)`` (valid ids) → ``(..., C)`` float32."""
        return self._values.gather(ids)

    @property
    def image_ids(self) -> torch.Tensor:
        """``(N,)`` int64: the prompt image each entry came from (``-1``: not recorded)."""
        return self._image_ids.tensor()

    @property
    def keys_in_memory(self) -> bool:
        """False after ``load(keys=False)``, until the keys are first used."""
        return not self._keys_on_disk

    def iter_keys(self) -> Iterator[torch.Tensor]:
        """The keys in order, ``(n_i, D)`` piece by piece: shard by shard from the folder
        (checksums verified) when they are not in memory, else all at once."""
        if self.keys_in_memory:
            yield self.keys
            return
        path, manifest = self._source
        for keys, _ in iter_shards(path, manifest):
            yield keys

    def key_norms(self) -> torch.Tensor:
        """``(N,)`` float32 norms of the stored keys (1 up to their storage rounding)."""
        norms = [torch.linalg.vector_norm(k, dim=-1, dtype=torch.float32) for k in self.iter_keys()]
        return torch.cat(norms) if norms else torch.empty(0)

    def _restore_keys(self) -> None:
        if not self._keys_on_disk:
            return
        path, manifest = self._source
        keys = Rows(self._keys.row_shape, self._keys.dtype)
        try:
            for shard_keys, _ in iter_shards(path, manifest):
                extend_column(keys, shard_keys, len(self))
        except BankError as err:
            raise BankError(
                f"this bank's keys are read from {path} on demand, and that folder changed "
                f"or is gone ({err}); load the bank again"
            ) from err
        self._keys, self._keys_on_disk = keys, False

    def reserve(self, entries: int) -> None:
        """Allocate room for the next ``entries`` entries at once (written in place)."""
        for column in (self._keys, self._values, self._image_ids):
            column.reserve(entries)

    def append(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        num_images: int = 0,
        image_ids: int | torch.Tensor | None = None,
        normalized: bool = False,
    ) -> None:
        """Add ``keys (n, D)`` (normalised here) and ``values (n, C)``; ``image_ids``: the
        prompt image they came from (one int, or ``(n,)`` ints; None: not recorded);
        ``normalized``: the keys are a bank's own, stored as they are (normalising float16
        rows again is not idempotent: it moves some by a rounding step)."""
        if keys.ndim != 2 or keys.shape[1] != self.feature_dim:
            raise BankError(
                f"keys of shape {tuple(keys.shape)} do not fit this bank's feature dim {self.feature_dim}"
            )
        if values.shape != (keys.shape[0], self.label_spec.value_dim):
            raise BankError(
                f"values of shape {tuple(values.shape)} do not match {keys.shape[0]} keys with "
                f"{self.label_spec.value_dim} label channels"
            )
        ids = torch.as_tensor(UNKNOWN_IMAGE if image_ids is None else image_ids, dtype=torch.int64)
        ids = ids.expand(keys.shape[0]) if ids.ndim == 0 else ids
        if ids.shape != (keys.shape[0],):
            raise BankError(f"{ids.shape[0]} image ids do not match {keys.shape[0]} keys")
        self._restore_keys()
        for chunk in keys.split(MIN_BLOCK_ROWS):  # a float32 copy of one chunk at a time
            dtype = self._keys.dtype
            self._keys.append(chunk.to(dtype) if normalized else normalize_keys(chunk, dtype))
        self._values.append(values)
        self._image_ids.append(ids)
        self.num_images += num_images

    def remove(self, image_ids: int | list[int]) -> int:
        """Drop every entry of the given prompt images; returns how many entries went.

        The rest keep their order, so the bank equals one built without those images
        whenever an image's entries do not depend on the others (no memory budget, one
        pass: the defaults); with a budget or augmentation passes the remaining entries
        are those the full build sampled. ``num_images`` drops by one per image.
        """
        wanted = torch.as_tensor(image_ids, dtype=torch.int64).reshape(-1).unique()
        ids = self.image_ids
        if bool((ids == UNKNOWN_IMAGE).any()):
            raise BankError(
                "this bank does not record which prompt image each entry came from (it was "
                "saved by an older hbird); rebuild it (hbird bank build, or fit) to remove images"
            )
        missing = wanted[~torch.isin(wanted, ids)]
        if missing.numel():
            held = ids.unique().tolist()
            raise BankError(
                f"no entry of this bank comes from image id(s) {missing.tolist()}; its entries "
                f"come from images {held[:20]}{' ...' if len(held) > 20 else ''}"
            )
        keep = ~torch.isin(ids, wanted)
        self._restore_keys()
        self._keys.replace(self.keys[keep])
        self._values.select(keep)
        self._image_ids.replace(ids[keep])
        self.num_images = max(self.num_images - wanted.numel(), 0)
        return int((~keep).sum())

    # -- identity ---------------------------------------------------------------------
    def manifest(self, shards: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        sparse = {"value_storage": self.value_storage} if self.value_storage != "dense" else {}
        return {
            "format_version": FORMAT_VERSION if sparse else 1,
            "encoder": self.encoder,
            "feature_dim": self.feature_dim,
            "key_dtype": self.key_dtype,
            **sparse,
            "label_spec": self.label_spec.to_dict(),
            "config": self.config,
            "search": self.search,
            "counts": {"entries": len(self), "images": self.num_images},
            "shards": shards or [],
        }

    def check_encoder(
        self, encoder: dict[str, str], feature_dim: int, source: str = "this bank"
    ) -> None:
        """Raise :class:`BankError` unless ``encoder``/``feature_dim`` match the bank's."""
        if feature_dim != self.feature_dim:
            raise BankError(
                f"{source} holds {self.feature_dim}-d features but the encoder in use gives "
                f"{feature_dim}-d ones; use the encoder and layers the bank was built with "
                f"({self.encoder.get('name')}) or rebuild the bank"
            )
        recorded = (self.encoder.get("mean"), self.encoder.get("std"))
        if None not in recorded and recorded != (encoder.get("mean"), encoder.get("std")):
            mean, std = (",".join(f"{x:g}" for x in v) for v in recorded)
            raise BankError(
                f"{source} was built with images normalised by mean {mean} and std {std}, but "
                f"the encoder in use normalises with mean {encoder.get('mean')} and std "
                f"{encoder.get('std')}; use normalize={mean}/{std} (--normalize), or rebuild the bank"
            )
        for field in ("name", "config_hash", "weights_hash"):
            if self.encoder.get(field) != encoder.get(field):
                raise BankError(
                    f"{source} was built with encoder {self.encoder.get('name')} "
                    f"({field} {self.encoder.get(field)}) but the encoder in use is {encoder.get('name')} "
                    f"({field} {encoder.get(field)}); load the same encoder and weights, or rebuild the bank"
                )

    # -- disk -------------------------------------------------------------------------
    def save(self, path: str | Path, shard_size: int = 1_000_000, overwrite: bool = False) -> Path:
        """Write the bank folder atomically (temporary folder, then rename)."""
        writer = BankWriter.for_bank(
            path, self, shard_size=shard_size, overwrite=overwrite, resume=False
        )
        writer.bank.attachments = dict(self.attachments)
        writer.bank.search = dict(self.search)
        keys, ids = self.read_keys(), self.image_ids
        for shard in range(0, max(len(self), 1), shard_size):  # chunks: sparse values stay sparse
            for start in range(shard, max(min(shard + shard_size, len(self)), 1), MIN_BLOCK_ROWS):
                rows = torch.arange(
                    start, min(start + MIN_BLOCK_ROWS, shard + shard_size, len(self))
                )
                writer.add(
                    keys[rows], self.gather_values(rows), image_ids=ids[rows], normalized=True
                )
        writer.num_images = self.num_images
        return writer.finalize()

    @classmethod
    def read_manifest(cls, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            partial = path.with_name(path.name + ".partial")
            hint = (
                f" (an unfinished build is in {partial}; rerun the build to resume it)"
                if partial.exists()
                else ""
            )
            raise BankError(f"{path} is not a memory bank: {MANIFEST} is missing{hint}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise BankError(
                f"{manifest_path} is not valid JSON ({err}); the bank is damaged, rebuild it"
            ) from err
        check_format_version(
            manifest.get("format_version"), FORMAT_VERSION, manifest_path, BankError
        )
        return manifest

    @classmethod
    def load(
        cls,
        path: str | Path,
        encoder: dict[str, str] | None = None,
        feature_dim: int | None = None,
        verify: bool = True,
        keys: bool = True,
        rows: tuple[int, int] | None = None,
    ) -> MemoryBank:
        """Read a bank folder; check checksums and, if given, the encoder identity.

        ``keys=False`` reads the values only and leaves the keys on disk, to be read on
        first use (checksums verified then). ``rows=(start, stop)`` reads only those
        entries (one rank's slice of a sharded bank: only the shard files that hold them
        are opened, and only those rows are kept in memory).
        """
        path = Path(path)
        manifest = cls.read_manifest(path)
        bank = cls(
            feature_dim=manifest["feature_dim"],
            label_spec=LabelSpec.from_dict(manifest["label_spec"]),
            encoder=manifest["encoder"],
            key_dtype=manifest["key_dtype"],
            config=manifest.get("config", {}),
            value_storage=manifest.get("value_storage", "dense"),
        )
        if encoder is not None:
            bank.check_encoder(
                encoder, feature_dim if feature_dim is not None else bank.feature_dim, str(path)
            )
        if rows is not None:
            keys = True  # a slice is kept whole: its keys cannot be re-read on demand
        expected = manifest["counts"]["entries"] if rows is None else rows[1] - rows[0]
        for shard, first in _read_shards(path, manifest, verify=verify, rows=rows):
            if keys:
                extend_column(bank._keys, shard["keys"], expected)
            bank._values.extend(shard, expected, first)
            ids = shard.get("image_ids")  # absent from banks of older hbirds
            n = shard["keys"].shape[0]
            ids = ids if ids is not None else torch.full((n,), UNKNOWN_IMAGE)
            extend_column(bank._image_ids, ids, expected)
        bank.num_images = manifest["counts"]["images"]
        bank.search = manifest.get("search", {})
        bank.attachments = read_attachments(path, manifest, verify=verify)
        bank._source = (path, manifest)
        bank._keys_on_disk = not keys
        if len(bank) != expected:
            raise BankError(f"{path}: shards hold {len(bank)} entries, manifest says {expected}")
        return bank


def content_id(manifest: dict[str, Any]) -> str:
    """A hash of a saved bank's keys and values (its shard checksums, in order)."""
    digest = hashlib.sha256()
    for shard in manifest["shards"]:
        digest.update(shard["sha256"].encode())
    return digest.hexdigest()


def read_attachments(
    path: Path, manifest: dict[str, Any], verify: bool = True
) -> dict[str, torch.Tensor]:
    """The bank's named extra tensors (empty if it has none), checksum-verified."""
    entry = manifest.get("attachments")
    if not entry:
        return {}
    file = Path(path) / entry["file"]
    if not file.is_file() or (verify and _sha256(file) != entry["sha256"]):
        raise BankError(f"{file} is missing or does not match its checksum; rebuild the bank")
    return load_file(str(file))


def iter_shards(
    path: str | Path,
    manifest: dict[str, Any] | None = None,
    verify: bool = True,
    rows: tuple[int, int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(keys (n, D), values (n, C))`` shard by shard, checking each checksum
    (``rows=(start, stop)``: only the entries in that range, from the shards holding them).
    Sparse values are made dense per shard."""
    manifest = manifest or MemoryBank.read_manifest(path)
    storage, value_dim = manifest.get("value_storage", "dense"), None
    if storage != "dense":
        value_dim = LabelSpec.from_dict(manifest["label_spec"]).value_dim
    for shard, first in _read_shards(path, manifest, verify, rows):
        if storage == "dense":
            yield shard["keys"], shard["values"]
            continue
        values = create_values(storage, value_dim)
        values.extend(shard, shard["keys"].shape[0], first)
        yield shard["keys"], values.dense()


def _read_shards(
    path: str | Path,
    manifest: dict[str, Any] | None = None,
    verify: bool = True,
    rows: tuple[int, int] | None = None,
) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """:func:`iter_shards`, each shard as its dict of tensors (``image_ids`` if saved) and
    the shard row its per-entry tensors start at (0 unless ``rows`` cuts the shard)."""
    path = Path(path)
    manifest = manifest or MemoryBank.read_manifest(path)
    stop = 0
    for shard in manifest["shards"]:
        start, stop = stop, stop + shard["entries"]  # this shard's entries
        if rows is not None and (stop <= rows[0] or start >= rows[1]):
            continue
        file = path / shard["file"]
        if not file.is_file():
            raise BankError(f"bank shard {file} is missing; the bank is incomplete, rebuild it")
        if verify and _sha256(file) != shard["sha256"]:
            raise BankError(
                f"bank shard {file} does not match its checksum in {path / MANIFEST}: the file was "
                "truncated or modified; rebuild the bank"
            )
        lo = 0
        try:
            if rows is None:
                tensors = load_file(str(file))
            else:  # only the rows in range are read into memory
                lo, hi = max(rows[0] - start, 0), min(rows[1], stop) - start
                with safe_open(str(file), "pt") as f:
                    tensors = {
                        n: f.get_slice(n)[lo:hi] if n in ENTRY_TENSORS else f.get_tensor(n)
                        for n in f.keys()
                    }
        except (SafetensorError, OSError) as err:
            raise BankError(
                f"bank shard {file} could not be read ({err}); rebuild the bank"
            ) from err
        yield tensors, lo


class BankWriter:
    """Streams a bank to disk in shards, resumably.

    Entries are buffered and written as ``shard_XXXXX.safetensors`` into
    ``<path>.partial/`` every ``shard_size`` entries, together with ``progress.json``
    recording which *items* (caller-chosen ids, e.g. ``"epoch:image"``) are inside
    finished shards. If a build is killed, a new writer with the same settings and
    ``resume=True`` reports those items in :attr:`done` so the caller can skip them.
    :meth:`finalize` writes the manifest and renames the folder into place.

    ``overwrite=True`` replaces only a folder that is a bank (its manifest says so); a
    file or any other non-empty folder is refused before any work, and nothing is
    deleted. The old bank stays in place until the new one is complete.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        feature_dim: int,
        label_spec: LabelSpec,
        encoder: dict[str, str],
        key_dtype: str = "float16",
        config: dict[str, Any] | None = None,
        value_storage: str = "dense",
        shard_size: int = 1_000_000,
        overwrite: bool = False,
        resume: bool = True,
    ) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        check_bank_path(self.path, overwrite)
        self.bank = MemoryBank(feature_dim, label_spec, encoder, key_dtype, config, value_storage)
        self.shard_size = int(shard_size)
        self.bank.reserve(self.shard_size + MIN_BLOCK_ROWS)  # a shard overshoots by one add
        self.staging = self.path.with_name(self.path.name + ".partial")
        self.num_images = 0
        self.shards: list[dict[str, Any]] = []
        self.done: set[str] = set()
        self._pending_items: list[str] = []
        self._pending_images = 0
        self._signature = self.bank.manifest()
        self._signature.pop("search")  # search defaults do not change the entries
        self._signature.pop("counts")
        self._signature.pop("shards")
        self._made = [p for p in self.staging.parents if not p.exists()]  # deepest first
        if self.staging.exists() and resume and self._load_progress():
            return
        remove_folder(self.staging, "an unfinished bank build", _is_staging)
        self.staging.mkdir(parents=True)
        self._save_progress()

    @classmethod
    def for_bank(cls, path: str | Path, bank: MemoryBank, **options: Any) -> BankWriter:
        """A writer of entries like ``bank``'s (its dim, labels, encoder, key dtype and
        config); ``options``: ``shard_size``, ``overwrite``, ``resume``."""
        return cls(
            path,
            feature_dim=bank.feature_dim,
            label_spec=bank.label_spec,
            encoder=bank.encoder,
            key_dtype=bank.key_dtype,
            config=bank.config,
            value_storage=bank.value_storage,
            **options,
        )

    def _load_progress(self) -> bool:
        progress_file = self.staging / PROGRESS
        if not progress_file.is_file():
            return False
        progress = json.loads(progress_file.read_text())
        if progress.get("signature") != self._signature:
            return False  # another configuration: start over
        self.shards = progress["shards"]
        self.done = set(progress["done"])
        self.num_images = progress["images"]
        return all((self.staging / s["file"]).is_file() for s in self.shards)

    def _save_progress(self) -> None:
        write_json(
            self.staging / PROGRESS,
            {
                "signature": self._signature,
                "shards": self.shards,
                "done": sorted(self.done),
                "images": self.num_images,
            },
        )

    def discard_if_empty(self) -> None:
        """After a failed or interrupted build: remove the staging folder if no shard
        reached it (there is nothing to resume), and the folders made to hold it."""
        if not self.shards:
            remove_folder(self.staging, "an unfinished bank build", _is_staging)
            for folder in self._made:
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()

    def add(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        item: str | None = None,
        images: int = 0,
        image_ids: int | torch.Tensor | None = None,
        normalized: bool = False,
    ) -> None:
        """Buffer entries; ``item`` marks a finished unit of work (recorded at the next
        flush); ``image_ids``: the prompt image(s) the entries came from; ``normalized``:
        as for :meth:`MemoryBank.append`."""
        self.bank.append(keys, values, image_ids=image_ids, normalized=normalized)
        if item is not None:
            self._pending_items.append(item)
        self._pending_images += images
        if len(self.bank) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write buffered entries as one shard and record their items as done."""
        if len(self.bank) == 0 and not self._pending_items:
            return
        if len(self.bank):
            name = f"shard_{len(self.shards):05d}.safetensors"
            tensors = {"keys": self.bank.keys, **self.bank._values.tensors()}
            file = save_tensors(self.staging / name, {**tensors, "image_ids": self.bank.image_ids})
            self.shards.append({"file": name, "entries": len(self.bank), "sha256": _sha256(file)})
            for column in (self.bank._keys, self.bank._values, self.bank._image_ids):
                column.clear()  # the next shard is written over the same block
            self.bank.reserve(self.shard_size + MIN_BLOCK_ROWS)
        self.done.update(self._pending_items)
        self.num_images += self._pending_images
        self._pending_items.clear()
        self._pending_images = 0
        self._save_progress()

    def finalize(self) -> Path:
        """Flush, write the manifest, and swap the bank into place (the old one, if any,
        is removed only once the new one is there)."""
        self.flush()
        manifest = self.bank.manifest(self.shards)
        manifest["counts"] = {
            "entries": sum(s["entries"] for s in self.shards),
            "images": self.num_images,
        }
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if self.bank.attachments:
            file = save_tensors(self.staging / ATTACHMENTS, self.bank.attachments)
            manifest["attachments"] = {"file": ATTACHMENTS, "sha256": _sha256(file)}
        write_json(self.staging / MANIFEST, manifest)
        (self.staging / PROGRESS).unlink()
        check_bank_path(self.path, self.overwrite)  # again: it may have changed meanwhile
        return replace_folder(self.staging, self.path)
