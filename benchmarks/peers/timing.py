"""What both sides of ``bench_vs_reference.py`` are timed with: optimiser steps and named phases, nothing else.

Neither dfkd's code nor the authors' is edited to time it. A global optimiser step hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``) stamps every ``step()`` of every optimiser with
the time, the optimiser's class and its parameter count; the worker wraps the calls it makes (one synthesis
round, one training call) in :meth:`Recorder.phase`. From these:

* a **generator step** is the median interval between consecutive steps of one synthesis optimiser (Adam:
  generator, latent or pixels) within a synthesis phase: one forward of generator, teacher (and student), one
  backward, one update, and whatever the code does around them;
* a **student step** is the median interval between consecutive steps of the student's optimiser (the SGD with
  the most parameters): drawing a batch (from the pool or bank, decoded and augmented), the teacher's and the
  student's forward, backward, update;
* a **round** is the wall time of one synthesis phase (``g_steps`` generator steps plus the round's set-up and
  its writes to the pool or bank), extrapolated to the published ``g_steps`` as
  ``round + (g_published - g_run) * generator step``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


@dataclass
class Step:
    t: float
    opt: int  # id() of the optimiser
    kind: str  # its class name
    numel: int  # its parameter count
    phase: str


@dataclass
class Phase:
    name: str
    start: float
    end: float = 0.0


@dataclass
class Recorder:
    """Collects :class:`Step` and :class:`Phase` records; install once per process with :meth:`install`."""

    steps: list[Step] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    current: str = "none"
    _numel: dict[int, int] = field(default_factory=dict)
    _open: Phase | None = None

    def install(self) -> Recorder:
        register_optimizer_step_post_hook(self._hook)
        return self

    def _hook(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        key = id(opt)
        if key not in self._numel:
            self._numel[key] = sum(p.numel() for g in opt.param_groups for p in g["params"])
        self.steps.append(Step(time.perf_counter(), key, type(opt).__name__, self._numel[key], self.current))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a call: ``synth`` (one synthesis round), ``student`` (student steps on the bank or pool),
        ``online`` (generator and student steps interleaved, DAFL/DFAD)."""
        previous, self.current = self.current, name
        rec = Phase(name, time.perf_counter())
        try:
            yield
        finally:
            rec.end = time.perf_counter()
            self.phases.append(rec)
            self.current = previous

    def begin(self, name: str) -> None:
        """Open a phase that :meth:`end` closes (where one call starts it and another ends it)."""
        self._open = Phase(name, time.perf_counter())
        self.current = name

    def end(self) -> None:
        if self._open is not None:
            self._open.end = time.perf_counter()
            self.phases.append(self._open)
            self._open = None
            self.current = "none"

    # -- figures ---------------------------------------------------------------------------------------------
    def _intervals(self, keep: Any, skip_first: int = 0) -> list[float]:
        """Intervals between consecutive steps of one optimiser within one phase, the first ``skip_first``
        phases of each name left out (the first round: one-off costs, and a bank smaller than the student's
        batch on dfkd's side, where the first epoch's batches are the one round it holds)."""
        out: list[float] = []
        last: dict[tuple[int, int], float] = {}
        seen: dict[str, int] = {}
        for ph_index, ph in enumerate(self.phases):
            seen[ph.name] = seen.get(ph.name, 0) + 1
            if seen[ph.name] <= skip_first and sum(p.name == ph.name for p in self.phases) > skip_first:
                continue
            for s in self.steps:
                if ph.start <= s.t <= ph.end and keep(s):
                    k = (ph_index, s.opt)
                    if k in last:
                        out.append(s.t - last[k])
                    last[k] = s.t
        return out

    def student_optimizer(self) -> tuple[int, int] | None:
        """(id, numel) of the student's optimiser: the SGD with the most parameters."""
        sgd = {(s.opt, s.numel) for s in self.steps if s.kind == "SGD"}
        return max(sgd, key=lambda x: x[1]) if sgd else None

    def summary(self, skip_first: int = 1) -> dict[str, Any]:
        """Medians of generator and student steps and of round and training-call walls.

        ``skip_first`` phases of each name are dropped from every median (the first call pays one-off costs:
        allocator warm-up, oneDNN primitive creation, lazy imports; see :meth:`_intervals`)."""
        student = self.student_optimizer()
        sid = student[0] if student else -1
        gen = self._intervals(lambda s: s.opt != sid and s.kind != "SGD" and s.phase in ("synth", "online"),
                              skip_first)
        stu = self._intervals(lambda s: s.opt == sid, skip_first)

        def walls(name: str) -> list[float]:
            w = [p.end - p.start for p in self.phases if p.name == name]
            return w[skip_first:] if len(w) > skip_first else w

        def med(v: list[float]) -> float | None:
            return statistics.median(v) if v else None

        return {"generator_step_s": med(gen), "student_step_s": med(stu), "n_generator_steps": len(gen),
                "n_student_steps": len(stu), "round_s": med(walls("synth")), "train_call_s": med(walls("student")),
                "online_call_s": med(walls("online")),
                "steps_per_round": self._steps_per_phase("synth", sid)}

    def _steps_per_phase(self, name: str, sid: int) -> float | None:
        counts = [sum(1 for s in self.steps if p.start <= s.t <= p.end and s.opt != sid and s.kind != "SGD")
                  for p in self.phases if p.name == name]
        return statistics.median(counts) if counts else None
