"""Student training from a bank: bank feeds and the resumable distillation loop.

The loop is method-agnostic. What varies lives behind two small interfaces:

* :class:`~dfkd_common.student.StudentSide`: the student and its objective, a weighted sum of registered terms
  (:mod:`dfkd_common.student`, one module each) that declare what a step must compute for them and own the
  modules they train (DFND's transition matrix, adapters, heads) with their optimisers.
* :class:`BankFeed`: where training images come from. :class:`BankFeed` itself is a bank read whole into memory;
  online methods (``dfkd distill --online M``) subclass it and grow the bank in :meth:`BankFeed.before_epoch`
  against the current student, so the loop itself never changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from dfkd_common.augment_ops import AugmentConfig, augment_config, build_augment, to_float
from dfkd_common.data import ArraySplit
from dfkd_common.dist import current, rank_share
from dfkd_common.engine import Engine, check_finite, progress
from dfkd_common.geometry import Size
from dfkd_common.models import Classifier
from dfkd_common.models.hooks import FeatureHooks, Penultimate, stage_outputs
from dfkd_common.student import StudentSide, StudentStep
from dfkd_common.tasks import get_task
from dfkd_common.training import Checkpoints, epoch_batches, evaluate


# --------------------------------------------------------------------------------------------- feeds
class BankFeed:
    """Training images held in memory on the device: uint8 (N, C, H, W) + labels (N,)."""

    #: under torchrun: False = every rank draws the same batches and takes every N-th; True = the feed makes
    #: each rank's batches itself (DFAD's per-rank generator), so the loop takes all of them
    per_rank_batches = False

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> None:
        self.images = images.to(device)
        self.labels = labels.to(device)

    def __len__(self) -> int:
        return int(self.images.shape[0])

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
@dataclass
class DistillConfig:
    """The student loop's settings; their defaults are ``dfkd distill``'s (the stage derives its own from here)."""

    epochs: int = 20
    batch_size: int = 256
    kd_steps: int | None = None  # batches per epoch; None = one pass over the current bank
    lr: float = 0.05
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    # crop padding 2 (not kornia's CIFAR-style 4): the defaults are those of the default pipeline's 32x32 digits
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_pad=2))
    amp: Any = False  # bf16 autocast for student/teacher passes (fp32 default: small students suffer); "auto" ok
    seed: int = 0
    # online feeds with warm-up epochs: "skip" = the published Fast/NAYER/CPNet schedule (only the bank grows
    # during warm-up; the cosine runs over the epochs after it), "train" = the student also steps during warm-up
    student_warmup: str = "train"
    eta_min: float = 0.0  # the cosine schedule's floor (published Fast/NAYER/CPNet: 2e-4)

    #: closed choices of the fields above (for the stage's params check)
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"student_warmup": ("train", "skip")}

    @classmethod
    def from_params(cls, params: dict[str, Any], amp: bool) -> DistillConfig:
        """The loop's settings out of checked stage params (``amp`` resolved by the engine)."""
        return cls(epochs=int(params["epochs"]), batch_size=int(params["batch_size"]), kd_steps=params["kd_steps"],
                   lr=float(params["lr"]), optimizer=str(params["optimizer"]),
                   weight_decay=float(params["weight_decay"]), augment=augment_config(params["augment"]), amp=amp,
                   seed=int(params["seed"]), student_warmup=str(params["student_warmup"]),
                   eta_min=float(params["eta_min"]))


def distill(
    teacher: Classifier,
    side: StudentSide,
    feed: BankFeed,
    test: ArraySplit,
    cfg: DistillConfig,
    engine: Engine,
    resume: Checkpoints | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Train ``side.student`` to imitate ``teacher`` on ``feed``; returns the final test metrics and history.

    Each step computes what the side's terms need, once: ``side.views`` independently augmented views of the
    batch, the teacher's forward (no grad) where a term needs its logits or features, the student's forward,
    and the features hooks record. State (student, term modules, optimisers, scheduler, feed, RNG) is saved
    after every epoch when ``resume`` is given, and restored on a rerun with identical params.
    """
    teacher = engine.model(teacher).eval()
    side = engine.model(side)
    student = side.student
    world = current()
    opt, own = side.optimizers(cfg.optimizer, cfg.lr, cfg.weight_decay)
    # under the published warm-up schedule the student waits while the bank grows, and its cosine starts after
    skip = min(feed.warmup_epochs, cfg.epochs) if cfg.student_warmup == "skip" else 0
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.epochs - skip), eta_min=cfg.eta_min)
    aug = build_augment(test.info.image_size, cfg.augment)
    gen = torch.Generator().manual_seed(cfg.seed)
    headline = get_task(test.info.task).headline
    needs = side.needs
    run_teacher = bool(needs & {"t_logits", "t_feat", "t_stages"})
    t_hooks = TeacherFeatures(teacher, needs, test.info.channels, test.info.image_size)
    history: list[dict[str, float]] = []
    start = 0
    state = resume.load() if resume else None
    if state is not None and resume is not None:
        student.load_state_dict(state["student"])
        side.load_terms_state(state["terms"])
        opt.load_state_dict(state["opt"])
        for o, o_state in zip(own, state["own_opts"], strict=True):
            o.load_state_dict(o_state)
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        feed.load_state_dict(state["feed"])
        history, start = state["history"], int(state["epoch"])
        resume.restore_rng(state)
    step_loss = StepLoss(side, teacher, aug, engine, cfg.amp, run_teacher, t_hooks)
    # several processes: DDP averages the gradients of the student and of every module its terms train
    # (terms switched off part-way, custom_steps < 1, leave their modules without gradients: DDP must look for them)
    partial = any(float(t.opts.get("custom_steps", 1.0)) < 1.0 for t in side.terms.values())
    loss_fn: nn.Module = step_loss if not world.distributed else nn.parallel.DistributedDataParallel(
        step_loss, find_unused_parameters=partial)
    try:
        with progress() as bar:
            tid = bar.add_task("distill", total=cfg.epochs, completed=start, info="")
            for epoch in range(start, cfg.epochs):
                synth_logs = feed.before_epoch(epoch, side)
                side.train()
                sums: dict[str, float] = {}
                steps = 0
                n = len(feed)
                bs = min(cfg.batch_size, n)
                limit = cfg.kd_steps if cfg.kd_steps else max(1, n // bs)
                # several ranks: the same shuffled batches on every rank, rank r takes batches r, r + N, ...: each
                # takes 1/N of the epoch's steps (at least one), a step averages N batches
                limit = max(1, limit // world.size) if epoch >= skip else 0
                # passes over the feed, one after another, as long as the epoch's steps need them
                stream: Iterable[tuple[torch.Tensor, torch.Tensor]] = itertools.chain.from_iterable(
                    feed.batches(bs, gen) for _ in itertools.count())
                if not feed.per_rank_batches:
                    stream = rank_share(stream, world)
                for images, labels in itertools.islice(stream, limit):
                    loss, logs = loss_fn(images, labels, epoch / max(1, cfg.epochs))
                    check_finite(loss, "student loss")
                    opt.zero_grad(set_to_none=True)
                    for o in own:
                        o.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    for o in own:
                        o.step()
                    for k, v in {"loss": float(loss.detach()), **logs}.items():
                        sums[k] = sums.get(k, 0.0) + v
                    steps += 1
                if steps:
                    sched.step()
                scores = evaluate(student, test, engine)
                row = {"epoch": epoch + 1, **scores, "bank_size": n, "student_steps": steps,
                       **{k: v / max(1, steps) for k, v in sums.items()}, **synth_logs}
                history.append(row)
                bar.update(tid, advance=1, info=f"loss {row.get('loss', float('nan')):.3f} {headline} "
                           f"{scores[headline]:.4f} bank {n}")
                if on_epoch:
                    on_epoch(row)
                if resume:
                    resume.save({"student": student.state_dict(), "terms": side.terms_state(),
                                 "opt": opt.state_dict(), "own_opts": [o.state_dict() for o in own],
                                 "sched": sched.state_dict(), "gen": gen.get_state(),
                                 "feed": feed.state_dict(), "history": history, "epoch": epoch + 1})
        feed.finish()
        return evaluate(student, test, engine), history
    finally:
        t_hooks.remove()


class StepLoss(nn.Module):
    """One student step as a module's forward (the step's tensors, then the side's objective), so that DDP can
    wrap it: the teacher is held outside the module tree (frozen, never synchronised)."""

    def __init__(self, side: StudentSide, teacher: Classifier, aug: nn.Module, engine: Engine, amp: bool,
                 run_teacher: bool, t_hooks: TeacherFeatures) -> None:
        super().__init__()
        self.side = side
        self._fixed = (teacher, aug, engine, amp, run_teacher, t_hooks)

    def forward(self, images: torch.Tensor, labels: torch.Tensor,
                progress: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        teacher, aug, engine, amp, run_teacher, t_hooks = self._fixed
        step = make_step(images, labels, self.side, teacher, aug, engine, amp, run_teacher, t_hooks, progress)
        return self.side.objective(step)


class TeacherFeatures:
    """The teacher's penultimate and stage features, hooked only when a student term needs them."""

    def __init__(self, teacher: Classifier, needs: frozenset[str], channels: int, image_size: Size) -> None:
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
              engine: Engine, amp: bool, run_teacher: bool, t_hooks: TeacherFeatures,
              progress: float = 0.0) -> StudentStep:
    """One step's tensors: ``side.views`` augmented views, the teacher's forward where needed, the student's."""
    if side.views == 1:
        x = engine.images(aug(to_float(images)))
    else:
        x = engine.images(torch.cat([aug(to_float(images)) for _ in range(side.views)]))
        labels = labels.repeat(side.views)
    t_logits = None
    t_feat, t_stages = None, {}
    if run_teacher:
        with torch.no_grad(), engine.autocast(amp):
            t_logits = teacher(x).float()
        t_feat, t_stages = t_hooks.read()
    with engine.autocast(amp):
        s_logits = side.student(x).float()
    s_feat, s_stages = side.features()
    return StudentStep(x=x, labels=labels, s_logits=s_logits, t_logits=t_logits, s_feat=s_feat, t_feat=t_feat,
                       s_stages=s_stages, t_stages=t_stages, views=side.views, progress=progress)
