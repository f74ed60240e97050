"""Several processes, one run: torch.distributed under ``torchrun`` (DDP), the engine dfkd runs on beyond one device.

``torchrun --nproc_per_node N -m stages.cli distill ...`` (or ``--nnodes M`` with a rendezvous for several
machines) starts N processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous in their
environment. :func:`init` joins that process group once (NCCL on CUDA, gloo on the CPU; each process on the GPU
of its ``LOCAL_RANK``) and returns the :class:`World`; without those variables, or with a world of one, it is a
single process and nothing distributed is touched, so a one-process run computes exactly what it always did.

What runs where is the stages' business and is written down there: rank 0 alone writes artifacts, metrics and
progress; every rank keeps its own resume state (:func:`rank_path`); training wraps the step in
:class:`torch.nn.parallel.DistributedDataParallel`, which averages gradients across ranks. When one rank dies,
torchrun stops the others; the surviving collective calls fail, and :func:`init` sets a finite timeout so that no
rank waits forever.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dfkd_common.errors import DfkdError

T = TypeVar("T")

#: how long a collective waits for a rank that stopped answering before it fails (torchrun then reports)
TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("DFKD_DIST_TIMEOUT_MIN", "10")))


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank, world size, local rank (the GPU it drives)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes artifacts, metrics and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current() -> World:
    """The world this process joined (a single process when none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init() -> World:
    """Join the process group ``torchrun`` describes in the environment, once; a single process otherwise.

    Non-main ranks get ``DFKD_NO_PROGRESS=1`` (one progress bar per run, rank 0's).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or "RANK" not in os.environ:
        return current()
    if not dist.is_available():
        raise DfkdError("WORLD_SIZE > 1, but this torch build has no torch.distributed")
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    world = current()
    if not world.main:
        os.environ["DFKD_NO_PROGRESS"] = "1"
    return world


def barrier() -> None:
    if current().distributed:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (a dataset download, a cache fill), the other ranks after it."""
    world = current()
    if world.distributed and not world.main:
        dist.barrier()
    yield
    if world.distributed and world.main:
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (one element when single)."""
    world = current()
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def rank_share(items: Iterable[T], world: World | None = None) -> Iterator[T]:
    """This rank's share of a sequence every rank draws alike: items r, r + N, r + 2N, ... (all of them when
    single). Lazy: nothing past the last item taken is drawn, so an endless stream of passes works."""
    world = world or current()
    return itertools.islice(items, world.rank, None, world.size)


def rank_path(path: str | os.PathLike[str], world: World | None = None) -> Path:
    """``path`` for rank 0 or a single process; ``<stem>.rank<r><suffix>`` beside it for the other ranks."""
    world = world or current()
    p = Path(path)
    return p if world.rank == 0 else p.with_name(f"{p.stem}.rank{world.rank}{p.suffix}")
