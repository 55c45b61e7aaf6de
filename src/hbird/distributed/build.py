"""A bank build spread over the ranks of a process group, equal to a one-process build.

The work is the canonical item sequence ``(epoch, image)`` (epoch-major, as one process
encodes it), cut into fixed blocks of :data:`BLOCK_ITEMS` items. Blocks still to do go
round-robin to the ranks; seeds are per (seed, epoch, image) as in one process, so which
rank encodes a block never changes its entries. Each rank writes one *part* per block
into the build's temporary folder (``<bank>.partial/parts/part_<block>.safetensors``:
the sampled features as the extractor gave them, their labels, and the entry count of
every item). Once every part is there, rank 0 streams the parts in canonical order,
item by item, through the same :class:`~hbird.memory.bank.BankWriter` a one-process
build uses, so shard boundaries, shard bytes, checksums and the manifest are those of a
one-process build, byte for byte; it then removes the parts and renames the bank into
place.

Resuming: blocks whose part exists, and items inside shards a one-process build
finished, are skipped, whatever the world size now or before (a world of one resumes a
distributed build the same way). Parts hold float32 features until the end of the build,
about twice the float16 bank on disk meanwhile (``docs/scale.md``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from hbird import distributed
from hbird.io.files import save_tensors
from hbird.memory.bank import BankWriter, MemoryBank

if TYPE_CHECKING:
    from hbird.data.pairs import Pairs
    from hbird.predictor import InContextPredictor

BLOCK_ITEMS = 32
"""Items ``(epoch, image)`` per part: the unit of work a rank takes and a resume skips."""

PARTS = "parts"
POLL_SECONDS = 0.2


def staging_of(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".partial")


def has_parts(path: str | Path) -> bool:
    """True if an unfinished distributed build of the bank ``path`` left parts to resume."""
    return (staging_of(path) / PARTS).is_dir()


def _part_file(parts: Path, block: int) -> Path:
    return parts / f"part_{block:07d}.safetensors"


def _blocks(num_epochs: int, num_images: int, done: set[str]) -> dict[int, list[tuple[int, int]]]:
    """``{block: items not yet in a finished shard}`` for blocks with something to do."""
    canonical = [(e, i) for e in range(num_epochs) for i in range(num_images)]
    blocks: dict[int, list[tuple[int, int]]] = {}
    for start in range(0, len(canonical), BLOCK_ITEMS):
        todo = [(e, i) for e, i in canonical[start : start + BLOCK_ITEMS] if f"{e}:{i}" not in done]
        if todo:
            blocks[start // BLOCK_ITEMS] = todo
    return blocks


def build_across_ranks(
    predictor: InContextPredictor,
    pairs: Pairs,
    bank: MemoryBank,
    path: str | Path,
    shard_size: int,
    overwrite: bool,
) -> Path:
    """Build the bank ``path`` with every rank of the process group (or this one alone,
    resuming a distributed build); the predictor is prepared and ``bank`` is the empty
    bank its settings make. Returns the bank folder on every rank."""
    writer, setup = None, None
    if distributed.is_main():
        try:
            writer = BankWriter.for_bank(path, bank, shard_size=shard_size, overwrite=overwrite)
            (writer.staging / PARTS).mkdir(exist_ok=True)
            blocks = _blocks(predictor.spec_.aug_epochs, len(pairs), writer.done)
            parts = writer.staging / PARTS
            pending = [b for b in blocks if not _part_file(parts, b).is_file()]
            setup = {"blocks": blocks, "pending": pending, "parts": str(parts)}
        except Exception as err:  # every rank stops with rank 0's error
            setup = err
    setup = distributed.broadcast_object(setup)
    if isinstance(setup, Exception):
        raise setup
    parts, blocks = Path(setup["parts"]), setup["blocks"]
    me, world = distributed.rank(), distributed.world_size()
    mine = [b for j, b in enumerate(setup["pending"]) if j % world == me]
    bar = _GlobalBar(parts, blocks, predictor.progress and distributed.is_main())
    for block, entries in _encode_blocks(predictor, pairs, bank, blocks, mine, bar):
        _write_part(_part_file(parts, block), entries)
    bar.wait_for_all()
    distributed.barrier()  # every rank has seen every part before rank 0 removes them
    result: Path | Exception | None = None
    if writer is not None:
        try:
            result = _assemble(writer, bank, parts, blocks)
        except Exception as err:
            result = err
    result = distributed.broadcast_object(result)
    if isinstance(result, Exception):
        raise result
    return result


def _encode_blocks(
    predictor: InContextPredictor,
    pairs: Pairs,
    bank: MemoryBank,
    blocks: dict[int, list[tuple[int, int]]],
    mine: list[int],
    bar: _GlobalBar,
) -> Iterator[tuple[int, list[tuple[str, torch.Tensor, torch.Tensor]]]]:
    """``(block, [(item, features (n, D), values (n, C))...])`` for this rank's blocks."""
    items = [item for b in mine for item in blocks[b]]
    entries = predictor._memory_entries(pairs, bank, 0, items=items, progress=False)
    for block in mine:
        done = []
        for _ in blocks[block]:
            done.append(next(entries))
            bar.own(len(done))
        yield block, done


def _write_part(file: Path, entries: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    """One block's entries, features as the extractor gave them (normalised at assembly)."""
    items = [item for item, _, _ in entries]
    save_tensors(
        file,
        {
            "keys": torch.cat([k for _, k, _ in entries]),
            "values": torch.cat([v for _, _, v in entries]),
            "counts": torch.tensor([k.shape[0] for _, k, _ in entries], dtype=torch.int64),
        },
        metadata={"items": json.dumps(items)},
    )


def _read_part(file: Path) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        items = json.loads(f.metadata()["items"])
    tensors = load_file(str(file))
    keys, values = tensors["keys"], tensors["values"]
    start = 0
    for item, count in zip(items, tensors["counts"].tolist()):
        yield item, keys[start : start + count], values[start : start + count]
        start += count


def _assemble(
    writer: BankWriter, bank: MemoryBank, parts: Path, blocks: dict[int, list[tuple[int, int]]]
) -> Path:
    """Rank 0: every part in canonical order through the writer, then the manifest."""
    for block in sorted(blocks):
        for item, keys, values in _read_part(_part_file(parts, block)):
            if item not in writer.done:
                images, image = int(item.startswith("0:")), int(item.rsplit(":", 1)[1])
                writer.add(keys, values, item=item, images=images, image_ids=image)
    writer.flush()  # from here the shards hold every item: the parts are not needed
    shutil.rmtree(parts)
    writer.bank.search, writer.bank.attachments = bank.search, bank.attachments
    return writer.finalize()


class _GlobalBar:
    """Rank 0's progress bar over every rank's items: its own, plus the parts on disk."""

    def __init__(self, parts: Path, blocks: dict[int, list[Any]], show: bool) -> None:
        self.parts, self.sizes = parts, {b: len(items) for b, items in blocks.items()}
        self.names = {_part_file(parts, b).name: n for b, n in self.sizes.items()}
        total = sum(self.sizes.values())
        self.bar = tqdm(total=total, desc="building memory", unit="img", disable=not show)
        self.show, self.last = show, 0.0
        self.refresh(0, force=True)

    def finished(self) -> int:
        return sum(self.names.get(p.name, 0) for p in self.parts.glob("part_*.safetensors"))

    def refresh(self, in_progress: int, force: bool = False) -> None:
        if self.show and (force or time.monotonic() - self.last > 0.5):
            self.bar.n = min(self.finished() + in_progress, self.bar.total)
            self.bar.refresh()
            self.last = time.monotonic()

    def own(self, items_in_block: int) -> None:
        self.refresh(items_in_block)

    def wait_for_all(self) -> None:
        """Return once every block's part is on disk (the other ranks' too)."""
        wanted = {_part_file(self.parts, b) for b in self.sizes}
        while not all(f.is_file() for f in wanted):
            self.refresh(0)
            time.sleep(POLL_SECONDS)
        self.refresh(0, force=True)
        self.bar.close()
