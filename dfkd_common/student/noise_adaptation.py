"""DFND's student loss: KD plus noise adaptation through a learnable label-transition matrix.

Retrieved wild images are labelled by the teacher, and the teacher is wrong on part of them (its accuracy on
its own test data is an optimistic estimate of how often). DFND models the noisy label as the student's clean
prediction passed through a transition matrix ``Q`` (``Q[i, j] = P(noisy label j | true class i)``)::

    loss = KD_tau(S, T) + w * NLL(log(softmax(S(x)) @ Q), argmax T(x))

``Q``'s diagonal is fixed to the teacher's accuracy ``acc`` (the chance its label is right); each row's
off-diagonal mass ``1 - acc`` is spread by ``softmax(theta_row)`` over the other classes, with ``theta`` (C x C,
zeros at start: uniform noise) learned jointly with the student by its own Adam (lr 1e-3, the paper's setting)
through :meth:`StudentLoss.extra_optimizer`. Rows therefore always sum to one and ``Q`` stays a valid
transition matrix whatever ``theta`` becomes. Because the diagonal is fixed, the student cannot explain its
disagreements away as "noise" wholesale; it can only learn *which* confusions the teacher's labels contain.

``acc`` comes from the teacher checkpoint's measured test accuracy, which ``dfkd distill`` passes in as the
loss's ``teacher_accuracy``; an explicit ``teacher_acc`` in ``loss_cfg`` wins (e.g. an estimate of the teacher's
accuracy on the wild domain) and is required when the checkpoint has none.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_common.errors import DfkdError
from dfkd_common.functional import kd_loss
from dfkd_common.models import Classifier
from dfkd_common.student.base import STUDENT_LOSSES, Batch, StudentLoss


def transition_matrix(theta: torch.Tensor, acc: float) -> torch.Tensor:
    """Q (C x C): diagonal ``acc``, off-diagonal of row i = softmax over j != i of theta[i, j] times (1 - acc)."""
    c = theta.shape[0]
    eye = torch.eye(c, dtype=torch.bool, device=theta.device)
    off = torch.softmax(theta.masked_fill(eye, float("-inf")), dim=1)
    return off * (1.0 - acc) + eye.to(theta.dtype) * acc


@STUDENT_LOSSES.register("dfnd")
class NoiseAdaptationLoss(StudentLoss):
    """KD at ``tau`` + ``na_weight`` x NLL through the transition matrix (see the module docstring)."""

    defaults: ClassVar[dict[str, Any]] = {"tau": 4.0, "na_weight": 1.0, "theta_lr": 1e-3, "teacher_acc": None}
    param_types: ClassVar[dict[str, type]] = {"teacher_acc": float}

    def __init__(self, cfg: dict[str, Any], teacher: Classifier, student: Classifier,
                 teacher_accuracy: float | None = None) -> None:
        super().__init__(cfg, teacher, student, teacher_accuracy)
        acc = self.cfg["teacher_acc"]
        if acc is None:
            acc = teacher_accuracy
        if acc is None:
            raise DfkdError("dfnd loss: the teacher checkpoint has no measured accuracy; "
                            "set distill loss_cfg.teacher_acc (e.g. --set loss_cfg.teacher_acc=0.95)")
        acc = float(acc)
        if not 0.0 < acc <= 1.0:
            raise DfkdError(f"dfnd loss: teacher accuracy must be in (0, 1], got {acc}")
        self.acc = acc
        k = student.num_classes
        self.theta = nn.Parameter(torch.zeros(k, k))

    def q(self) -> torch.Tensor:
        return transition_matrix(self.theta, self.acc)

    def extra_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.theta], lr=float(self.cfg["theta_lr"]))

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        kd = kd_loss(batch.s_logits, batch.t_logits, float(self.cfg["tau"]))
        target = batch.t_logits.argmax(1)
        noisy = torch.softmax(batch.s_logits.float(), 1) @ self.q()
        na = F.nll_loss(torch.log(noisy.clamp_min(1e-12)), target)
        loss = kd + float(self.cfg["na_weight"]) * na
        return loss, {"kd": float(kd.detach()), "na": float(na.detach())}
