"""Shared training plumbing: in-memory batch sampling, evaluation, resumable state, teacher training.

Training data (a dataset split or a bank) lives in memory as uint8 on the training device; batches are index
draws from a seeded generator, converted to float and augmented on the device. On the CPU this beats a
DataLoader over PIL images several times and makes runs repeatable from the seed alone.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_common.augment_ops import AugmentConfig, build_augment, to_float
from dfkd_common.checkpoint import load_tree, save_tree
from dfkd_common.data import ArraySplit
from dfkd_common.dist import current, rank_share
from dfkd_common.engine import Engine, check_finite, progress, rng_state, set_rng_state
from dfkd_common.errors import DfkdError
from dfkd_common.params import params_hash
from dfkd_common.tasks import get_task


def epoch_batches(n: int, batch_size: int, gen: torch.Generator, drop_last: bool = True) -> Iterator[torch.Tensor]:
    """Shuffled index batches covering ``n`` rows once (drop_last keeps BN batches full-sized)."""
    perm = torch.randperm(n, generator=gen)
    stop = n - (n % batch_size) if (drop_last and n >= batch_size) else n
    for i in range(0, stop, batch_size):
        yield perm[i : i + batch_size]


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, engine: Engine, batch_size: int = 1000, amp: bool = False
) -> torch.Tensor:
    """Logits (float32, CPU) for uint8 or float images, in batches, model in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = engine.images(to_float(images[i : i + batch_size].to(engine.device)))
        with engine.autocast(amp):
            out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def evaluate(model: nn.Module, split: ArraySplit, engine: Engine, batch_size: int = 1000) -> dict[str, float]:
    """The task's metrics (fp32) of ``model`` on a labelled split (classification: ``test_acc``): the honest
    figures every metrics file, checkpoint and report uses."""
    logits = predict(model, split.images, engine, batch_size)
    return get_task(split.info.task).metrics(logits, split.labels)


class Checkpoints(Protocol):
    """What a training loop needs to resume: :class:`Resume` (a state file) or a job's
    (:class:`dfkd_common.jobs.JobResume`, whose checkpoint also commits the rows the run recorded)."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...

    def restore_rng(self, state: dict[str, Any]) -> None: ...


@dataclass
class Resume:
    """Per-epoch resumable state beside an output (``.<out>.state.safetensors``: for ``t.safetensors`` the file
    ``.t.safetensors.state.safetensors``), tied to a params hash.

    A rerun with the same params continues from the last saved epoch; different params start over (the old
    state would describe another run). The state file is deleted once the artifact is complete
    (``docs/ARTIFACTS.md``).
    """

    path: Path
    key: str

    @classmethod
    def for_output(cls, output: str | os.PathLike[str], params: dict[str, Any]) -> Resume:
        out = Path(output)
        return cls(out.parent / f".{out.name}.state.safetensors", params_hash(params))

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


def make_optimizer(
    params: Any, name: str, lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise DfkdError(f"unknown optimizer {name!r} (sgd or adam)")


def train_supervised(
    model: nn.Module,
    train: ArraySplit,
    test: ArraySplit,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str,
    weight_decay: float,
    augment: AugmentConfig,
    engine: Engine,
    seed: int,
    resume: Checkpoints | None = None,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Cross-entropy training with cosine LR; returns the final test metrics and the per-epoch history.

    Under torchrun (several ranks) the model trains wrapped in DDP: every rank draws the same shuffled batches
    and takes every N-th of them, so an epoch is 1/N of the steps per rank, each step averaging N batches of
    ``batch_size`` (per rank; the learning rate is not scaled).
    """
    model = engine.model(model)
    world = current()
    if world.distributed and len(train) // batch_size < world.size:
        raise DfkdError(f"{world.size} processes need at least {world.size} full batches of {batch_size} per epoch; "
                        f"the training split has {len(train)} images")
    per_rank = len(train) // batch_size // world.size
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if world.distributed else model
    opt = make_optimizer(model.parameters(), optimizer, lr, weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    aug = build_augment(train.info.image_size, augment)
    gen = torch.Generator().manual_seed(seed)
    headline = get_task(test.info.task).headline
    images, labels = train.images.to(engine.device), train.labels.to(engine.device)
    history: list[dict[str, float]] = []
    start = 0
    state = resume.load() if resume else None
    if state is not None and resume is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        history, start = state["history"], int(state["epoch"])
        resume.restore_rng(state)
    with progress() as bar:
        tid = bar.add_task("teacher", total=epochs, completed=start, info="")
        for epoch in range(start, epochs):
            model.train()
            total, count = 0.0, 0
            batches: Iterable[torch.Tensor] = epoch_batches(len(train), batch_size, gen)
            if world.distributed:  # this rank's batches, none of a remainder some rank would lack (DDP: equal steps)
                batches = itertools.islice(rank_share(batches, world), per_rank)
            for idx in batches:
                x = engine.images(aug(to_float(images[idx])))
                with engine.autocast():
                    loss = F.cross_entropy(net(x).float(), labels[idx])
                check_finite(loss, "teacher loss")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, count = total + float(loss.detach()) * len(idx), count + len(idx)
            sched.step()
            scores = evaluate(model, test, engine)
            history.append({"epoch": epoch + 1, "loss": total / max(1, count), **scores})
            bar.update(tid, advance=1, info=f"loss {total / max(1, count):.3f} {headline} {scores[headline]:.4f}")
            if resume:
                resume.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                             "gen": gen.get_state(), "history": history, "epoch": epoch + 1})
    return evaluate(model, test, engine), history
