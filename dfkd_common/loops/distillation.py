"""Student training: the distillation loop, one epoch a unit of the runner, and the bank feed it trains on.

The loop is method-agnostic. What varies lives behind two small interfaces:

* :class:`~dfkd_common.student.StudentSide`: the student and its objective, a weighted sum of registered terms
  (:mod:`dfkd_common.student`, one module each) that declare what a step must compute for them and own the
  modules they train (DFND's transition matrix, adapters, heads) with their optimisers.
* :class:`BankFeed`: where training images come from. :class:`BankFeed` itself is a bank read whole into memory
  (plus, where a bank is larger than memory, banks streamed from disk: :mod:`dfkd_common.bank_stream`);
  online methods (``dfkd distill --online M``) subclass it and grow the bank in :meth:`BankFeed.before_epoch`
  against the current student, so the loop itself never changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from dfkd_common.augment_ops import AugmentConfig, build_augment, to_float
from dfkd_common.bank_stream import StreamBatches, StreamConfig, StreamedBank
from dfkd_common.data import ArraySplit
from dfkd_common.dist import current, rank_share
from dfkd_common.engine import Engine, check_finite
from dfkd_common.errors import DfkdError
from dfkd_common.evaluation import evaluate
from dfkd_common.geometry import Size
from dfkd_common.loops.common import epoch_batches
from dfkd_common.loops.runner import Loop, Runner, Store
from dfkd_common.models import Classifier
from dfkd_common.models.hooks import FeatureHooks, Penultimate, stage_outputs
from dfkd_common.student import StudentSide, StudentStep
from dfkd_common.tasks import get_task


# --------------------------------------------------------------------------------------------- feeds
class BankFeed:
    """Training images held in memory on the device: uint8 (N, C, H, W) + labels (N,)."""

    #: under torchrun: False = every rank draws the same batches and takes every N-th; True = the feed makes
    #: each rank's batches itself (DFAD's per-rank generator), so the loop takes all of them
    per_rank_batches = False
    #: False for feeds that make their own batches (DFAD) and so cannot train on a bank
    takes_banks = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> None:
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.streams: list[StreamedBank] = []  # banks too large for memory, read in blocks beside these rows
        self.stream_cfg = StreamConfig()

    def add_streams(self, banks: list[StreamedBank], cfg: StreamConfig) -> None:
        """Train on ``banks`` too, streamed from disk (:mod:`dfkd_common.bank_stream`): each rank then reads its
        own blocks of every epoch's order, so the loop takes all of its batches."""
        if banks and not self.takes_banks:
            raise DfkdError("this online method makes every batch itself and trains on no bank: run it without "
                            "--bank")
        self.streams, self.stream_cfg = list(banks), cfg
        if self.streams:
            self.per_rank_batches = True

    def __len__(self) -> int:
        return int(self.images.shape[0]) + sum(len(b) for b in self.streams)

    def before_epoch(self, epoch: int, side: nn.Module) -> dict[str, float]:
        """Hook for online synthesis (grow the bank against the current student side); static banks do nothing."""
        return {}

    @property
    def warmup_epochs(self) -> int:
        """Epochs at the start during which the feed only builds its bank (online feeds' ``warmup``)."""
        return 0

    def batches(self, batch_size: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One shuffled pass of (images, labels) batches; the loop stops early after ``kd_steps`` batches.

        A feed that makes its images on the fly (DFAD: fresh G(z) for every student step, with a generator step
        against the student between them) overrides this instead of the loop growing a special case.
        """
        if self.streams:  # one endless stream of block orders; the epoch's order comes from ``gen``, on every rank
            seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
            stream = StreamBatches((self.images, self.labels), self.streams, self.stream_cfg, self.images.device)
            yield from stream.batches(batch_size, seed)
            return
        for idx in epoch_batches(len(self), batch_size, gen):
            idx = idx.to(self.images.device)
            yield self.images[idx], self.labels[idx]

    def finish(self) -> None:
        """Called once after the last epoch (online feeds publish their bank here)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


# ---------------------------------------------------------------------------------------------- loop
@dataclass(frozen=True)
class Distillation:
    """The student loop's params; the ``distill`` section of a params file holds them beside the stage's own."""

    epochs: int = 20
    batch_size: int = 256
    kd_steps: int | None = None  # batches per epoch; None = one pass over the current bank
    lr: float = 0.05
    optimizer: Literal["sgd", "adam"] = "sgd"
    weight_decay: float = 5e-4
    # crop padding 2 (not kornia's CIFAR-style 4): the defaults are those of the default pipeline's 32x32 digits
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_pad=2))
    seed: int = 0
    # online feeds with warm-up epochs: "skip" = the published Fast/NAYER/CPNet schedule (only the bank grows
    # during warm-up; the cosine runs over the epochs after it), "train" = the student also steps during warm-up
    student_warmup: Literal["train", "skip"] = "train"
    eta_min: float = 0.0  # the cosine schedule's floor (published Fast/NAYER/CPNet: 2e-4)


class StudentLoop(Loop):
    """One epoch of distillation (the runner's :class:`~dfkd_common.loops.runner.Loop`).

    Each step computes what the side's terms need, once: ``side.views`` independently augmented views of the
    batch, the teacher's forward (no grad) where a term needs its logits or features, the student's forward,
    and the features hooks record. The engine owns precision (``amp``) and processes (DDP).
    """

    def __init__(self, teacher: Classifier, side: StudentSide, feed: BankFeed, test: ArraySplit,
                 cfg: Distillation, engine: Engine) -> None:
        self.cfg, self.engine, self.feed, self.test = cfg, engine, feed, test
        self.teacher = engine.model(teacher).eval()
        self.side = engine.model(side)
        self.world = current()
        self.opt, self.own = self.side.optimizers(cfg.optimizer, cfg.lr, cfg.weight_decay)
        # under the published warm-up schedule the student waits while the bank grows, and its cosine starts after
        self.skip = min(feed.warmup_epochs, cfg.epochs) if cfg.student_warmup == "skip" else 0
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, max(1, cfg.epochs - self.skip),
                                                                eta_min=cfg.eta_min)
        self.aug = build_augment(test.info.image_size, cfg.augment)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.headline = get_task(test.info.task).headline
        self.t_hooks = TeacherFeatures(self.teacher, self.side.needs, test.info.channels, test.info.image_size)
        self._loss: nn.Module | None = None  # built on the first epoch: after a resume has loaded the state

    def loss_fn(self) -> nn.Module:
        """The step as a module; under several processes DDP averages the gradients of the student and of every
        module its terms train (terms switched off part-way leave theirs without gradients: DDP must look)."""
        if self._loss is None:
            step = StepLoss(self.side, self.teacher, self.aug, self.engine, self.t_hooks)
            self._loss = self.engine.parallel(step, find_unused=self.side.part_time)
        return self._loss

    def run(self, epoch: int) -> dict[str, Any]:
        cfg, feed, side = self.cfg, self.feed, self.side
        synth_logs = feed.before_epoch(epoch, side)
        side.train()
        sums: dict[str, float] = {}
        steps = 0
        n = len(feed)
        bs = min(cfg.batch_size, n)
        limit = cfg.kd_steps if cfg.kd_steps else max(1, n // bs)
        # several ranks: the same shuffled batches on every rank, rank r takes batches r, r + N, ...: each takes
        # 1/N of the epoch's steps (at least one), a step averages N batches
        limit = max(1, limit // self.world.size) if epoch >= self.skip else 0
        # passes over the feed, one after another, as long as the epoch's steps need them
        stream: Iterable[tuple[torch.Tensor, torch.Tensor]] = itertools.chain.from_iterable(
            feed.batches(bs, self.gen) for _ in itertools.count())
        if not feed.per_rank_batches:
            stream = rank_share(stream, self.world)
        loss_fn = self.loss_fn()
        for images, labels in itertools.islice(stream, limit):
            loss, logs = loss_fn(images, labels, epoch / max(1, cfg.epochs))
            check_finite(loss, "student loss")
            self.opt.zero_grad(set_to_none=True)
            for o in self.own:
                o.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            for o in self.own:
                o.step()
            for k, v in {"loss": float(loss.detach()), **logs}.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
        del stream  # a streamed feed's readers and buffer go now, not after the evaluation
        if steps:
            self.sched.step()
        scores = evaluate(side.student, self.test, self.engine)
        return {"epoch": epoch + 1, **scores, "bank_size": n, "student_steps": steps,
                **{k: v / max(1, steps) for k, v in sums.items()}, **synth_logs}

    def describe(self, logs: dict[str, Any] | None) -> str:
        if not logs:
            return ""
        return (f"loss {logs.get('loss', float('nan')):.3f} {self.headline} {logs[self.headline]:.4f} "
                f"bank {logs['bank_size']}")

    def state_dict(self) -> dict[str, Any]:
        return {"student": self.side.student.state_dict(), "terms": self.side.terms_state(),
                "opt": self.opt.state_dict(), "own_opts": [o.state_dict() for o in self.own],
                "sched": self.sched.state_dict(), "gen": self.gen.get_state(), "feed": self.feed.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.side.student.load_state_dict(state["student"])
        self.side.load_terms_state(state["terms"])
        self.opt.load_state_dict(state["opt"])
        for o, o_state in zip(self.own, state["own_opts"], strict=True):
            o.load_state_dict(o_state)
        self.sched.load_state_dict(state["sched"])
        self.gen.set_state(state["gen"])
        self.feed.load_state_dict(state["feed"])


def distill(
    teacher: Classifier,
    side: StudentSide,
    feed: BankFeed,
    test: ArraySplit,
    cfg: Distillation,
    engine: Engine,
    store: Store | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Train ``side.student`` to imitate ``teacher`` on ``feed``; returns the final test metrics and the history.

    State (student, term modules, optimisers, scheduler, feed, RNG) is checkpointed after every epoch when a
    ``store`` is given, and restored on a rerun with identical params. ``on_epoch(row)`` runs after each epoch,
    before its checkpoint.
    """
    loop = StudentLoop(teacher, side, feed, test, cfg, engine)
    runner = Runner(store, on_unit=(lambda done, logs: on_epoch(logs or {})) if on_epoch else None)
    try:
        result = runner.run(loop, cfg.epochs, "distill", "epoch")
        feed.finish()
        return evaluate(loop.side.student, test, engine), result.history
    finally:
        loop.t_hooks.remove()


class StepLoss(nn.Module):
    """One student step as a module's forward (the step's tensors, then the side's objective), so that DDP can
    wrap it: the teacher is held outside the module tree (frozen, never synchronised)."""

    def __init__(self, side: StudentSide, teacher: Classifier, aug: nn.Module, engine: Engine,
                 t_hooks: TeacherFeatures) -> None:
        super().__init__()
        self.side = side
        self._fixed = (teacher, aug, engine, t_hooks)

    def forward(self, images: torch.Tensor, labels: torch.Tensor,
                progress: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        teacher, aug, engine, t_hooks = self._fixed
        return self.side.objective(make_step(images, labels, self.side, teacher, aug, engine, t_hooks, progress))


class TeacherFeatures:
    """The teacher's penultimate and stage features, hooked only when a student term needs them."""

    def __init__(self, teacher: Classifier, needs: frozenset[str], channels: int, image_size: Size) -> None:
        self.run = bool(needs & {"t_logits", "t_feat", "t_stages"})
        self.penultimate = Penultimate(teacher) if "t_feat" in needs else None
        self.stages = (FeatureHooks(teacher, [s.path for s in stage_outputs(teacher, channels, image_size)])
                       if "t_stages" in needs else None)

    def read(self) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        feat = self.penultimate.value if self.penultimate is not None else None
        return feat, dict(self.stages.features) if self.stages is not None else {}

    def remove(self) -> None:
        for hooks in (self.penultimate, self.stages):
            if hooks is not None:
                hooks.remove()


def make_step(images: torch.Tensor, labels: torch.Tensor, side: StudentSide, teacher: Classifier, aug: nn.Module,
              engine: Engine, t_hooks: TeacherFeatures, progress: float = 0.0) -> StudentStep:
    """One step's tensors: ``side.views`` augmented views, the teacher's forward where needed, the student's."""
    if side.views == 1:
        x = engine.images(aug(to_float(images)))
    else:
        x = engine.images(torch.cat([aug(to_float(images)) for _ in range(side.views)]))
        labels = labels.repeat(side.views)
    t_logits = None
    t_feat, t_stages = None, {}
    if t_hooks.run:
        with torch.no_grad(), engine.autocast():
            t_logits = teacher(x).float()
        t_feat, t_stages = t_hooks.read()
    with engine.autocast():
        s_logits = side.student(x).float()
    s_feat, s_stages = side.features()
    return StudentStep(x=x, labels=labels, s_logits=s_logits, t_logits=t_logits, s_feat=s_feat, t_feat=t_feat,
                       s_stages=s_stages, t_stages=t_stages, views=side.views, progress=progress)
