"""The one runner every loop of dfkd goes through: units of work, resumable state, progress, timing.

Teacher training (epochs), distillation from banks and online (epochs), synthesis (rounds), augmentation and
retrieval (batches of rows) all do the same thing: run a unit of work, record what it logged, checkpoint after
it (or every ``every`` units), show progress, and on a rerun continue after the last checkpoint with the same
random streams, so an interrupted run ends exactly where an uninterrupted one does. :class:`Runner` does that
once; a loop supplies only a :class:`Loop`: its unit (``run``), the state that makes it resumable
(``state_dict``/``load_state_dict``), rows it buffers to write at a checkpoint (``flush``) and a line for the
progress bar (``describe``).

Where the state goes is a :class:`Store`: a state file beside the output (:class:`StateFile`: teacher training
and distillation from a bank), or a job's checkpoint (:class:`JobStore`), which also commits the rows the units
wrote as shards (synthesis, retrieval, augmentation, online distillation's grown bank), so the state and the rows
can never disagree. Every store keys its state by the run's params: a rerun with other params starts over.

Why not Lightning Fabric or accelerate: both would give device placement, autocast and DDP wrapping, which
:class:`~dfkd_common.engine.Engine` already does in a few lines, but their checkpoints pickle optimiser and RNG
state (``torch.save``), while dfkd's state files hold tensors in safetensors and everything else in JSON (no file
runs code when loaded), resume bit for bit on a CPU, and commit a job's shards atomically with the state. What
they would add, this runner and the engine had to do anyway.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dfkd_common.checkpoint import load_tree, save_tree
from dfkd_common.engine import progress, rng_state, set_rng_state
from dfkd_common.errors import DfkdError
from dfkd_common.jobs import Job
from dfkd_common.params import params_hash

#: a resumed run says so (the stage prints it: ``stages.common.show_notices``)
log = logging.getLogger("dfkd.runner")

#: the layout of the runner's state; part of every key, so state written by another layout starts over
LAYOUT = 2


class Loop:
    """What a loop supplies to the :class:`Runner` (subclasses implement :meth:`run` and their state)."""

    def run(self, index: int) -> dict[str, Any] | None:
        """Unit ``index`` of the work (an epoch, a round, a batch); returns what it logged, or None."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything the units change (models, optimisers, generators, counters), for the checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on a resume."""

    def flush(self) -> None:
        """Write what the units buffered (rows batched into fewer shards): called right before each checkpoint."""

    def describe(self, logs: dict[str, Any] | None) -> str:
        """The progress bar's text after a unit."""
        return ""


class Store(Protocol):
    """Where a run's state is checkpointed (:class:`StateFile`, :class:`JobStore`)."""

    #: where the state lives, for the line a resumed run prints
    where: Path

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...

    def restore_rng(self, state: dict[str, Any]) -> None: ...

    def clear(self) -> None: ...


@dataclass
class StateFile:
    """State in a file beside the output (``.<out>.state.safetensors``; ``docs/ARTIFACTS.md``), tied to a params
    hash. A rerun with the same params continues from the last checkpoint; different params start over (the old
    state describes another run). :meth:`clear` deletes it once the artifact is complete."""

    path: Path
    key: str

    @property
    def where(self) -> Path:
        return self.path

    @classmethod
    def for_output(cls, output: str | os.PathLike[str], params: dict[str, Any]) -> StateFile:
        out = Path(output)
        return cls(out.parent / f".{out.name}.state.safetensors", params_hash({**params, "runner_layout": LAYOUT}))

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            state = load_tree(self.path)
        except DfkdError:
            return None
        return state if state.get("key") == self.key else None

    def save(self, state: dict[str, Any]) -> None:
        save_tree(self.path, {**state, "key": self.key, "rng": rng_state()})

    def restore_rng(self, state: dict[str, Any]) -> None:
        set_rng_state(state["rng"])

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class JobStore:
    """A job's checkpoint as the store: saving commits the shards the units wrote since the last one.

    ``phase`` names one runner's state within a job that runs several in turn (retrieval scores the pool, then
    gathers the chosen rows): a state saved by another phase is not this one's.
    """

    job: Job
    phase: str = "run"

    @property
    def where(self) -> Path:
        return self.job.work

    def load(self) -> dict[str, Any] | None:
        state = self.job.state
        return state if state is not None and state.get("phase") == self.phase else None

    def save(self, state: dict[str, Any]) -> None:
        self.job.checkpoint({**state, "phase": self.phase})

    def restore_rng(self, state: dict[str, Any]) -> None:
        self.job.restore_rng()

    def clear(self) -> None:
        """Nothing to do: the work directory goes when the job's block ends after publishing."""


@dataclass
class RunResult:
    """What a run did: every unit's logs (resumed ones included), its seconds of work, where it resumed."""

    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_at: int = 0
    done: int = 0


@dataclass
class Runner:
    """Runs ``total`` units of a :class:`Loop` (see the module docstring).

    ``every``: checkpoint every N units (and after the last); ``keep``: keep every unit's logs in the history
    (epochs: the learning curve) or only the last (rounds, batches). Two hooks, where tests interrupt runs:
    ``on_unit(done, logs)`` after each unit, before its checkpoint (the unit is then redone on the rerun), and
    ``after_unit(done, logs)`` after the unit and its checkpoint, if it had one.
    """

    store: Store | None = None
    every: int = 1
    keep: bool = True
    on_unit: Callable[[int, dict[str, Any] | None], None] | None = None
    after_unit: Callable[[int, dict[str, Any] | None], None] | None = None

    def run(self, loop: Loop, total: int, label: str, unit: str = "step") -> RunResult:
        """Units ``0..total-1`` of ``loop`` after the last checkpoint; ``label`` and ``unit`` (epoch, round,
        batch) name them in the progress bar and in the line a resumed run prints."""
        result = RunResult()
        state = self.store.load() if self.store is not None else None
        if state is not None:
            loop.load_state_dict(state["loop"])
            result = RunResult(list(state["history"]), float(state["seconds"]), int(state["done"]),
                               int(state["done"]))
            assert self.store is not None
            self.store.restore_rng(state)
            if result.done:  # a phase handed its first state (retrieval's gathering) has not resumed anything
                log.info("%s: resuming after %s %d of %d (state: %s)", label, unit, result.done, total,
                         self.store.where)
        with progress() as bar:
            start = result.done
            tid = bar.add_task(label, total=total, completed=start, info=f"resumed at {start}" if start else "")
            for index in range(start, total):
                t0 = time.perf_counter()
                logs = loop.run(index)
                result.seconds += time.perf_counter() - t0
                if logs is not None:
                    result.history = [*result.history, logs] if self.keep else [logs]
                result.done = index + 1
                if self.on_unit is not None:
                    self.on_unit(result.done, logs)
                if self.store is not None and (result.done % self.every == 0 or result.done == total):
                    loop.flush()
                    self.store.save({"loop": loop.state_dict(), "history": result.history, "done": result.done,
                                     "seconds": result.seconds})
                bar.update(tid, completed=result.done, info=loop.describe(logs))
                if self.after_unit is not None:
                    self.after_unit(result.done, logs)
        return result
