"""The one job driver of every stage that turns rounds or batches of work into an artifact.

Offline synthesis, retrieval, the pool builder, online distillation's recorded bank and augmentation all do the
same thing: make some rows, make more rows, ..., publish a bank; and must survive being killed at any point,
a full disk and a second run started by mistake. :class:`Job` does it once:

* **Lock** (:class:`OutputLock`): an exclusive ``fcntl.flock`` on ``.<out>.lock`` beside the output, held for
  the whole run. A second run on the same output is refused in one line while the first is alive; the OS
  releases the lock when a process dies, so a run killed with ``kill -9`` never blocks its own resume.
* **Work directory** ``.<out>.work/``: every batch of rows is a *shard* (a safetensors file written to a temporary
  name and renamed, with a SHA-256 per column), appended to a named table (``bank``, retrieval's ``scores``).
* **Checkpoint** (:meth:`Job.checkpoint`): the stage's resumable state (synthesizer, optimiser, RNG, counters)
  and the list of shards it accounts for, written atomically as ``state.safetensors``. Shards written after the
  last checkpoint are uncommitted: a resume deletes them and redoes that work exactly once.
* **Publish** (:meth:`Job.publish_bank`): the shards are written one after another into an HDF5 file under a
  temporary name, then renamed into place (:meth:`~dfkd_common.bank.BankHeader.write`). A full disk is an
  ordinary ``OSError`` (one error line, the work directory kept): HDF5 writes through a file object that keeps
  the error instead of failing HDF5 (after which h5py crashed the interpreter at exit, a segmentation fault).
* **Resume**: a rerun with the same key (the params, inputs' checksums) finds the state, restores it and
  continues; a different key means the work belongs to another configuration and is discarded; a state file that
  fails its checksum is an error that leaves the directory alone (never deleted because it could not be read).

Disk use is the shards plus, at publish, the bank; memory at publish is one shard (and HDF5's chunk cache), not the
bank: a bank larger than memory is written like a small one. A stale partial bank a killed publish left beside
the output is removed by the next run once it holds the lock. The lock, the work directory and the state files are
described with every other artifact in ``docs/ARTIFACTS.md``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfkd_common.bank import BankHeader
from dfkd_common.checkpoint import load_tree, load_tree_scalars, save_tree
from dfkd_common.dist import barrier, current, gather_objects
from dfkd_common.engine import make_parent, rng_state, set_rng_state
from dfkd_common.errors import DfkdError
from dfkd_common.params import params_hash

STATE = "state.safetensors"


def work_dir(out: str | os.PathLike[str]) -> Path:
    """Where a job writing ``out`` keeps its shards and state until it publishes (``.<name>.work``)."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


class OutputLock:
    """An exclusive, non-blocking lock on an output path (``.<name>.lock`` beside it), released on process death."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out)
        self.path = self.out.parent / f".{self.out.name}.lock"
        self.fd: int | None = None

    def acquire(self) -> OutputLock:
        make_parent(self.out)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise DfkdError(f"another run is writing {self.out} (pid {holder}); wait for it to finish or stop "
                                "it, then rerun to resume") from None
            # a run that just finished may have removed the lock file between our open and flock: retry on the
            # file that is there now, so two runs can never hold locks on two different inodes
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class Job:
    """A resumable, locked, atomically published job writing ``out`` (see the module docstring).

    Use as a context manager::

        with Job(out, key) as job:
            if job.state: ...restore from job.state, job.restore_rng()...
            for ...:
                job.write("bank", images=..., labels=..., round=...)
                job.checkpoint({...})
            job.publish_bank(header, attrs)

    Leaving the block with an exception keeps the work directory for a resume and releases the lock.
    """

    def __init__(self, out: str | os.PathLike[str], key: dict[str, Any]) -> None:
        self.out = Path(out)
        self.work = work_dir(self.out)
        self.key = params_hash(key)
        self.lock = OutputLock(self.out)
        self.state: dict[str, Any] | None = None  # the stage's state at the last checkpoint (None: fresh run)
        self._rng: dict[str, Any] | None = None
        self.tables: dict[str, list[list[Any]]] = {}  # table -> [[shard file, rows], ...] committed
        self.pending: dict[str, list[list[Any]]] = {}  # written since the last checkpoint
        self.done = False

    # -- lifecycle ------------------------------------------------------------------------------------
    def __enter__(self) -> Job:
        self.lock.acquire()
        try:
            self._open()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            # published, or failed before its first checkpoint (bad params, say): nothing left to resume
            if (exc_type is None and self.done) or (exc_type is not None and self.state is None):
                shutil.rmtree(self.work, ignore_errors=True)
        finally:
            self.lock.release()

    def _open(self) -> None:
        if self.work.exists() and not self.work.is_dir():
            raise DfkdError(f"{self.work} was left by an older dfkd (a single work file); delete it to start over")
        try:
            self.work.mkdir(exist_ok=True)
        except OSError as exc:
            raise DfkdError(f"cannot write {self.work}: {exc.strerror or exc}") from None
        for stale in self.out.parent.glob(f".{self.out.name}.*.partial"):  # a publish killed mid-write
            stale.unlink(missing_ok=True)
        saved = None
        if (self.work / STATE).exists():
            try:
                saved = load_tree(self.work / STATE)
            except DfkdError as exc:
                raise DfkdError(f"{exc}; the work directory {self.work} is left as it is: delete it to start "
                                "over") from None
        if saved is not None and saved.get("key") == self.key:
            self.state = saved["user"]
            self._rng = saved["rng"]
            self.tables = {t: [list(s) for s in shards] for t, shards in saved["tables"].items()}
        committed = {s[0] for shards in self.tables.values() for s in shards}
        for f in self.work.iterdir():  # another configuration's work, or shards written after the checkpoint
            if f.name not in committed and (f.name != STATE or saved is None or saved.get("key") != self.key):
                f.unlink()

    # -- rows -----------------------------------------------------------------------------------------
    def write(self, table: str, **columns: np.ndarray | torch.Tensor) -> None:
        """Append one shard of rows to ``table`` (uncommitted until the next :meth:`checkpoint`)."""
        cols = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach().cpu()
                for k, v in columns.items()}
        rows = {int(v.shape[0]) for v in cols.values()}
        if len(rows) != 1:
            raise ValueError(f"columns of one shard must have the same number of rows, got {sorted(rows)}")
        index = len(self.tables.get(table, [])) + len(self.pending.get(table, []))
        name = f"{table}-{index:06d}.safetensors"
        save_tree(self.work / name, cols)
        self.pending.setdefault(table, []).append([name, rows.pop()])

    def rows(self, table: str) -> int:
        """Rows in ``table``, committed and pending."""
        return sum(int(s[1]) for s in self.tables.get(table, []) + self.pending.get(table, []))

    def shards(self, table: str) -> Iterator[dict[str, np.ndarray]]:
        """Every shard of ``table`` in order (committed, then pending), verified, as numpy columns."""
        for name, _ in self.tables.get(table, []) + self.pending.get(table, []):
            yield {k: v.numpy() for k, v in load_tree(self.work / name).items()}

    def read(self, table: str) -> dict[str, np.ndarray]:
        """All of ``table``'s rows, columns concatenated (empty dict when it has none)."""
        parts = list(self.shards(table))
        if not parts:
            return {}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def truncate(self, table: str, rows: int) -> None:
        """Keep the first ``rows`` rows of ``table`` (a shard boundary: a resume rolls back to a checkpoint)."""
        kept: list[list[Any]] = []
        total = 0
        for shard in self.tables.get(table, []) + self.pending.get(table, []):
            if total + int(shard[1]) <= rows:
                kept.append(shard)
                total += int(shard[1])
            else:
                (self.work / shard[0]).unlink(missing_ok=True)
        if total != rows:
            raise DfkdError(f"{self.work}: table {table} cannot be cut back to {rows} rows (its checkpoints "
                            "disagree); delete the work directory to start over")
        self.tables[table], self.pending[table] = kept, []

    # -- state ----------------------------------------------------------------------------------------
    def checkpoint(self, state: dict[str, Any]) -> None:
        """Commit every shard written so far together with the stage's ``state`` (atomically)."""
        for table, shards in self.pending.items():
            self.tables.setdefault(table, []).extend(shards)
        self.pending = {}
        rng = rng_state()
        save_tree(self.work / STATE, {"key": self.key, "user": state, "tables": self.tables, "rng": rng})
        self.state, self._rng = state, rng

    def restore_rng(self) -> None:
        """Continue the random streams from the last checkpoint (call after restoring the stage's own state)."""
        if self._rng is not None:
            set_rng_state(self._rng)

    # -- publish --------------------------------------------------------------------------------------
    def publish_bank(self, header: BankHeader, attrs: dict[str, Any] | None = None, table: str = "bank",
                     out: str | os.PathLike[str] | None = None) -> int:
        """Write ``table`` as the bank ``out`` (default: the job's output) atomically; returns its rows.

        The work directory is removed when the ``with`` block ends without error.
        """
        n = header.write(out or self.out, self.shards(table), attrs or {})
        self.done = True
        return n


    def publish_ranks(self, header: BankHeader, attrs: dict[str, Any], order: Callable[[dict[str, np.ndarray]],
                      np.ndarray], out: str | os.PathLike[str]) -> int:
        """Publish the ``bank`` tables of every rank of a torchrun run as the one bank ``out``.

        A single process publishes its own table. Several: every rank sends rank 0 only its shards' names and
        their one-value-per-row columns (rounds, indices: not images), which ``order`` reads; rank 0 sorts all
        rows by ``order(columns)`` (stable, so the bank depends on the seed and world size, not on which rank
        finished first) and writes them straight from the ranks' shard files in that order, a block at a time
        (memory does not grow with the bank), with ``world_size`` in the attributes; every rank's work
        directory goes once it has. Where the ranks' work directories are not all visible to every rank (several
        nodes without a shared file system), the rows travel to rank 0 instead, and its memory holds them.
        Returns the bank's rows (0 on the other ranks).
        """
        world = current()
        if not world.distributed:
            return self.publish_bank(header, attrs, out=out)
        listing = [(str(self.work / name), int(rows), load_tree_scalars(self.work / name))
                   for name, rows in self.tables.get("bank", []) + self.pending.get("bank", [])]
        n = 0
        parts = [part for rank in gather_objects(listing) for part in rank]
        shared = all(gather_objects(all(Path(p).is_file() for p, _, _ in parts)))
        if not shared:  # nodes without a shared file system: the rows travel to rank 0 (its memory holds them)
            parts = [(None, len(next(iter(c.values()))), c) for c in gather_objects(self.read("bank")) if c]
        if world.main:
            cols = {k: np.concatenate([c[k] for _, _, c in parts]) for k in parts[0][2]} if parts else {}
            rows = np.argsort(order(cols), kind="stable") if parts else np.zeros(0, np.int64)
            blocks = (merged_rows([p for p, _, _ in parts], [r for _, r, _ in parts], rows) if shared
                      else iter([{k: v[rows] for k, v in cols.items()}] if parts else []))
            n = header.write(out, blocks, {**attrs, "world_size": world.size})
        barrier()
        self.done = True
        return n


def merged_rows(shards: list[str], sizes: list[int], order: np.ndarray, block: int = 1024,
                cached: int = 4) -> Iterator[dict[str, np.ndarray]]:
    """The rows ``order`` picks (indices into the shards' rows, concatenated), in that order, as blocks of
    ``block`` rows, reading each shard when a block first needs it and keeping the last ``cached`` shards: the
    merges dfkd makes (rounds of ranks, rows in their source's order) read every shard about once."""
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    cache: dict[int, dict[str, np.ndarray]] = {}
    for i in range(0, len(order), block):
        picks = order[i : i + block]
        which = np.searchsorted(starts, picks, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for s in dict.fromkeys(which.tolist()):
            if s not in cache:
                if len(cache) >= cached:
                    cache.pop(next(iter(cache)))
                cache[s] = {k: v.numpy() for k, v in load_tree(shards[s]).items()}
            mask = which == s
            for k, v in cache[s].items():
                if k not in out:
                    out[k] = np.empty((len(picks), *v.shape[1:]), v.dtype)
                out[k][mask] = v[picks[mask] - starts[s]]
        yield out


class JobResume:
    """A job as the training loops' resume interface (``load``/``save``/``restore_rng``/``clear``).

    Online distillation checkpoints the student, its optimiser and the feed once per epoch; through this the
    same checkpoint commits the epoch's recorded shards, so the student and its bank can never disagree.
    """

    def __init__(self, job: Job) -> None:
        self.job = job

    def load(self) -> dict[str, Any] | None:
        return self.job.state

    def save(self, state: dict[str, Any]) -> None:
        self.job.checkpoint(state)

    def restore_rng(self, state: dict[str, Any]) -> None:
        self.job.restore_rng()

    def clear(self) -> None:
        """Nothing to do: the work directory goes when the job's block ends after publishing."""
