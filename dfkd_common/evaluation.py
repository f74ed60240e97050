"""How a model is measured: its logits on a split, the task's metrics, and which split a student is measured on.

Every figure dfkd reports is the task's metrics of the final model on real held-out data, computed here in fp32
(a bf16 run still reports fp32 figures). Which data that is for a student: the labelled test set the user gave
(a folder of class folders, or a bank with labels), else the teacher dataset's registered test split, else (a
teacher imported for data nobody has here) its agreement with the teacher on a fraction of the bank held out of
training, which the metrics name as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dfkd_common.augment_ops import to_float
from dfkd_common.bank import Bank, load_bank
from dfkd_common.data import DATASETS, ArraySplit, DatasetInfo, get_dataset
from dfkd_common.data.datasets import folder_split
from dfkd_common.engine import Engine
from dfkd_common.errors import DfkdError
from dfkd_common.tasks import Task, get_task


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, engine: Engine, batch_size: int = 1000) -> torch.Tensor:
    """Logits (float32, CPU, no autocast) for uint8 or float images, in batches, the model in eval mode.

    A batch holds at most ``batch_size`` images and at most 64 MiB of float input (224-px images: 111 a batch),
    so evaluating large images does not take gigabytes."""
    was_training = model.training
    model.eval()
    batch_size = max(1, min(batch_size, (64 << 20) // max(1, 4 * int(np.prod(images.shape[1:])))))
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = engine.images(to_float(images[i : i + batch_size].to(engine.device)))
        out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def evaluate(model: nn.Module, split: ArraySplit, engine: Engine, batch_size: int = 1000) -> dict[str, float]:
    """The task's metrics (fp32) of ``model`` on a labelled split (classification: ``test_acc``): the honest
    figures every metrics file, checkpoint and report uses."""
    logits = predict(model, split.images, engine, batch_size)
    return get_task(split.info.task).metrics(logits, split.labels)


def breakdown(model: nn.Module, split: ArraySplit, engine: Engine, batch_size: int = 1000) -> dict[str, Any]:
    """The task's per-class figures of ``model`` on a split (segmentation: each class's IoU) for a run's details
    file; a task without any costs no pass over the split."""
    task = get_task(split.info.task)
    if type(task).breakdown is Task.breakdown:
        return {}
    return task.breakdown(predict(model, split.images, engine, batch_size), split.labels, split.info.class_names)


@dataclass
class EvaluationSplit:
    """What a student is measured on, how the metrics name it, and the bank left to train on."""

    split: ArraySplit
    described: str
    train: Bank | None


def evaluation_split(info: DatasetInfo, test: str | None, test_dataset: str | None, data_root: str | None,
                     holdout: float, seed: int, bank: Bank | None, teacher: nn.Module, engine: Engine,
                     online: bool) -> EvaluationSplit:
    """The ``test`` set given (a folder of class folders, or a bank ``.h5`` with labels), else the registered
    test split of ``test_dataset`` (default: the teacher's dataset), else ``holdout`` of ``bank`` held out of
    training and labelled by the teacher (its agreement with the teacher; not for online runs, whose bank grows)."""
    if test:
        path = Path(test)
        if path.suffix == ".h5":
            labelled = load_bank(path)
            labelled.check_compatible(info, what="model")
            keep = labelled.labels >= 0
            if not bool(keep.any()):
                raise DfkdError(f"test set {path}: the bank has no labels")
            return EvaluationSplit(ArraySplit(labelled.images[keep], labelled.labels[keep], info),
                                   f"test set {path}", bank)
        return EvaluationSplit(folder_split(path, info), f"test set {path}", bank)
    name = test_dataset or info.name
    same = {"image_size": info.image_size, "channels": info.channels} if name.startswith("imagefolder:") else {}
    if name in DATASETS or name.startswith("imagefolder:"):
        split = get_dataset(name, **same).load("test", data_root, info.image_size)  # at the teacher's input size
        return EvaluationSplit(split, f"{name} test split", bank)
    if online or bank is None or len(bank) < 2:
        raise DfkdError(f"no test set for {name}: give one with --test FOLDER (class folders) or --test BANK.h5 "
                        "(a bank with labels)")
    n = len(bank)
    held = max(1, min(round(n * float(holdout)), n - 1))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    out, keep = perm[:held].sort().values, perm[held:].sort().values
    labels = get_task(info.task).predict(predict(teacher, bank.images[out], engine))
    train = Bank(bank.path, bank.images[keep], bank.labels[keep], bank.rounds[keep],
                 {k: v[keep] for k, v in bank.extra.items()}, bank.attrs, bank.checksummed)
    return EvaluationSplit(ArraySplit(bank.images[out], labels, info),
                           f"agreement with the teacher on {held} bank images held out of training (no labelled "
                           f"test set for {name})", train)
