"""Teacher training: cross-entropy on a real dataset with a cosine learning rate, one epoch a unit of the runner.

Under torchrun (several ranks) the network trains wrapped in DDP: every rank draws the same shuffled batches and
takes every N-th of them, so an epoch is 1/N of the steps per rank, each step averaging N batches of
``batch_size`` (per rank; the learning rate is not scaled).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from dfkd_common.augment_ops import AugmentConfig, build_augment, to_float
from dfkd_common.data import ArraySplit
from dfkd_common.dist import current, rank_share
from dfkd_common.engine import Engine, check_finite
from dfkd_common.errors import DfkdError
from dfkd_common.evaluation import evaluate
from dfkd_common.loops.common import epoch_batches, make_optimizer
from dfkd_common.loops.runner import Loop, Runner, Store
from dfkd_common.tasks import get_task


@dataclass(frozen=True)
class TeacherTraining:
    """The loop's params (the ``teacher`` section of a params file holds them beside the stage's own)."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.05
    optimizer: Literal["sgd", "adam"] = "sgd"
    weight_decay: float = 5e-4
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_pad=2))
    seed: int = 0


class TeacherLoop(Loop):
    """One epoch of supervised training and its evaluation on the test split (the runner's :class:`Loop`)."""

    def __init__(self, model: nn.Module, train: ArraySplit, test: ArraySplit, cfg: TeacherTraining,
                 engine: Engine) -> None:
        world = current()
        if world.distributed and len(train) // cfg.batch_size < world.size:
            raise DfkdError(f"{world.size} processes need at least {world.size} full batches of {cfg.batch_size} "
                            f"per epoch; the training split has {len(train)} images")
        self.cfg, self.engine, self.train, self.test, self.world = cfg, engine, train, test, world
        self.model = engine.model(model)
        self.net = engine.parallel(self.model)
        self.per_rank = len(train) // cfg.batch_size // world.size
        self.opt = make_optimizer(self.model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, max(1, cfg.epochs))
        self.aug = build_augment(train.info.image_size, cfg.augment)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.task = get_task(test.info.task)
        self.headline = self.task.headline
        if self.task.name != "classification" and (cfg.augment.crop_pad or cfg.augment.flip):
            raise DfkdError(f"teacher: augment.crop_pad and augment.flip move the images, not their {self.task.name} "
                            "targets: set augment.crop_pad=0 and augment.flip=false")
        self.images, self.labels = train.images.to(engine.device), train.labels.to(engine.device)

    def run(self, epoch: int) -> dict[str, Any]:
        self.model.train()
        total, count = 0.0, 0
        batches: Iterable[torch.Tensor] = epoch_batches(len(self.train), self.cfg.batch_size, self.gen)
        if self.world.distributed:  # this rank's batches, none of a remainder some rank would lack (equal steps)
            batches = itertools.islice(rank_share(batches, self.world), self.per_rank)
        for idx in batches:
            x = self.engine.images(self.aug(to_float(self.images[idx])))
            with self.engine.autocast():
                loss = self.task.loss(self.net(x).float(), self.labels[idx])
            check_finite(loss, "teacher loss")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
        self.sched.step()
        return {"epoch": epoch + 1, "loss": total / max(1, count), **evaluate(self.model, self.test, self.engine)}

    def describe(self, logs: dict[str, Any] | None) -> str:
        return f"loss {logs['loss']:.3f} {self.headline} {logs[self.headline]:.4f}" if logs else ""

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.gen.set_state(state["gen"])


def train_teacher(model: nn.Module, train: ArraySplit, test: ArraySplit, cfg: TeacherTraining, engine: Engine,
                  store: Store | None = None,
                  on_epoch: Callable[[int, dict[str, Any] | None], None] | None = None,
                  ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Train ``model`` (resumable through ``store``); returns its final test metrics and the per-epoch history."""
    loop = TeacherLoop(model, train, test, cfg, engine)
    result = Runner(store, on_unit=on_epoch).run(loop, cfg.epochs, "teacher", "epoch")
    return evaluate(loop.model, test, engine), result.history
