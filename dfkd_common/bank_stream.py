"""Banks larger than memory, read in chunk-aligned slices while the student trains.

A bank that fits in memory is read whole (:func:`dfkd_common.bank.load_bank`) and batches are index draws on the
device, as always. A bank above ``stream.above_mib`` (``dfkd distill``'s ``stream`` params) is *streamed*:

* it is cut into **blocks** of whole HDF5 chunks (``block_mib`` each), so a read never decodes a chunk twice and
  every read is checked against the chunks' Fletcher-32 checksums by HDF5;
* every epoch draws one **block order** from the loop's generator, identical on every rank, and rank ``r`` reads
  blocks ``r, r + N, ...`` of it (under torchrun each rank reads only its own chunks);
* DataLoader **workers** (``workers``; 0 = the main process) open the file themselves and read blocks ahead
  (``prefetch`` each): memory holds at most ``workers x prefetch`` blocks in flight plus the shuffle buffer;
* a **shuffle buffer** of ``buffer`` blocks is concatenated, permuted and cut into batches, so a batch mixes rows
  from ``buffer`` places of the bank; the rows left over carry into the next buffer, and the stream continues
  into the next block order (the loop takes as many batches as an epoch needs).

In-memory banks given beside streamed ones (``--bank small.h5 --bank huge.h5``) and an online feed's growing
bank join the same block order as slices of their tensors, so the mix is drawn in proportion to rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dfkd_common.bank import _open, checksummed, compatible, note_unverified, read_attrs, validate
from dfkd_common.data import DatasetInfo
from dfkd_common.dist import World, current
from dfkd_common.errors import DfkdError, first_line
from dfkd_common.tasks import Task, get_task


@dataclass(frozen=True)
class StreamConfig:
    """``dfkd distill``'s ``stream`` params: when a bank is streamed and how (module docstring)."""

    mode: str = "auto"  # auto: stream banks whose images exceed above_mib; always; never
    above_mib: float = 2048.0
    block_mib: float = 16.0
    buffer: int = 8  # blocks in the shuffle buffer
    workers: int = 1  # DataLoader workers reading blocks (0: the main process reads)
    prefetch: int = 2  # blocks each worker reads ahead

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "always", "never"):
            raise DfkdError(f"stream.mode must be auto, always or never, got {self.mode!r}")
        if self.block_mib <= 0 or min(self.buffer, self.prefetch) < 1 or self.workers < 0 or self.above_mib < 0:
            raise DfkdError("stream: block_mib must be > 0, buffer and prefetch at least 1, workers and above_mib >= 0")

    def streams(self, image_bytes: int) -> bool:
        """Whether a bank whose images take ``image_bytes`` is streamed rather than read whole."""
        return self.mode == "always" or (self.mode == "auto" and image_bytes > self.above_mib * 2**20)


@dataclass(frozen=True)
class StreamedBank:
    """A bank left on disk: what it is (attributes, shape, rows) and how its rows fall into chunks."""

    path: Path
    n: int
    image_shape: tuple[int, int, int]
    chunk_rows: int
    attrs: dict[str, Any]
    checksummed: bool

    @classmethod
    def open(cls, path: str | Path) -> StreamedBank:
        path = Path(path)
        with _open(path) as h5:
            attrs = read_attrs(h5, path)
            n = validate(h5, path, get_task(attrs["task"]).target)
            images = h5["images"]
            chunk = int(images.chunks[0]) if images.chunks else 1  # contiguous (not written by dfkd): any slice
            shape = tuple(int(s) for s in images.shape[1:])
            verified = checksummed(h5)
        if not verified:
            note_unverified(path)
        return cls(path, n, shape, chunk, attrs, verified)

    def __len__(self) -> int:
        return self.n

    @property
    def task(self) -> Task:
        return get_task(self.attrs.get("task"))

    @property
    def image_bytes(self) -> int:
        return self.n * int(np.prod(self.image_shape))

    @property
    def num_classes(self) -> int | None:
        k = (self.attrs.get("dataset") or {}).get("num_classes")
        return int(k) if k is not None else None

    def check_compatible(self, info: DatasetInfo, what: str = "teacher") -> None:
        """As :meth:`dfkd_common.bank.Bank.check_compatible`; the targets are checked as they are read."""
        compatible(self.path, self.task, self.image_shape, dict(self.attrs.get("dataset") or {}), info, what)

    def blocks(self, block_bytes: int) -> list[tuple[int, int]]:
        """Row ranges of whole chunks, about ``block_bytes`` of images each (at least one chunk)."""
        row = int(np.prod(self.image_shape))
        size = max(1, block_bytes // (row * self.chunk_rows)) * self.chunk_rows
        return [(i, min(i + size, self.n)) for i in range(0, self.n, size)]


class _BlockReader(Dataset):
    """Blocks of streamed banks by index; each worker process opens the files itself, once."""

    def __init__(self, banks: list[StreamedBank], units: list[tuple[int, int, int]]) -> None:
        self.paths = [str(b.path) for b in banks]
        self.targets = [b.task.target for b in banks]
        self.units = units
        self.files: dict[int, h5py.File] = {}

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        k, start, stop = self.units[i]
        try:
            if k not in self.files:
                self.files[k] = h5py.File(self.paths[k], "r")
            h5 = self.files[k]
            images = torch.from_numpy(h5["images"][start:stop])
            labels = torch.from_numpy(h5[self.targets[k]][start:stop].astype(np.int64))
        except OSError as exc:  # a worker's error comes back as a value: the main process raises it in one line
            return ("error", f"{self.paths[k]}: rows {start}-{stop} fail their checksum or are unreadable "
                             f"(HDF5: {first_line(exc)})")
        return images, labels


def block_order(n: int, seed: int, world: World) -> list[int]:
    """This rank's share of one shuffled order of ``n`` blocks; the order is the same on every rank."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[world.rank :: world.size]


class StreamBatches:
    """The batches of an endless stream over in-memory rows and streamed banks (the module docstring)."""

    def __init__(self, memory: tuple[torch.Tensor, torch.Tensor] | None, banks: list[StreamedBank],
                 cfg: StreamConfig, device: torch.device, world: World | None = None) -> None:
        self.memory, self.banks, self.cfg, self.device = memory, banks, cfg, device
        self.world = world or current()
        block = int(cfg.block_mib * 2**20)
        # units: (-1, start, stop) for in-memory rows, (k, start, stop) for bank k's chunk-aligned blocks
        self.units: list[tuple[int, int, int]] = []
        if memory is not None and memory[0].shape[0]:
            row = int(np.prod(memory[0].shape[1:]))
            size = max(1, block // row)
            n = int(memory[0].shape[0])
            self.units += [(-1, i, min(i + size, n)) for i in range(0, n, size)]
        for k, bank in enumerate(banks):
            self.units += [(k, a, b) for a, b in bank.blocks(block)]
        if len(self.units) < self.world.size:  # a rank without blocks would wait for one forever
            raise DfkdError(f"{' + '.join(b.path.name for b in banks)}: {len(self.units)} block(s) of "
                            f"stream.block_mib {cfg.block_mib} for {self.world.size} process(es): lower block_mib, "
                            "or read the bank whole (stream.mode: never)")

    def blocks(self, seed: int, cycles: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's blocks, block order after block order (``seed + c`` for the c-th), read ahead by workers."""
        for c in itertools.count() if cycles is None else range(cycles):
            mine = [self.units[i] for i in block_order(len(self.units), seed + c, self.world)]
            streamed = [u for u in mine if u[0] >= 0]
            reader = _BlockReader(self.banks, streamed)
            workers = min(self.cfg.workers, len(streamed))
            loader = iter(DataLoader(reader, batch_size=None, shuffle=False, num_workers=workers,
                                     prefetch_factor=self.cfg.prefetch if workers else None)) if streamed else None
            for k, start, stop in mine:
                if k < 0:
                    assert self.memory is not None
                    yield self.memory[0][start:stop], self.memory[1][start:stop]
                    continue
                assert loader is not None
                item = next(loader)
                if item[0] == "error":
                    raise DfkdError(item[1])
                bank = self.banks[k]
                if bank.num_classes is not None:  # the targets fit the classes (checked as they are read)
                    bank.task.check_targets(item[1], bank.num_classes, f"bank {bank.path.name} rows {start}-{stop}")
                yield item[0].to(self.device), item[1].to(self.device)

    def batches(self, batch_size: int, seed: int, cycles: int | None = None,
                drop_last: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled batches of ``batch_size`` (the shuffle buffer above); with ``cycles`` given, the rows of that
        many block orders and, unless ``drop_last``, the last partial batch."""
        gen = torch.Generator().manual_seed(seed * 1000003 + self.world.rank)
        left: tuple[torch.Tensor, torch.Tensor] | None = None
        blocks = self.blocks(seed, cycles)
        while True:
            pool = list(itertools.islice(blocks, self.cfg.buffer))
            if not pool:
                break
            if left is not None:
                pool.insert(0, left)
            images = torch.cat([p[0] for p in pool])  # the buffer, once; batches are gathered from it
            labels = torch.cat([p[1] for p in pool])
            del pool
            perm = torch.randperm(images.shape[0], generator=gen).to(images.device)
            full = images.shape[0] - images.shape[0] % batch_size
            for i in range(0, full, batch_size):
                yield images[perm[i : i + batch_size]], labels[perm[i : i + batch_size]]
            left = (images[perm[full:]], labels[perm[full:]]) if full < images.shape[0] else None
        if left is not None and not drop_last:
            yield left
