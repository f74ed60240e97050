"""The student side's interface: a registered loss over one student step's tensors.

A :class:`StudentLoss` sees a :class:`Batch` (the augmented images, student and teacher logits, the bank labels)
and returns the value to minimise plus numbers to log. Its options are checked against its ``defaults`` when it
is built (an unknown key is one error line). Parameters it owns train with the student, or with an optimiser of
its own (:meth:`StudentLoss.extra_optimizer`); they are saved in the run's resume state, never in the student's
checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from dfkd_common.models import Classifier
from dfkd_common.params import check_params
from dfkd_common.registry import Registry


@dataclass
class Batch:
    """One student step's tensors: augmented images, logits, and the bank labels of the rows (-1: none)."""

    x: torch.Tensor
    s_logits: torch.Tensor
    t_logits: torch.Tensor
    labels: torch.Tensor


class StudentLoss(nn.Module):
    """Base: ``forward(batch) -> (loss, logs)``. Parameters it owns are trained with the student."""

    defaults: ClassVar[dict[str, Any]] = {}
    param_types: ClassVar[dict[str, Any]] = {}  # expected types of params whose default is None

    def __init__(self, cfg: dict[str, Any], teacher: Classifier, student: Classifier,
                 teacher_accuracy: float | None = None) -> None:
        super().__init__()
        check_params(cfg, self.defaults, f"loss_cfg ({type(self).__name__})", types=self.param_types)
        self.cfg = {**self.defaults, **cfg}
        self.teacher_accuracy = teacher_accuracy  # measured on the teacher's test split, from its checkpoint

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_optimizer(self) -> torch.optim.Optimizer | None:
        """An optimiser of the loss's own for (some of) its parameters, or None (the default).

        Called by the loop after the loss moved to the device. Parameters it owns are left out of the student
        optimiser and stepped by it instead, every student step and without the student's LR schedule: DFND
        trains its transition matrix with Adam at 1e-3 while the student uses SGD with a cosine schedule.
        """
        return None


STUDENT_LOSSES: Registry[type[StudentLoss]] = Registry("student loss")
