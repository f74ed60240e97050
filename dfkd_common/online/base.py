"""Online distillation: feeds that keep making images against the current student while it trains.

``dfkd distill --online M`` swaps the static :class:`~dfkd_common.loops.distillation.BankFeed` for one of these; the
distillation loop does not change. Two kinds exist:

* :class:`OnlineFeed` wraps any registered :class:`~dfkd_common.synthesis.Synthesizer` (Fast, NAYER, CPNet,
  even DeepInversion): before every epoch it runs ``g_loops`` synthesis rounds against the student
  (``warmup_loops`` rounds and *no student*, hence no adversarial term, during the first ``warmup`` epochs)
  and appends them to the in-memory bank the student trains on.
* Methods whose synthesis is interleaved with the student's steps (DFAD) register their own feed class in
  :data:`ONLINE`; :func:`build_online_feed` looks there first and falls back to the synthesizers.

Both record what they made as rows of the stage's :class:`~dfkd_common.jobs.Job` (round index = synthesis
round, counted across epochs, so ``dfkd bank info`` shows how synthesis evolved); the stage publishes the bank
once the student is saved. Resume protocol, the job driver's: every round is written as a shard; the
distillation loop checkpoints :meth:`RecordedFeed.state_dict` (rows accounted for, next round, synthesizer
state) with its own state after each epoch, which commits the epoch's shards; a rerun drops the shards of the
interrupted epoch and reloads the bank from the committed ones, so that epoch is redone exactly once and no
round is duplicated.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from dfkd_common.bank import Bank, BankHeader, logit_columns
from dfkd_common.config import parse
from dfkd_common.data import DatasetInfo
from dfkd_common.dist import current, gather_objects
from dfkd_common.engine import Engine
from dfkd_common.errors import DfkdError
from dfkd_common.jobs import Job
from dfkd_common.loops.distillation import BankFeed
from dfkd_common.loops.synthesis_rounds import scored_rows
from dfkd_common.models import Classifier
from dfkd_common.params import merge
from dfkd_common.registry import Registry
from dfkd_common.synthesis import SYNTHESIZERS, Synthesizer, build_synthesizer


@contextmanager
def frozen(model: nn.Module, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Use ``model`` as a fixed function: no parameter gradients (input gradients still flow), eval mode.

    Synthesis backpropagates *through* the student into the images; computing the student's own parameter
    gradients there would only cost time (and leave stale ``.grad`` the optimiser must clear).
    """
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    if eval_mode:
        model.eval()
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)


@dataclass
class FeedContext:
    """What every online feed is built from (the stage assembles it once)."""

    teacher: Classifier
    info: DatasetInfo
    engine: Engine
    job: Job  # where the recorded rows go (table "bank")
    header: BankHeader  # the recorded bank's schema and provenance
    initial: Bank | None = None
    seed: int = 0
    batch_size: int = 256  # the student's batch size (feeds that make the batches use it)
    epochs: int = 1  # the student's epochs (feeds that follow its learning-rate schedule use it)


@contextmanager
def recording(out: str | os.PathLike[str], teacher: Classifier, info: DatasetInfo, engine: Engine,
              method: str = "online", key: dict[str, Any] | None = None, **kwargs: Any) -> Iterator[FeedContext]:
    """A :class:`FeedContext` whose rows a job (locked, resumable) records for the bank ``out``.

    For feeds built outside ``dfkd distill`` (tools, benchmarks, tests); publish with
    ``ctx.job.publish_bank(ctx.header, feed.stats())`` inside the block.
    """
    header = BankHeader(channels=info.channels, image_size=info.image_size, kind="synthetic", method=method,
                        dataset=info.to_dict(), optional=logit_columns(info.task, None))
    with Job(out, key or {"method": method}) as job:
        yield FeedContext(teacher, info, engine, job, header, **kwargs)


@dataclass(frozen=True)
class NoFeedConfig:
    """A feed without params of its own."""


@dataclass(frozen=True)
class OnlineFeedConfig:
    """A synthesizer feed's own params: ``g_loops`` rounds per epoch, ``warmup`` epochs without the student,
    ``warmup_loops`` rounds per warm-up epoch (None: ``g_loops``)."""

    g_loops: int = 1
    warmup: int = 0
    warmup_loops: int | None = None


class RecordedFeed(BankFeed):
    """An in-memory bank that mirrors the job's ``bank`` table; base of every online feed.

    Invariant: ``self.images/labels`` == the rows the student trains on, a subset of the recorded ones (all of
    them for synthesizer feeds). Initialisation is lazy (first :meth:`before_epoch`) because a resumed run must
    first get the chance to :meth:`load_state_dict`; a fresh run copies the initial bank (if any) into the job,
    keeping its rounds.
    """

    #: the ``online:`` params that configure the feed itself (a synthesizer feed: the rest configures the method)
    Config: ClassVar[type] = NoFeedConfig

    def __init__(self, ctx: FeedContext, cfg: Any) -> None:
        super().__init__(torch.zeros(0, *ctx.info.shape,
                                     dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), ctx.engine.device)
        self.ctx = ctx
        self.cfg = cfg
        self.device = ctx.engine.device
        self.teacher = ctx.teacher
        self.job = ctx.job
        self.next_round = 0
        self.started = False
        self.seconds = 0.0  # wall time spent making images (for images/s)
        self.made = 0  # images made (recorded or not)
        self.rows = 0  # rows recorded

    @classmethod
    def create(cls, method: str, ctx: FeedContext, cfg: Mapping[str, Any]) -> RecordedFeed:
        """Build the feed from the ``online:`` params (registered feeds implement this)."""
        raise NotImplementedError

    # -- bank bookkeeping ----------------------------------------------------------------------------
    def start(self) -> None:
        """Fresh run: empty work file, then the initial bank (rounds kept; online rounds continue after)."""
        if self.started:
            return
        self.job.truncate("bank", 0)
        self.rows = 0
        init = self.ctx.initial
        if init is not None and len(init):
            for i in range(0, len(init), 4096):
                sl = slice(i, i + 4096)
                self.record(init.images[sl], init.labels[sl], init.rounds[sl], keep=True)
            self.next_round = int(init.rounds.max()) + 1
        self.started = True

    @torch.no_grad()
    def record(self, images: torch.Tensor, labels: torch.Tensor, rounds: torch.Tensor | int,
               keep: bool = True) -> None:
        """Record rows (with the teacher's logits) in the job and, when ``keep``, in the training bank."""
        cols = scored_rows(self.ctx.header, self.teacher, self.ctx.engine, images, labels, rounds)
        self.job.write("bank", **cols)
        self.rows = self.job.rows("bank")
        if keep:
            self.images = torch.cat([self.images, torch.from_numpy(cols["images"]).to(self.device)])
            self.labels = torch.cat([self.labels, labels.to(self.device, torch.int64)])

    # -- state -----------------------------------------------------------------------------------------
    def method_state(self) -> dict[str, Any]:
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.job.rows("bank"), "next_round": self.next_round, "seconds": self.seconds,
                "made": self.made, "method": self.method_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rows = int(state["rows"])
        self.job.truncate("bank", rows)
        self.rows = rows
        self.load_rows(self.job.read("bank"))
        self.next_round = int(state["next_round"])
        self.seconds = float(state["seconds"])
        self.made = int(state["made"])
        self.load_method_state(state["method"])
        self.started = True

    def load_rows(self, cols: dict[str, np.ndarray]) -> None:
        """Rebuild the training bank from the recorded rows on a resume (all of them; DFAD overrides: none)."""
        if not cols:
            return
        self.images = torch.from_numpy(cols["images"]).to(self.device)
        # the task's target column: classification's labels, segmentation's masks
        self.labels = torch.from_numpy(cols[self.ctx.header.task.target].astype(np.int64)).to(self.device)

    def stats(self) -> dict[str, Any]:
        """Figures the stage puts into its metrics and the bank's attributes."""
        return {"synthesis_seconds": self.seconds, "images_made": self.made,
                "images_per_s": self.made / max(self.seconds, 1e-9), "rounds": self.next_round,
                "bank_rows": self.rows, "precision": self.ctx.engine.precision}

    def finish(self) -> None:
        """After the last epoch: make sure a run of zero epochs still recorded its initial bank."""
        self.start()


class OnlineFeed(RecordedFeed):
    """A synthesizer in the loop: ``g_loops`` rounds against the student before every epoch (see module doc).

    Feed params (the rest of ``online:`` configures the synthesizer): ``g_loops`` rounds per epoch,
    ``warmup`` epochs whose rounds run without the student (so without L_adv: the published recipes first
    build a bank the student can learn from at all), ``warmup_loops`` rounds per warm-up epoch (default
    ``g_loops``).
    """

    Config = OnlineFeedConfig

    def __init__(self, ctx: FeedContext, cfg: OnlineFeedConfig, synth: Synthesizer) -> None:
        super().__init__(ctx, cfg)
        self.synth = synth
        self.g_loops = cfg.g_loops
        self.warmup = cfg.warmup
        self.warmup_loops = cfg.warmup_loops if cfg.warmup_loops is not None else self.g_loops

    @classmethod
    def create(cls, method: str, ctx: FeedContext, cfg: Mapping[str, Any]) -> OnlineFeed:
        """The feed's own keys configure it; the rest of ``online:`` configures the synthesizer."""
        own = {f.name for f in dataclasses.fields(OnlineFeedConfig)}
        feed_cfg = parse(OnlineFeedConfig, {k: v for k, v in cfg.items() if k in own}, f"{method} online")
        synth = build_synthesizer(method, ctx.teacher, ctx.info, {k: v for k, v in cfg.items() if k not in own},
                                  ctx.engine, ctx.seed)
        return cls(ctx, feed_cfg, synth)

    @property
    def warmup_epochs(self) -> int:
        return self.warmup

    def before_epoch(self, epoch: int, side: nn.Module) -> dict[str, float]:
        self.start()
        warm = epoch < self.warmup
        loops = self.warmup_loops if warm else self.g_loops
        logs: dict[str, float] = {}
        t0 = time.perf_counter()
        self.synth.begin_epoch(epoch)
        world = current()
        with frozen(side):  # the student and the modules its terms train are fixed functions during synthesis
            for _ in range(loops):
                # several ranks: each synthesises its own round (its own seed, round index next + rank); all
                # record every rank's round in rank order, so each trains on the whole bank
                result = self.synth.synthesize(self.next_round + world.rank, None if warm else side)
                for images, labels in gather_objects((result.images, result.labels)):
                    self.made += int(images.shape[0])
                    self.record(images, labels, self.next_round)
                    self.next_round += 1
                logs = result.logs
        self.seconds += time.perf_counter() - t0
        return {f"synth_{k}": v for k, v in logs.items()}

    def method_state(self) -> dict[str, Any]:
        return {"synth": self.synth.state_dict()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.synth.load_state_dict(state["synth"])


#: online methods with a feed class of their own (DFAD); any other name is looked up in SYNTHESIZERS
ONLINE: Registry[type[RecordedFeed]] = Registry("online method")


def build_online_feed(method: str, ctx: FeedContext, cfg: dict[str, Any] | None = None) -> RecordedFeed:
    """The feed for ``dfkd distill --online METHOD`` (own feed class first, else a synthesizer in the loop)."""
    if method not in ONLINE and method not in SYNTHESIZERS:
        known = sorted(set(ONLINE.names()) | set(SYNTHESIZERS.names()))  # a feed of its own, or a synthesizer
        raise DfkdError(f"unknown online method {method!r} (known: {', '.join(known)})")
    factory = ONLINE.get(method) if method in ONLINE else OnlineFeed
    return factory.create(method, ctx, merge({}, cfg))
