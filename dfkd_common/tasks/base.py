"""The task interface: everything that depends on what a teacher predicts, in one place per task.

A classifier maps an image to K logits and is judged by accuracy; a segmentation network maps it to K logits per
pixel and is judged by mIoU. Everything else in dfkd (banks, checkpoints, loops, synthesis, reports) is the same
for both, so what differs is a registered :class:`Task` that the rest reads instead of assuming classes:

* the **target** a bank row holds and its shape (a class index; a per-pixel mask), and the bank's other per-row
  columns that depend on the task (the teacher's logits: (K,) per row, or (K, H, W));
* how a teacher's logits become a target (argmax over the class axis), and how synthesis draws targets;
* the **metrics** a model is judged by, the **headline** one (what metrics files, ``dfkd report`` and the
  checkpoint's metadata lead with) and how it is named in tables;
* the **KD reduction** (softmax over the class axis, averaged over everything else);
* the check that targets fit the class count.

The task of a run comes from its data: a registered dataset declares it (:class:`~dfkd_common.data.DatasetInfo`
``task``), the checkpoint and the bank record it, and every later stage reads it from the teacher. Image
geometry is (H, W) throughout (:mod:`dfkd_common.geometry`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from dfkd_common.registry import Registry


@dataclass(frozen=True)
class Column:
    """One per-row column of a bank: its dtype and the shape of one row's value (``()`` for a scalar)."""

    dtype: Any
    shape: tuple[int, ...] = ()

    def chunk_rows(self) -> int:
        """Rows per HDF5 chunk: about 4,096 values per chunk, at least one row."""
        return max(1, 4096 // int(np.prod(self.shape, dtype=np.int64)))


class Task(ABC):
    """A registered task (see the module docstring). Tasks hold no state: one instance serves every run."""

    name: ClassVar[str] = ""
    #: the bank column holding each row's target (read into :attr:`dfkd_common.bank.Bank.labels`)
    target: ClassVar[str] = "labels"
    #: the metric a model is judged by: the first column of metrics files, the report's sort key
    headline: ClassVar[str] = ""
    #: how tables name the headline metric
    headline_label: ClassVar[str] = ""
    #: every metric :meth:`metrics` returns
    metric_names: ClassVar[tuple[str, ...]] = ()
    #: whether synthesis draws targets for it (classification's classes); False: a synthesized image's target
    #: is what the teacher predicts for it
    draws_targets: ClassVar[bool] = True
    #: whether synthesized banks store the teacher's logits per row unless told (``teacher_logits`` param):
    #: a classifier's are a few bytes a row; per-pixel logits are the row's size many times over
    logits_by_default: ClassVar[bool] = True

    @abstractmethod
    def target_column(self, num_classes: int, image_size: tuple[int, int]) -> Column:
        """The dtype and per-row shape of a target."""

    @abstractmethod
    def logits_column(self, num_classes: int, image_size: tuple[int, int]) -> Column:
        """The dtype and per-row shape of the stored teacher logits (an optional bank column)."""

    @abstractmethod
    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """The target a model's logits stand for (the labels of retrieved, held-out or recorded images)."""

    @abstractmethod
    def metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Every metric of logits against true targets; :attr:`headline` among them."""

    def breakdown(self, logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
        """Per-class figures behind the metrics, for a run's details file (none unless a task has them)."""
        return {}

    @abstractmethod
    def kd(self, s_logits: torch.Tensor, t_logits: torch.Tensor, tau: float) -> torch.Tensor:
        """Hinton's KD between student and teacher logits at temperature ``tau``, reduced to a scalar."""

    @abstractmethod
    def draw_targets(self, n: int, round_index: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
        """Targets for ``n`` images a synthesis round makes (CPU tensor), drawn from ``gen``."""

    def output_shape(self, n: int, num_classes: int, image_size: tuple[int, int]) -> tuple[int, ...]:
        """The logits' shape a model of this task makes for ``n`` images (classification: (n, K))."""
        return (n, num_classes)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The supervised loss a teacher trains with on real targets (cross-entropy over the class axis)."""
        return torch.nn.functional.cross_entropy(logits, targets.long())

    @abstractmethod
    def check_targets(self, targets: torch.Tensor, num_classes: int, where: str) -> None:
        """Raise :class:`~dfkd_common.errors.DfkdError` when a target does not fit ``num_classes``."""


TASKS: Registry[Task] = Registry("task")


def get_task(name: str | None) -> Task:
    """The registered task ``name`` (files written before tasks existed name none: classification)."""
    return TASKS.get(name or "classification")
